"""What a run prints about how far it is: the pipeline's line as each stage starts and ends (elapsed, time left),
a training stage's progress line at every tenth of the steps, not transformers' log dicts and bar (unless
--verbose, POSTTRAIN_VERBOSE; every record still goes to metrics.jsonl), and progress bars on a terminal only.
The lines of a real two-stage world pipeline: tests/test_api.py (it reuses that file's run)."""
from __future__ import annotations

import io
import json
import sys
import types

from posttrain.progress import VERBOSE_ENV, PipelineProgress, progress_line, quiet_trainer, terminal_only_bars
from posttrain.stages.base import StageContext
from posttrain.stages.common import metrics_callback


def test_progress_line():
    assert progress_line({"loss": 1.01234, "grad_norm": 2.0}, 320, 800, 48.0, 320) == \
        "  train 40%: step 320/800, loss 1.012, 48s, ~1m12s left"
    # GRPO logs a reward; a resumed run counts only the steps it trained itself for the estimate.
    assert progress_line({"loss": 0.0, "reward": 0.75}, 100, 100, 125.0, 50) == \
        "  train 100%: step 100/100, loss 0, reward 0.75, 2m05s"
    assert progress_line({"train_runtime": 121.64, "train_loss": 0.561}, 800, 800, 0.0, 800) == \
        "  trained 800 steps in 121.6s, mean loss 0.561"


def _ctx(tmp_path, lines):
    return StageContext(run_dir=tmp_path, work_dir=tmp_path, index=1, seed=0, input_model=None,
                        resolve=str, log=lines.append)


