"""Fault injection for the reliability tests: `python -m tests.reliability.faults FAULT <posttrain args>`.

Installs one fault, then runs the posttrain CLI in this process, so the test sees the real exit code, stderr
and run directory. Tests that need no kill install a fault in their own process instead, with
`install(fault, monkeypatch.setattr)`, which pytest undoes afterwards. A kill is a real SIGKILL of this
process (what `kill -9` does: no handler, no cleanup); a full disk is `OSError(ENOSPC)` raised after half of
a file's bytes reached the disk, as a real one would.

FAULT is one of:
  kill-in-model-weights       model/model.safetensors half written, then SIGKILL
  enospc-in-model-weights     model/model.safetensors half written, then ENOSPC
  kill-before-done            the stage folder renamed into place, its DONE not yet written, then SIGKILL
  kill-in-replace             an older (not done) stage folder moved aside, the new one not yet in place
  kill-in-checkpoint-N        checkpoint-N has its weights and half its optimizer state, then SIGKILL
  enospc-in-checkpoint-N      the same, then ENOSPC
  nan-at-step-N               the loss of optimizer step N is NaN (its gradients too)
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path


def _kill(_path: object = None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _enospc(path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _half_then(path: Path, fail) -> None:
    """Cut `path` to half its bytes, as a write interrupted halfway leaves it, then fail."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fail(path)


def _in_model_weights(fail, patch) -> None:
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = real(self, save_directory, *args, **kwargs)
        if Path(save_directory).name == "model":  # the stage's final save, not a checkpoint
            _half_then(Path(save_directory) / "model.safetensors", fail)
        return out

    patch(PreTrainedModel, "save_pretrained", save_pretrained)


def _in_replace(patch) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if ".old-" in Path(dst).name:  # RunDir.finalize moved the older folder aside
            _kill()

    patch(os, "replace", replace)


def _in_checkpoint(step: int, fail, patch) -> None:
    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        real(self, output_dir)
        if Path(output_dir).name == f"checkpoint-{step}":
            _half_then(Path(output_dir) / "optimizer.pt", fail)

    patch(Trainer, "_save_optimizer_and_scheduler", save)


def _nan_at(step: int, patch) -> None:
    from transformers import Trainer

    real = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        # global_step counts finished optimizer steps, so the one in progress is global_step + 1. The gradients
        # turn NaN too, as a real NaN loss's would: the update of that step poisons the weights.
        if self.state.global_step + 1 != step:
            return loss
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(float("nan"))
        return loss * float("nan")

    patch(Trainer, "training_step", training_step)


def install(fault: str, patch=setattr) -> None:
    """Install `fault`; `patch(obj, name, value)` does the patching (pytest's monkeypatch.setattr undoes it)."""
    head, _, tail = fault.rpartition("-")
    if fault in ("kill-in-model-weights", "enospc-in-model-weights"):
        _in_model_weights(_kill if fault.startswith("kill") else _enospc, patch)
    elif fault == "kill-before-done":
        from posttrain.rundir import RunDir

        patch(RunDir, "write_done", staticmethod(lambda *a, **k: _kill()))
    elif fault == "kill-in-replace":
        _in_replace(patch)
    elif head in ("kill-in-checkpoint", "enospc-in-checkpoint"):
        _in_checkpoint(int(tail), _kill if head.startswith("kill") else _enospc, patch)
    elif head == "nan-at-step":
        _nan_at(int(tail), patch)
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from posttrain.cli import main

    sys.exit(main(sys.argv[2:]))
