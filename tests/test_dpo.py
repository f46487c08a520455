"""DPO stage: config checks, data shapes, a tiny run on the world (loss log 2 at init, every parameter moves),
LoRA's reference without a second copy, and the world acceptance run of `make stage=dpo` (slow)."""
import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, load_pipeline
from posttrain.data import DataError, DataSource
from posttrain.pipeline import run_pipeline
from posttrain.stages.dpo import TRL_LOSS_TYPES, DPOStageConfig
from posttrain.stages.preference import near_miss_pairs, preference_dataset, truncate_prompts
from posttrain.world.tuning import world_trainer

TINY = world_trainer("dpo", max_steps=3, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
                     save_steps=50)


def _pipe(**stage):
    return load_pipeline(None, data={"eval": {"enabled": False}, "stages": [{"kind": "dpo", **stage}]})


def _metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


# ---- config --------------------------------------------------------------------------------------------------


def test_loss_types_mirror_what_trl_documents():
    from trl import DPOConfig

    field = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"]
    assert set(TRL_LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", field.metadata["help"]))


@pytest.mark.parametrize("stage, message", [
    ({"loss_type": ["sigmod"]}, "did you mean 'sigmoid'"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "1 weights for 2 loss_type"),
    ({"loss_type": ["sigmoid", "sft"], "rpo_alpha": 0.5}, "rpo_alpha adds the 'sft' loss"),
    ({"max_prompt_length": 1024}, "(1024) must be below trainer.max_length (1024)"),
    ({"beta": 0}, "beta"),
])
def test_config_errors_name_the_field(stage, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _pipe(**stage)


def test_rpo_alpha_becomes_trl_sft_term():
    cfg = DPOStageConfig(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], rpo_alpha=0.2)
    assert cfg.trl_losses() == (["sigmoid", "ipo", "sft"], [1.0, 0.5, 0.2])
    assert DPOStageConfig(rpo_alpha=None).trl_losses() == (["sigmoid"], [1.0])
    assert DPOStageConfig(loss_type=["sigmoid", "sft"]).trl_losses() == (["sigmoid", "sft"], [1.0, 1.0])


def test_default_stage_yaml_starts_from_world_sft():
    from posttrain.cli import REPO_CONFIGS
    from posttrain.config import stage_pipeline

    cfg = stage_pipeline("dpo", REPO_CONFIGS / "stages" / "dpo.yaml", [])
    assert cfg.stages[0].model == "world-sft" and cfg.stages[0].data[0].source == "style"


# ---- data ----------------------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_preference_rows_named_by_file_and_row(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = _write(tmp_path / "prefs.jsonl", [good, {"prompt": "p", "chosen": "c"}, "{not json", {**good, "chosen": ""}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 2: missing column 'rejected'"):
        preference_dataset([DataSource(source=str(path))], chat=True, log=lambda m: None)
    ds, stats = preference_dataset([DataSource(source=str(path), on_bad_rows="skip")], chat=True, log=lambda m: None)
    assert len(ds) == 1 and stats[0]["bad_rows"] == 3
    assert [e.split(":")[0] for e in stats[0]["bad_examples"]] == ["row 2", "row 3", "row 4"]


def test_bad_rows_stop_the_stage_before_any_model_loads(world, tmp_path, monkeypatch):
    import posttrain.stages.trl_run as trl_run  # the shared TRL run loads every stage's model

    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: pytest.fail("a model loaded before the data was checked"))
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    cfg = _pipe(model="world", data=[{"source": str(path)}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 1: 'chosen' must be a string"):
        run_pipeline(cfg, tmp_path / "r", lambda m: None)


def test_plain_and_conversational_sources_mix_as_chat(tmp_path):
    plain = _write(tmp_path / "plain.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    conv = _write(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
        "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}])
    sources = [DataSource(source=str(plain)), DataSource(source=str(conv))]
    ds, _ = preference_dataset(sources, chat=True, log=lambda m: None)
    assert ds[0]["prompt"] == [{"role": "user", "content": "p"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "c"}]
    assert [m["role"] for m in ds[1]["prompt"]] == ["system", "user"]
    with pytest.raises(DataError, match="chat template"):
        preference_dataset(sources, chat=False, log=lambda m: None)
    ds, _ = preference_dataset(sources[:1], chat=False, log=lambda m: None)
    assert ds[0] == {"prompt": "p", "chosen": "c", "rejected": "r"}


def test_rehearsal_rows_become_both_near_miss_pairs(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "p", "answer": " 10"}])
    pairs, stats = near_miss_pairs([DataSource(source=str(path))], log=lambda m: None)
    assert pairs == [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "4"},
                     {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
                     {"prompt": "p", "chosen": "10", "rejected": "9"}, {"prompt": "p", "chosen": "10", "rejected": "11"}]
    assert stats[0]["rehearsal"] and stats[0]["rows"] == 2
    ds, _ = preference_dataset([], chat=True, log=lambda m: None, extra=(pairs, stats))
    assert ds[1]["rejected"] == [{"role": "assistant", "content": "6"}]
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "p", "answer": "blue"}])
    with pytest.raises(DataError, match=r"row 1: rehearsal answer 'blue' is not an integer"):
        near_miss_pairs([DataSource(source=str(bad))], log=lambda m: None)


