"""The reward stage (TRL's RewardTrainer: a sequence-classification model on preference pairs) and the
`reward_model` reward that scores with its output: TRL's defaults, a later stage refused as a reward model's
language-model successor, one pipeline (reward with HFT, reward with LoRA, GRPO and RLOO with HFT scoring with
the first; evals stubbed: the reward stages get no row), and the reward's right/wrong test on a reward model
trained here."""
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.cli import REPO_CONFIGS
from posttrain.config import ConfigError, load_pipeline, stage_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.registry import STAGES
from posttrain.rewards import RewardSpec, build_reward_funcs

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
        "save_steps": 50, "max_length": 96, "gradient_checkpointing": False}


def _digests(folder) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in load_file(folder / "model.safetensors").items()}


def test_reward_defaults_are_trls():
    from trl import RewardConfig

    cfg, trl = STAGES.get("reward").config(), RewardConfig(output_dir="unused", use_cpu=True)
    assert (cfg.trainer.learning_rate, cfg.center_rewards_coefficient) == (trl.learning_rate,
                                                                           trl.center_rewards_coefficient)
    assert [s.source for s in cfg.data] == ["style"] and not cfg.generates()
    stage = stage_pipeline("reward", REPO_CONFIGS / "stages" / "reward.yaml", []).stages[0]
    assert stage.kind == "reward" and stage.model == "world-sft" and stage.trainer.learning_rate > 1e-4


