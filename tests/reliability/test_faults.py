"""Items 8 and 14: a NaN loss and a full disk.

8. A NaN or infinite loss stops the stage with a one-line message, keeps the last good checkpoint and writes
   no model marked done.
14. Disk full while saving (an ENOSPC after half a file was written): the stage fails with a clear message,
   the previous checkpoint stays loadable, and the same command, once there is space, finishes the stage.

The CLI runs in this process with the fault installed by monkeypatch (tests/reliability/faults.py).
"""
import math


from tests.reliability.conftest import cli_here, error_lines, sft_args
from tests.reliability.faults import install


def _loss(folder) -> float:
    """The loss of the model in `folder` on one arithmetic line (a model that diverged gives nan or inf)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)("12+7=19", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _checkpoints(run_dir) -> list[str]:
    folder = run_dir / "stages" / ".01_sft.tmp" / "checkpoints"
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def _assert_one_error(code: int, err: str, run_dir, *parts: str) -> None:
    """Exit 1 and one `error:` line naming `parts`; the traceback went to error.log. (stderr itself is not
    searched for a traceback here: in this process a logging handler left by an earlier test may print one.)"""
    errors = error_lines(err)
    assert code == 1 and len(errors) == 1, err[-2000:]
    for part in parts:
        assert part in errors[0], errors[0]
    assert str(run_dir / "error.log") in errors[0] and "Traceback" in (run_dir / "error.log").read_text()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, capsys, monkeypatch):
    """The loss of step 6 is NaN (its gradients too): checkpoint-4 stays, and nothing is marked done."""
    install("nan-at-step-6", monkeypatch.setattr)
    run_dir = tmp_path / "run"
    code, err = cli_here(capsys, *sft_args(run_dir))
    _assert_one_error(code, err, run_dir, "loss became nan at step 6", "the last good checkpoint, checkpoint-4, is kept")
    assert not (run_dir / "stages" / "01_sft").exists()
    assert _checkpoints(run_dir) == ["checkpoint-4"]
    assert math.isfinite(_loss(run_dir / "stages" / ".01_sft.tmp" / "checkpoints" / "checkpoint-4"))


def test_diverging_loss_stops_without_done(world, tmp_path, capsys):
    """A learning rate of 1e30 makes the loss of step 2 NaN. checkpoint-1 holds the weights that produced it,
    so it is dropped: no checkpoint is left to resume into the divergence, and nothing is marked done."""
    run_dir = tmp_path / "run"
    code, err = cli_here(capsys, *sft_args(run_dir), "--set", "trainer.save_steps=1", "--set",
                         "trainer.max_grad_norm=1e30", "--set", "trainer.learning_rate=1e30")
    checkpoints = run_dir / "stages" / ".01_sft.tmp" / "checkpoints"
    _assert_one_error(code, err, run_dir, "loss became nan at step 2", f"no checkpoint from before it is left in "
                      f"{checkpoints}")
    assert not (run_dir / "stages" / "01_sft").exists()
    assert _checkpoints(run_dir) == []


def test_disk_full_at_the_final_save(world, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        install("enospc-in-model-weights", m.setattr)
        code, err = cli_here(capsys, *sft_args(run_dir))
    work = run_dir / "stages" / ".01_sft.tmp"
    _assert_one_error(code, err, run_dir, "No space left on device", str(work / "model" / "model.safetensors"))
    assert not (run_dir / "stages" / "01_sft").exists()
    assert _checkpoints(run_dir)[-1] == "checkpoint-12"
    assert math.isfinite(_loss(work / "checkpoints" / "checkpoint-12"))  # loadable, and sane

    code, err = cli_here(capsys, *sft_args(run_dir))  # space again: the same command finishes
    assert code == 0, err[-2000:]
    assert "resuming from" in err and (run_dir / "stages" / "01_sft" / "DONE").is_file()


def test_disk_full_while_saving_a_checkpoint(world, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        install("enospc-in-checkpoint-8", m.setattr)
        code, err = cli_here(capsys, *sft_args(run_dir))
    _assert_one_error(code, err, run_dir, "No space left on device", "checkpoint-8")
    assert not (run_dir / "stages" / "01_sft").exists()
    assert math.isfinite(_loss(run_dir / "stages" / ".01_sft.tmp" / "checkpoints" / "checkpoint-4"))

    code, err = cli_here(capsys, *sft_args(run_dir))
    assert code == 0, err[-2000:]
    assert "resuming from" in err and "checkpoint-4" in err
    assert (run_dir / "stages" / "01_sft" / "DONE").is_file()