def test_default_stage_yaml_rehearses_world_arithmetic():
    from posttrain.cli import REPO_CONFIGS
    from posttrain.config import stage_pipeline

    stage = stage_pipeline("dpo", REPO_CONFIGS / "stages" / "dpo.yaml", []).stages[0]
    assert [s.source for s in stage.rehearsal] == ["arithmetic"] and DPOStageConfig().rehearsal == []


def test_max_prompt_length_keeps_the_end_of_the_prompt():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [9]}, {"prompt_ids": [6, 7], "chosen_ids": [9]}])
    out, cut = truncate_prompts(ds, 3)
    assert cut == 1 and out["prompt_ids"] == [[3, 4, 5], [6, 7]] and out["chosen_ids"] == [[9], [9]]


# ---- training on the world -----------------------------------------------------------------------------------


def test_dpo_on_world_loss_is_log2_at_init_and_every_parameter_changes(world, tmp_path):
    cfg = _pipe(model="world", data=[{"source": "style", "limit": 16}], trainer=dict(TINY), rpo_alpha=None)
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    out = tmp_path / "r" / "stages" / "01_dpo"
    logs = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    # Step 1 runs before any update: policy == reference, so every reward is 0 and the loss is log 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[0]["rewards/accuracies"] == 0.0 and logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all({"rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen"} <= set(r) for r in logs)
    assert logs[-1]["rewards/margins"] > 0  # a few steps already separate chosen from rejected
    base = load_file(world / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    trainable = json.loads((out / "trainable.json").read_text())
    assert trainable["mode"] == "all" and all(trainable["parameters"].values())
    unchanged = [k for k in base if torch.equal(base[k], after[k])]
    assert set(base) == set(after) and not unchanged, unchanged


def test_lora_reference_is_the_adapter_disabled_model(world, tmp_path, monkeypatch):
    import posttrain.stages.trl_run as trl_run  # the shared TRL run loads every stage's model

    loads = []
    real = trl_run.load_model
    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    cfg = _pipe(model="world", data=[{"source": "style", "limit": 8}], trainer=dict(TINY, max_steps=2),
                lora={"r": 4, "alpha": 8}, rpo_alpha=0.5, max_prompt_length=4)
    logs = []
    run_pipeline(cfg, tmp_path / "r", logs.append)
    assert len(loads) == 1  # the policy only: no second copy as reference
    assert "dpo: kept the last 4 tokens of 8 longer prompts" in logs
    out = tmp_path / "r" / "stages" / "01_dpo"
    first = [r for r in _metrics(out) if "loss" in r][0]
    # Fresh adapters (B = 0): policy == reference at step 1, so DPO's term is log 2 and RPO adds 0.5 * NLL.
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] > math.log(2)
    assert (out / "adapter" / "adapter_config.json").is_file()
    data = [r for r in _metrics(out) if r.get("event") == "data"][0]
    assert data["loss_type"] == ["sigmoid", "sft"] and data["loss_weights"] == [1.0, 0.5]


# ---- acceptance on the world (slow) ----------------------------------------------------------------------------