@pytest.mark.parametrize("second", [{"kind": "sft"}, {"kind": "dpo", "model": "${stages.rm.model}"}])
def test_a_language_model_stage_on_a_reward_models_output_is_refused(second):
    stages = [{"name": "rm", "kind": "reward"}, {"name": "next", **second}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.model: .*is a reward model"):
        load_pipeline(None, data={"stages": stages})
    load_pipeline(None, data={"stages": [stages[0], {"kind": "reward"}]})  # a reward stage may train it further


@pytest.mark.parametrize("second, field", [
    ({"kind": "merge", "method": "linear", "models": [{"model": "${stages.rm.model}"}, {"model": "world"}]}, "merge"),
    ({"kind": "transfer", "source_base": "world", "source_finetuned": "${stages.rm.model}", "target_base": "world"},
     "transfer")])
def test_a_merge_or_transfer_of_a_reward_models_weights_is_refused_at_load(second, field):
    stages = [{"name": "rm", "kind": "reward"}, {"name": "next", **second}]
    with pytest.raises(ConfigError) as e:
        load_pipeline(None, data={"stages": stages})
    assert str(e.value).endswith(f"stages[1] (next): ${{stages.rm.model}} is a reward model (it scores text and "
                                 f"generates none); a {field} stage combines language models' weights")


@pytest.fixture(scope="module")
def reward_run(world, tmp_path_factory):
    """One pipeline: a reward model with HFT (30 steps: it learns to rank the style pairs), one with LoRA, and
    two GRPO steps and two RLOO steps (with HFT) scored by the first (evals stubbed; the reward stages get no
    eval row)."""
    import evals.runner

    evaluated = []

    def fake(model_dir, *a, **k):
        evaluated.append(str(model_dir))
        return {"scores": {"world_style/exact_match": {"value": 0.5, "stderr": 0.0}}, "seconds": 0.0,
                "backend": "fake", "lm_eval": {}, "task_configs": {}}

    real, evals.runner._run_lm_eval = evals.runner._run_lm_eval, fake
    data = [{"source": "style", "limit": 64}]
    stages = [
        {"name": "rm", "kind": "reward", "model": "world-sft", "data": data, "trainable": {"mode": "hft", "seed": 0},
         "trainer": {**TINY, "max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3e-3}},
        {"name": "rm_lora", "kind": "reward", "model": "world", "data": data[:1], "trainer": TINY,
         "lora": {"r": 4, "alpha": 8}},
        {"name": "rl", "kind": "grpo", "model": "world", "data": [{"source": "verifiable", "limit": 4}],
         "rewards": [{"name": "reward_model", "params": {"model": "${stages.rm.model}"}}],
         "num_generations": 2, "max_completion_length": 4, "rollout": {"backend": "hf"},
         "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
                     "gradient_checkpointing": False}},
        {"name": "rloo", "kind": "rloo", "model": "world", "data": [{"source": "verifiable", "limit": 4}],
         "rewards": [{"name": "reward_model", "params": {"model": "${stages.rm.model}"}}],
         "num_generations": 2, "max_completion_length": 4, "rollout": {"backend": "hf"},
         "trainable": {"mode": "hft", "seed": 0},
         "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
                     "gradient_checkpointing": False}},
    ]
    run_dir = tmp_path_factory.mktemp("reward") / "r"
    logs = []
    try:
        run_pipeline(load_pipeline(None, data={"eval": {"limit": 2}, "stages": stages}), run_dir, logs.append)
    finally:
        evals.runner._run_lm_eval = real
    return run_dir, evaluated, logs


def test_reward_stages_write_scorers_with_no_eval_row(world, reward_run):
    from transformers import AutoModelForSequenceClassification

    run_dir, evaluated, logs = reward_run
    assert not any("01_rm" in m or "02_rm_lora" in m for m in evaluated) and any("03_rl" in m for m in evaluated)
    rows = json.loads((run_dir / "report" / "forgetting.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["base", "rl", "rloo"]
    assert all("rm" not in r.get("parents", []) for r in rows)  # a scorer is an input, not an ancestor
    assert any("01 rm] eval: its model scores text" in line for line in logs)
    for name in ("01_rm", "02_rm_lora"):
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "stages" / name / "model")
        assert model.config.num_labels == 1 and (run_dir / "stages" / name / "DONE").is_file()
    # HFT: the frozen half of the body is bit-identical to the input's; the new score head trained.
    out = run_dir / "stages" / "01_rm"
    before = _digests(_input_folder(run_dir, "rm"))
    after = _digests(out / "model")
    mask = json.loads((out / "trainable.json").read_text())["parameters"]
    shared = set(before) & set(after)
    assert "score.weight" in mask and mask["score.weight"] and "score.weight" not in before
    assert [n for n in shared if not mask[n] and before[n] != after[n]] == []
    assert 0 < sum(bool(mask[n]) for n in shared) < len(shared)
    lora = run_dir / "stages" / "02_rm_lora"
    assert (lora / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((lora / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in (adapter["modules_to_save"] or [])


def _input_folder(run_dir, name):
    from posttrain.models import resolve_model

    stages = yaml.safe_load((run_dir / "pipeline.yaml").read_text())["stages"]
    return Path(resolve_model(next(s for s in stages if s["name"] == name)["model"]))


@pytest.mark.parametrize("folder", ["03_rl", "04_rloo"])
def test_grpo_and_rloo_score_with_the_reward_stages_model(reward_run, folder):
    run_dir, _, _ = reward_run
    records = [json.loads(x) for x in (run_dir / "stages" / folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/reward_model/mean" in r]
    assert len(steps) == 2 and not [k for r in steps for k, v in r.items() if k.startswith("rewards/errors/") and v]
    assert len({r["rewards/reward_model/mean"] for r in steps}) == 2  # real scores, not a constant fallback
    done = json.loads((run_dir / "stages" / folder / "DONE").read_text())
    assert done["metrics"]["rewards/failed_every_call"] == []


def test_rloo_with_hft_keeps_its_frozen_half(world, reward_run):
    run_dir, _, _ = reward_run
    out = run_dir / "stages" / "04_rloo"
    before, after = _digests(world / "base"), _digests(out / "model")
    mask = json.loads((out / "trainable.json").read_text())["parameters"]
    assert set(mask) == set(before) == set(after) and 0 < sum(mask.values()) < len(mask)
    assert [n for n, on in mask.items() if not on and before[n] != after[n]] == []
    assert [n for n, on in mask.items() if on and before[n] != after[n]]  # something trained


def test_reward_model_scores_a_right_completion_above_a_wrong_one(reward_run):
    """The reward model trained on the style pairs scores held-out prompts' "Certainly! ..." answers above the
    bare ones, through the reward registry, as GRPO and RLOO call it (chat prompts, text completions)."""
    run_dir, _, _ = reward_run
    rows = [json.loads(x) for x in (_world_style_test()).read_text().splitlines()][:16]
    funcs, _ = build_reward_funcs([RewardSpec(name="reward_model",
                                              params={"model": str(run_dir / "stages" / "01_rm" / "model")})])
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    right = funcs[0](prompts=prompts, completions=[r["chosen"] for r in rows])
    wrong = funcs[0](prompts=prompts, completions=[r["rejected"] for r in rows])
    assert sum(r > w for r, w in zip(right, wrong)) >= 14, (right, wrong)
    assert not any(funcs[0].stats.as_metrics().values())  # no error of any kind


def _world_style_test():
    from posttrain.world import world_dir

    folder = world_dir() / "data" / "style"
    return next(folder / f for f in ("test.jsonl", "validation.jsonl", "train.jsonl") if (folder / f).is_file())


def test_a_language_model_as_reward_model_is_refused_before_training(world, tmp_path, capsys):
    """A causal LM would load with a new, random score head and score noise: refused in one line, exit 2."""
    from posttrain.cli import main

    sets = ["eval.enabled=false", "model=world", "data=[{source: verifiable, limit: 4}]",
            "rewards=[{name: reward_model, params: {model: world}}]"]
    assert main(["stage", "rloo", "--run-dir", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "is not a sequence-classification model (architectures: LlamaForCausalLM)" in err
    assert not list((tmp_path / "r" / "stages").glob(".01_rloo.tmp/checkpoints/*"))


def test_a_reward_model_folder_as_a_merges_model_is_refused_before_the_run(reward_run, tmp_path):
    """A reward model given by its folder (no stage ref to see at load): refused by the pre-run input check,
    before a run dir or the base eval; as a GRPO reward's scorer (above) the same folder is taken."""
    run_dir, *_ = reward_run
    folder = str(run_dir / "stages" / "01_rm" / "model")
    cfg = load_pipeline(None, data={"stages": [{"name": "m", "kind": "merge", "method": "linear",
                                                "models": [{"model": folder}, {"model": "world"}]}]})
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg, tmp_path / "r", lambda m: None)
    assert str(e.value) == (f"stages[0] (m): {folder} is a reward model (a sequence classifier: it scores text and "
                            "generates none); a merge stage needs a language model")
    assert not (tmp_path / "r").exists()
