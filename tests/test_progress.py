"""What a training stage prints: a progress line at every tenth of the steps, not transformers' log dicts and
bar (unless --verbose, POSTTRAIN_VERBOSE); every record still goes to metrics.jsonl."""
from __future__ import annotations

import json

from posttrain.progress import VERBOSE_ENV, progress_line, quiet_trainer
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