def test_metrics_callback_prints_a_tenth_at_a_time(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    lines: list[str] = []
    cb = metrics_callback(_ctx(tmp_path, lines))
    args, state = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(max_steps=100)
    cb.on_train_begin(args, state, TrainerControl())
    for step in range(5, 101, 5):  # logging_steps 5: 20 records, 10 lines
        state.global_step = step
        cb.on_log(args, state, TrainerControl(), logs={"loss": 1.0 / step})
    state.global_step = 100
    cb.on_log(args, state, TrainerControl(), logs={"train_runtime": 3.0, "train_loss": 0.1})
    assert [line.split(":")[0] for line in lines] == [f"  train {p}%" for p in range(10, 101, 10)] + [
        "  trained 100 steps in 3.0s, mean loss 0.1"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 21 and records[0] == {"step": 5, "epoch": 0, "loss": 0.2}
    # --verbose: the trainer prints its own; the callback prints nothing and still writes every record.
    monkeypatch.setenv(VERBOSE_ENV, "1")
    quiet = []
    cb = metrics_callback(_ctx(tmp_path, quiet))
    cb.on_train_begin(args, state, TrainerControl())
    cb.on_log(args, state, TrainerControl(), logs={"loss": 0.5})
    assert quiet == []


def test_quiet_trainer_takes_the_printing_callbacks_off(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tests.conftest import make_tiny_llama

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m"))
    printing = (ProgressCallback, PrinterCallback)
    for disable_tqdm in (False, True):  # ProgressCallback, or PrinterCallback with disable_tqdm
        args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, disable_tqdm=disable_tqdm)
        monkeypatch.setenv(VERBOSE_ENV, "1")
        trainer = Trainer(model=model, args=args)
        quiet_trainer(trainer)
        assert any(isinstance(cb, printing) for cb in trainer.callback_handler.callbacks)
        monkeypatch.delenv(VERBOSE_ENV)
        quiet_trainer(trainer)
        assert not any(isinstance(cb, printing) for cb in trainer.callback_handler.callbacks)


def test_pipeline_progress_lines():
    now = [100.0]
    p = PipelineProgress(3, clock=lambda: now[0])
    now[0] = 112.0  # the base eval
    assert p.start(1, "sft") == "[01 sft] stage 1/3 starts: 0/3 done, 12s elapsed, time left unknown until a stage has run"
    now[0] = 212.0
    assert p.end(1, "sft", skipped=False) == \
        "[01 sft] stage 1/3 finished in 1m40s: 1/3 done, 1m52s elapsed, ~3m20s left (1m40s a stage, mean of 1)"
    # A skipped stage costs nothing and is left out of the mean.
    assert p.start(2, "dpo").endswith("1/3 done, 1m52s elapsed, ~3m20s left (1m40s a stage, mean of 1)")
    now[0] = 213.0
    assert p.end(2, "dpo", skipped=True) == \
        "[02 dpo] stage 2/3 skipped (done already): 2/3 done, 1m53s elapsed, ~1m40s left (1m40s a stage, mean of 1)"
    p.start(3, "grpo")
    now[0] = 273.0
    assert p.end(3, "grpo", skipped=False) == "[03 grpo] stage 3/3 finished in 1m00s: 3/3 done, 2m53s elapsed"
    # Only skipped stages so far: still unknown.
    q = PipelineProgress(2, clock=lambda: 0.0)
    q.start(1, "a")
    assert q.end(1, "a", skipped=True).endswith("1/2 done, 0s elapsed, time left unknown until a stage has run")


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bars_are_drawn_on_a_terminal_only(monkeypatch):
    from tqdm import tqdm

    lib = types.SimpleNamespace(tqdm=tqdm)  # a library that opens bars as lm-eval does
    for quiet in (False, True):  # TQDM_DISABLE: the CLI's switch without --verbose
        if quiet:
            monkeypatch.setenv("TQDM_DISABLE", "1")
        else:
            monkeypatch.delenv("TQDM_DISABLE", raising=False)
        for tty in (False, True):
            err = _Stderr(tty)
            monkeypatch.setattr(sys, "stderr", err)
            with terminal_only_bars(lib):
                for _ in lib.tqdm(range(3), disable=False, desc="requests"):  # lm-eval's request bars
                    pass
                for _ in lib.tqdm(range(3), desc="contexts"):  # lm-eval's bars that pass no disable
                    pass
                lib.tqdm(total=1, disable=True, desc="rank1").close()  # rank != 0: off on a terminal too
            shown = err.getvalue()
            assert ("requests" in shown, "contexts" in shown, "rank1" in shown) == (tty, tty and not quiet, False)
    assert lib.tqdm is tqdm  # put back


def test_lm_eval_request_bars_follow_the_terminal_rule(world, monkeypatch):
    """The eval runner opens lm-eval's bars through terminal_only_bars: request bars off when stderr is a file,
    the others off under TQDM_DISABLE (which tqdm, imported by torch before the CLI sets it, would not read)."""
    import lm_eval
    import lm_eval.api.task as task
    import lm_eval.models.huggingface as hf

    from evals import runner
    from evals.config import EvalConfig

    drawn = []

    def simple_evaluate(**kw):
        # HFLM on the main process: disable=(disable_tqdm or rank != 0); a task building its contexts: no disable.
        bars = [hf.tqdm(total=1, disable=False, desc="Running generate_until requests"), task.tqdm(total=1)]
        drawn.append(tuple(not bar.disable for bar in bars))
        for bar in bars:
            bar.close()
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(runner, "_task_manager", lambda *a: None)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # as the CLI sets it without --verbose
    original = hf.tqdm, task.tqdm
    for tty in (False, True):
        monkeypatch.setattr(sys, "stderr", _Stderr(tty))
        runner._run_lm_eval(str(world / "base"), runner.Suite(name="s", tasks=["t"]), None, 1,
                            EvalConfig(backend="hf"), lambda m: None)
    assert drawn == [(False, False), (True, False)] and (hf.tqdm, task.tqdm) == original


def test_merge_bar_is_drawn_on_a_terminal_only(monkeypatch):
    import torch

    from posttrain.merging.stream import with_progress

    reader = types.SimpleNamespace(numel=lambda name: 4, dtype=lambda name: torch.float32)  # 16 bytes a tensor
    for tty in (False, True):
        err = _Stderr(tty)
        monkeypatch.setattr(sys, "stderr", err)
        assert list(with_progress(["a", "b"], reader, desc="merge")) == ["a", "b"]
        assert ("merge: 100%" in err.getvalue() and "32.0/32.0" in err.getvalue()) is tty and (tty or err.getvalue() == "")