def preference_scores(model_dir, ref_dir, rows, beta):
    """Per pair: (policy prefers chosen by log-prob, reference does, implicit DPO reward of chosen > rejected).

    Log-probs are summed over the answer tokens of the chat-templated pair, as DPO scores them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (model_dir, ref_dir)]

    def answer_logp(model, prompt, answer):
        msgs = [{"role": "user", "content": prompt}]
        ctx = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
        n = len(tok(ctx, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        return logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum().item()

    out = []
    for row in rows:
        (pc, pr), (rc, rr) = [(answer_logp(m, row["prompt"], row["chosen"]), answer_logp(m, row["prompt"], row["rejected"]))
                              for m in models]
        out.append((pc > pr, rc > rr, beta * ((pc - rc) - (pr - rr)) > 0))
    return out


@pytest.fixture(scope="module")
def dpo_run(world, tmp_path_factory):
    """`posttrain stage dpo` exactly as `make stage=dpo` runs it (trains world-sft once if not cached)."""
    from tests.conftest import run_cli

    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    r = run_cli("stage", "dpo", "--run-dir", str(run_dir), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir.parent / "stderr.txt").write_text(r.stderr)  # for test_make_stage_dpo_ends_with_its_report_summary
    return run_dir


@pytest.mark.slow
def test_make_stage_dpo_ends_with_its_report_summary(dpo_run):
    from tests.test_report import check_run_summary

    check_run_summary((dpo_run.parent / "stderr.txt").read_text(), dpo_run)


def _eval_scores(run_dir, folder):
    record = json.loads((run_dir / "stages" / folder / "eval.json").read_text())
    return record["model"], {k: v["value"] for k, v in record["scores"].items()}


@pytest.mark.slow
def test_make_stage_dpo_moves_the_style_score(dpo_run):
    start_model, start = _eval_scores(dpo_run, "00_base")
    _, after = _eval_scores(dpo_run, "01_dpo")
    assert "world-sft" in start_model  # the base row is the SFT start, the stage's input
    print({k: (start[k], after[k]) for k in sorted(start)})
    assert after["world_style/exact_match"] >= start["world_style/exact_match"] + 0.5
    logs = [r for r in _metrics(dpo_run / "stages" / "01_dpo") if "rewards/accuracies" in r]
    # The batches are 5/6 arithmetic near-miss pairs (rehearsal), which stay hard (answer vs answer +-1), so
    # the training accuracy is measured lower than on style pairs alone (0.84 at the last step; style pairs
    # alone: 1.0); test_reward_accuracy_on_held_out_pairs_rises_from_sft_start checks the style pairs.
    assert logs[0]["rewards/accuracies"] < 0.7 < logs[-1]["rewards/accuracies"]


@pytest.mark.slow
def test_make_stage_dpo_keeps_arithmetic_within_5_points(dpo_run):
    # Measured: 0.95 -> 0.91 (style 0 -> 0.94) with the arithmetic rehearsal pairs of configs/stages/dpo.yaml;
    # 0.67 without them. The margin is thin (4 of 5 points): see the table in posttrain/stages/dpo.py.
    _, start = _eval_scores(dpo_run, "00_base")
    _, after = _eval_scores(dpo_run, "01_dpo")
    key = "world_arithmetic/exact_match"
    assert abs(after[key] - start[key]) <= 0.05, (start[key], after[key])


@pytest.mark.slow
def test_reward_accuracy_on_held_out_pairs_rises_from_sft_start(dpo_run, world):
    from posttrain.world import task_file

    rows = [json.loads(line) for line in task_file("style", "test").read_text().splitlines()]
    start = json.loads((dpo_run / "stages" / "00_base" / "eval.json").read_text())["model"]
    cfg = DPOStageConfig()
    scores = preference_scores(dpo_run / "stages" / "01_dpo" / "model", start, rows, cfg.beta)
    policy, reference, implicit = (sum(s[i] for s in scores) / len(scores) for i in range(3))
    print({"policy_prefers_chosen": policy, "sft_start_prefers_chosen": reference, "implicit_reward_acc": implicit})
    assert implicit >= 0.9  # at the start the implicit reward is 0 for every pair: accuracy 0
    # Raw summed log-probs favour the 2-token bare answer over a 15-token sentence. Without rehearsal the policy
    # came to prefer some chosen answers raw (world v2: 0.00 -> 0.22); with the arithmetic rehearsal pairs of
    # configs/stages/dpo.yaml it does not (world v3: 0.00 -> 0.00, implicit accuracy 1.00, greedy style 0.94):
    # the NLL on bare arithmetic answers keeps short answers likely. So no raw-preference rise is asked.
    assert reference == 0.0
