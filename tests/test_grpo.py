"""GRPO stage: tiny runs on the world base (parameters move, rewards and their errors are logged), config
errors, prompts for tokenizers with and without a chat template, the epoch order of the prompt sampler, reruns
after a reward file or a module next to it changes, rewards that never score, and the slow acceptance run of
`posttrain stage grpo` from world-sft."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer
from tests.test_report import check_run_summary

# A reward with a guaranteed spread inside every group, so every step has a non-zero advantage (GRPO's
# gradient is zero when a group's rewards are all equal) and every trainable tensor must move.
SPREAD = '''
def spread(completions, answer, **kwargs):
    return [float(i % 2) for i in range(len(completions))]
'''
# Rewards that misbehave in the sandbox: a hard crash (SIGSEGV) and a hang past the time limit.
BAD = '''
import os, signal, time

def segfault(completions, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)

def hang(completions, **kwargs):
    time.sleep(60)
'''


def _tiny_stage(**over):
    """Two steps of 2 prompts x 2 completions, 4 new tokens each, from the world base."""
    stage = {
        "kind": "grpo", "model": "world",
        "data": [{"source": "verifiable", "limit": 16}],
        "num_generations": 2, "max_completion_length": 4,
        "trainer": world_trainer("grpo", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                                 learning_rate=1e-3),
    }
    stage.update(over)
    return stage


def _run(tmp_path, stage):
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [stage]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    return tmp_path / "r" / "stages" / "01_grpo"


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_grpo_moves_every_parameter_and_logs_rewards(world, tmp_path):
    (tmp_path / "spread.py").write_text(SPREAD)
    out = _run(tmp_path, _tiny_stage(rewards=[{"name": "numeric_match"}, {"name": f"{tmp_path}/spread.py:spread"}]))
    before = load_file(world / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"trainable tensors that did not move: {unchanged}"
    steps = [r for r in _records(out) if "rewards/numeric_match/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0.0 <= r["rewards/numeric_match/mean"] <= 1.0
        assert r["rewards/spread/mean"] == 0.5 and "reward" in r and "kl" not in r  # beta 0: no reference model
        assert r["rewards/errors/exception"] == 0.0
    data = next(r for r in _records(out) if r.get("event") == "data")
    assert data["rollout"] == "hf" and data["rewards"] == ["numeric_match", "spread"]
    done = json.loads((out / "DONE").read_text())
    assert done["metrics"]["global_step"] == 2 and done["metrics"]["rewards/errors/timeout"] == 0.0


def test_crashing_and_hanging_rewards_are_counted_and_training_finishes(world, tmp_path):
    """HFT on top: the frozen half of the model must come out bit-identical."""
    bad = tmp_path / "bad.py"
    bad.write_text(BAD)
    (tmp_path / "spread.py").write_text(SPREAD)
    out = _run(tmp_path, _tiny_stage(
        rewards=[
            {"name": f"{tmp_path}/spread.py:spread"},
            {"name": f"{bad}:segfault", "sandbox": True, "timeout_s": 5},
            {"name": f"{bad}:hang", "sandbox": True, "timeout_s": 0.5},
        ],
        trainable={"mode": "hft"},
    ))
    assert (out / "model" / "model.safetensors").is_file()
    last = [r for r in _records(out) if "rewards/hang/mean" in r][-1]  # the last step's record
    completions = 2 * 4  # steps x completions per step; each bad reward fails on every one of them
    assert last["rewards/errors/crash"] == completions and last["rewards/errors/segfault/crash"] == completions
    assert last["rewards/errors/timeout"] == completions and last["rewards/errors/hang/timeout"] == completions
    assert last["rewards/segfault/mean"] == 0.0 and last["rewards/hang/mean"] == 0.0
    done = json.loads((out / "DONE").read_text())["metrics"]
    assert done["rewards/errors/crash"] == completions and done["global_step"] == 2
    # Each bad reward scored nothing: named, while `spread` trained the model, so the stage is done.
    assert done["rewards/failed_every_call"] == ["segfault", "hang"]
    trainable = json.loads((out / "trainable.json").read_text())
    frozen = [n for n, on in trainable["parameters"].items() if not on]
    before = load_file(world / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen if n in before)
    trained = [n for n, on in trainable["parameters"].items() if on and n in before]
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained)


def test_lora_grpo_writes_adapter_and_merged_model(world, tmp_path):
    (tmp_path / "spread.py").write_text(SPREAD)
    out = _run(tmp_path, _tiny_stage(rewards=[{"name": f"{tmp_path}/spread.py:spread"}], lora={"r": 4, "alpha": 8},
                                     trainer=world_trainer("grpo", max_steps=1, per_device_train_batch_size=4,
                                                           logging_steps=1, learning_rate=1e-2)))
    assert (out / "adapter" / "adapter_config.json").is_file()
    before = load_file(world / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert set(before) == set(after)  # merged: plain weights, no lora_ tensors
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)


def test_rewards_that_never_scored_are_named_and_fail_the_stage_only_when_they_are_all(world, tmp_path):
    from posttrain.rewards import RewardsFailed, RewardStats
    from posttrain.stages.grpo_support import failed_rewards

    stats, lines = RewardStats(), []
    stats.rows("a", failed=4), stats.record("a", "exception"), stats.rows("b", scored=4)
    assert failed_rewards(stats, ["a", "b"], lines.append) == ["a"]
    assert lines == ["warning: reward 'a' failed on every completion of this run (exception: 1); it scored none, "
                     "so it gave the training no signal"]
    assert failed_rewards(RewardStats(), ["a"], lines.append) == [] and len(lines) == 1  # no call: no failure
    # The only reward raised on every call (rw_raise.py): training "succeeded" on all-zero rewards.
    (tmp_path / "raise.py").write_text("def digits(completions, **kw):\n    raise RuntimeError('boom')\n")
    with pytest.raises(RewardsFailed, match=r"every reward failed on every completion \('digits'\)"):
        _run(tmp_path, _tiny_stage(rewards=[{"name": f"{tmp_path}/raise.py:digits"}]))
    assert not (tmp_path / "r" / "stages" / "01_grpo").exists()  # not done: no DONE, later stages do not run
    work = tmp_path / "r" / "stages" / ".01_grpo.tmp"
    assert (work / "model" / "model.safetensors").is_file()
    assert [r["rewards/errors/exception"] for r in _records(work) if "rewards/digits/mean" in r] == [1.0, 2.0]


def test_unknown_reward_is_a_config_error_with_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.rewards\[0\]\.name.*did you mean 'numeric_match'"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rewards": [{"name": "numeric_mach"}]}]})
    (tmp_path / "r.py").write_text("def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=r"defines no function 'scor'.*did you mean 'score'"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rewards": [{"name": f"{tmp_path}/r.py:scor"}]}]})
    (tmp_path / "imp.py").write_text("from helpr import X\ndef score(completions, **kw):\n    return []\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.name.*imp.py': no module named 'helpr' \(did you mean "
                                          r"'helper'"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rewards": [{"name": f"{tmp_path}/imp.py:score"}]}]})


def test_group_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"multiple of num_generations \(3\)"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "num_generations": 3}]})


def test_defaults_start_from_world_sft_with_numeric_match_on_verifiable():
    from posttrain.stages.grpo import GRPOStageConfig

    cfg = GRPOStageConfig()
    assert cfg.model == "world-sft" and [d.source for d in cfg.data] == ["verifiable"]
    assert [r.name for r in cfg.rewards] == ["numeric_match"] and cfg.rollout.backend == "auto"


def test_epoch_sampler_orders_each_epoch_by_seed_and_epoch_only():
    """A resumed trainer builds a fresh sampler and sets the epoch: it must give the epoch the order the
    uninterrupted run's sampler gave it after its earlier epochs. Epoch 0 keeps TRL's order."""
    from trl.trainer.utils import RepeatSampler

    from posttrain.stages.grpo_support import epoch_sampler

    kw = dict(data_source=list(range(8)), mini_repeat_count=2, batch_size=2, repeat_count=1, seed=42)
    running, orders = epoch_sampler(**kw), []
    for epoch in range(3):
        running.set_epoch(epoch)
        orders.append(list(running))
    fresh = epoch_sampler(**kw)
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[1]) == sorted(orders[0])
    assert orders[0] == list(RepeatSampler(**kw))


def test_prompt_rows_are_chat_with_a_template_and_plain_without():
    from posttrain.data import DataError
    from posttrain.stages.grpo_support import prompt_rows

    chat = [{"role": "user", "content": "Compute 1 + 1."}]
    rows = [{"prompt": "Compute 1 + 1.", "answer": "2"}, {"prompt": chat, "answer": "2"}]
    assert prompt_rows(rows, chat=True) == [{"prompt": chat, "answer": "2"}] * 2
    assert prompt_rows(rows[:1], chat=False) == rows[:1]
    with pytest.raises(DataError, match="conversational prompts need a tokenizer with a chat template"):
        prompt_rows(rows, chat=False)


@pytest.fixture
def no_template_model(world, tmp_path):
    """The world base without its chat template (a GPT-2-style base as far as prompts go)."""
    folder = tmp_path / "base_no_template"
    shutil.copytree(world / "base", folder, ignore=shutil.ignore_patterns("chat_template.jinja"))
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return folder


def test_tokenizer_without_chat_template_trains_on_plain_prompts(no_template_model, tmp_path):
    out = _run(tmp_path, _tiny_stage(model=str(no_template_model)))
    assert json.loads((out / "DONE").read_text())["metrics"]["global_step"] == 2


def test_conversational_prompts_without_chat_template_exit_2_before_the_model_loads(
        no_template_model, tmp_path, monkeypatch, capsys):
    import posttrain.stages.trl_run as trl_run  # the shared TRL run loads every stage's model
    from posttrain.cli import main

    def no_load(*a, **kw):
        raise AssertionError("the model loaded before the data check")

    monkeypatch.setattr(trl_run, "load_model", no_load)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "Compute 1 + 1."}], "answer": "2"}) + "\n")
    code = main(["stage", "grpo", "--set", "eval.enabled=false", "--set", f"model={no_template_model}",
                 "--set", f"data=[{{source: '{data}'}}]", "--run-dir", str(tmp_path / "r")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2
    assert errors == ["error: conversational prompts need a tokenizer with a chat template; this one has none"]


def test_input_files_are_the_reward_files_as_the_loader_resolves_them_and_the_py_files_next_to_them(
        tmp_path, monkeypatch):
    from posttrain.stages.grpo import GRPOStageConfig

    (tmp_path / "r.py").write_text(SPREAD)
    (tmp_path / "helper.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "deep.py").write_text("Y = 1\n")  # not followed: the folder only, not below it
    monkeypatch.chdir(tmp_path)
    cfg = GRPOStageConfig(rewards=[{"name": "numeric_match"}, {"name": "r.py:spread"},
                                   {"name": "r.py:spread", "sandbox": True}])
    assert cfg.input_files() == [str(tmp_path / "helper.py"), str(tmp_path / "r.py")]
    assert GRPOStageConfig().input_files() == []


# A reward whose numbers come from a module next to it.
SPREAD_WITH_HELPER = '''
from spread_helper import OFFSET

def spread(completions, answer, **kwargs):
    return [float((i + OFFSET) % 2) for i in range(len(completions))]
'''


def test_editing_a_reward_file_or_a_module_next_to_it_reruns_a_finished_stage(world, tmp_path, monkeypatch):
    reward = tmp_path / "spread.py"
    reward.write_text(SPREAD_WITH_HELPER)
    (tmp_path / "spread_helper.py").write_text("OFFSET = 0\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the reward's folder joins it
    monkeypatch.delitem(sys.modules, "spread_helper", raising=False)
    stage = _tiny_stage(rewards=[{"name": f"{reward}:spread"}],
                        trainer=world_trainer("grpo", max_steps=1, per_device_train_batch_size=4, save_steps=5))
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [stage]})

    def run():
        lines = []
        run_pipeline(cfg, tmp_path / "r", lines.append)
        return [line for line in lines if line.startswith("[01 grpo]")]

    run()
    out = tmp_path / "r" / "stages" / "01_grpo"
    assert [r["rewards/spread/mean"] for r in _records(out) if "rewards/spread/mean" in r] == [0.5]
    assert json.loads((out / "DONE").read_text())["metrics"]["rewards/errors/exception"] == 0.0
    assert any("done already; skipping" in line for line in run())
    for edited, text in [(tmp_path / "spread_helper.py", "OFFSET = 1\n"),
                         (reward, SPREAD_WITH_HELPER.replace("i + OFFSET", "OFFSET + i"))]:
        edited.write_text(text)
        again = run()
        assert any("rerunning" in line for line in again) and not any("skipping" in line for line in again)
        assert any("skipping" in line for line in run())


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_default_stage_raises_reward_and_keeps_verifiable_accuracy(tmp_path):
    """`posttrain stage grpo` as `make stage=grpo` runs it, from world-sft."""
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    r = run_cli("stage", "grpo", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    check_run_summary(r.stderr, run_dir)  # it ends with the summary, forgetting.json's figures
    stage = run_dir / "stages" / "01_grpo"
    rewards = [rec["reward"] for rec in _records(stage) if "reward" in rec]
    fifth = max(1, len(rewards) // 5)
    first, last = _mean(rewards[:fifth]), _mean(rewards[-fifth:])
    assert last > first, (first, last, rewards)
    key = "world_verifiable/exact_match"
    base = json.loads((run_dir / "stages" / "00_base" / "eval.json").read_text())  # the stage's input: world-sft
    after = json.loads((stage / "eval.json").read_text())
    assert "world-sft" in base["model"]
    assert after["scores"][key]["value"] >= base["scores"][key]["value"], (base["scores"][key], after["scores"][key])
    print(f"reward first fifth {first:.3f} -> last fifth {last:.3f}; {key} "
          f"{base['scores'][key]['value']:.3f} -> {after['scores'][key]['value']:.3f}")


@pytest.mark.slow
def test_sft_dpo_grpo_pipeline_reports_every_stage_on_the_world_suite(tmp_path):
    """configs/pipelines/sft_dpo_grpo.yaml: the report holds base, SFT, DPO and GRPO with their measured scores."""
    from tests.conftest import REPO, run_cli

    run_dir = tmp_path / "run"
    r = run_cli("run", str(REPO / "configs" / "pipelines" / "sft_dpo_grpo.yaml"), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    check_run_summary(r.stderr, run_dir)  # three stages in the table, each forgetting.json's figures
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "sft", "dpo", "grpo"]
    folders = {"base": "00_base", "sft": "01_sft", "dpo": "02_dpo", "grpo": "03_grpo"}
    tasks = {"world_arithmetic/exact_match", "world_facts/acc", "world_reversal/exact_match",
             "world_style/exact_match", "world_verifiable/exact_match"}
    for row in report["stages"]:
        measured = json.loads((run_dir / "stages" / folders[row["name"]] / "eval.json").read_text())["scores"]
        assert set(row["scores"]) == tasks
        assert {k: v["value"] for k, v in row["scores"].items()} == {k: measured[k]["value"] for k in tasks}
    table = (run_dir / "report" / "forgetting.md").read_text()
    assert all(f"| {name} " in table for name in folders) and (run_dir / "report" / "forgetting.png").is_file()
