"""Real-model recipes (configs/recipes/): they validate offline, and their column mappings fit the hub datasets.

Nothing downloads and nothing trains. Each hub dataset a recipe names is stood in for by a small local JSONL
with the columns its dataset card lists (names, nesting, types); every data source of every stage is pointed
at its stand-in and read through `posttrain.data.load_rows` with the stage's row shape, exactly as the stage
reads the real thing. A recipe that names a dataset without a stand-in here fails, so a new recipe brings its
fixture along.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.config import PipelineConfig, load_pipeline
from posttrain.data import KEEP, DataSource, load_rows
from posttrain.world.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
SHAPE = {"sft": "sft", "dpo": "preference", "grpo": "prompt"}  # the row shape each trainable kind reads
STAGE_REF = re.compile(r"^\$\{stages\.([A-Za-z0-9_.-]+)\.model\}$")


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------------------ hub stand-ins
# hub name -> rows with the hub dataset's columns. The expected rows after loading are derived per shape below.

SFT_MIXTURE = [  # allenai/tulu-3-sft-mixture: id, messages, source
    {"id": "oasst1_17", "source": "ai2-adapt-dev/oasst1_converted",
     "messages": [_msg("user", "What is 2 + 2?"), _msg("assistant", "2 + 2 = 4.")]},
    {"id": "flan_v2_3", "source": "ai2-adapt-dev/flan_v2_converted",
     "messages": [_msg("system", "Answer briefly."), _msg("user", "Capital of France?"), _msg("assistant", "Paris."),
                  _msg("user", "And of Italy?"), _msg("assistant", "Rome.")]},
]
PREFERENCES = [  # allenai/llama-3.1-tulu-3-8b-preference-mixture: id, source, prompt (str), chosen/rejected (messages)
    {"id": "p1", "source": "allenai/tulu-3-sft-reused-on-policy-8b", "prompt": "Name a prime number.",
     "chosen": [_msg("user", "Name a prime number."), _msg("assistant", "7 is prime.")],
     "rejected": [_msg("user", "Name a prime number."), _msg("assistant", "8 is prime.")]},
    {"id": "p2", "source": "allenai/tulu-3-wildchat-if-on-policy-8b", "prompt": "Say hi in lowercase.",
     "chosen": [_msg("user", "Say hi in lowercase."), _msg("assistant", "hi")],
     "rejected": [_msg("user", "Say hi in lowercase."), _msg("assistant", "HI")]},
]
RLVR = [  # allenai/RLVR-GSM-MATH-IF-Mixed-Constraints: messages (the prompt), ground_truth (str), dataset,
    # constraint_type, constraint (IF rows; the IF ground truth is the verifier's arguments as JSON)
    {"messages": [_msg("user", "Natalia sold 48 clips in April and half as many in May. How many in all?")],
     "ground_truth": "72", "dataset": "gsm8k", "constraint_type": None, "constraint": None},
    {"messages": [_msg("user", "Compute $\\frac{3}{6}$ in lowest terms.")],
     "ground_truth": "\\frac{1}{2}", "dataset": "MATH", "constraint_type": None, "constraint": None},
    {"messages": [_msg("user", "Write about the sea in exactly 3 paragraphs.")],
     "ground_truth": json.dumps({"func_name": "verify_paragraph_count", "N": 3}), "dataset": "ifeval",
     "constraint_type": "Number Paragraphs", "constraint": "There should be exactly 3 paragraphs."},
]
PERSONAS_MATH = [  # allenai/tulu-3-sft-personas-math: id, prompt, messages
    {"id": "personas_math_1", "prompt": "A farmer has 3 fields of 4 acres. Total acres?",
     "messages": [_msg("user", "A farmer has 3 fields of 4 acres. Total acres?"), _msg("assistant", "3 × 4 = 12.")]},
]
PERSONAS_IF = [  # allenai/tulu-3-sft-personas-instruction-following: id, prompt, messages, constraints
    {"id": "personas_IF_1", "prompt": "Describe a cat. Use no commas.", "constraints": ["punctuation:no_comma"],
     "messages": [_msg("user", "Describe a cat. Use no commas."), _msg("assistant", "A cat is a small furry pet.")]},
]

STAND_INS: dict[str, list[dict]] = {
    "allenai/tulu-3-sft-mixture": SFT_MIXTURE,
    "allenai/llama-3.1-tulu-3-8b-preference-mixture": PREFERENCES,
    "allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": RLVR,
    "allenai/tulu-3-sft-personas-math": PERSONAS_MATH,
    "allenai/tulu-3-sft-personas-instruction-following": PERSONAS_IF,
}


def _expected(hub: str, shape: str) -> list[dict]:
    """The columns the stage's trainer reads, with the values they must carry after loading."""
    rows = STAND_INS[hub]
    if shape == "sft":
        return [{"messages": r["messages"]} for r in rows]
    if shape == "preference":
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    return [{"prompt": r["messages"], "answer": r["ground_truth"]} for r in rows]  # prompt: RLVR only


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data_stages(cfg: PipelineConfig):
    return [s for s in cfg.stages if s.kind in SHAPE]


def _local(src: DataSource, tmp_path: Path) -> DataSource:
    """The same DataSource (split, columns, limit, on_bad_rows) reading a local stand-in of its hub dataset."""
    assert src.source in STAND_INS, f"{src.source}: no local stand-in in tests/test_recipes.py; add one"
    file = _write_jsonl(tmp_path / (src.source.replace("/", "__") + ".jsonl"), STAND_INS[src.source])
    return DataSource.model_validate({**src.model_dump(), "source": str(file)})


def _rows(stage, tmp_path: Path) -> list[tuple[DataSource, list[dict], dict]]:
    out = []
    for src in stage.data:
        rows, stats = load_rows(_local(src, tmp_path), SHAPE[stage.kind], log=lambda _msg: None)
        out.append((src, rows, stats))
    return out


def _ids(path: Path) -> str:
    return path.name


# ---------------------------------------------------------------------------------------------------- tests


def test_the_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert {"tulu3_qwen2.5-0.5b.yaml", "tulu3_llama3.2-1b.yaml", "tulu3_qwen2.5-0.5b_hft.yaml",
            "merge_qwen2.5-0.5b.yaml", "transfer_qwen2.5_to_coder.yaml"} <= names


@pytest.fixture
def offline(monkeypatch):
    """Make any model resolution, world build or hub access during validation an error."""
    import huggingface_hub

    import posttrain.models
    import posttrain.world

    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to resolve or fetch something: {args[:1]}")

    monkeypatch.setattr(posttrain.models, "resolve_model", refuse)
    for name in ("world_dir", "base_model", "task_file"):
        monkeypatch.setattr(posttrain.world, name, refuse)
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_validates_offline_and_names_its_models(path, offline):
    """load_pipeline checks every key without resolving a hub name; and no stage falls back to a world model."""
    cfg = load_pipeline(path)
    assert cfg.eval.suite == "standard"
    first = cfg.stages[0]
    # A first stage without `model:` would start from the embedded world's 1M-parameter base.
    assert first.model and first.model.count("/") == 1, f"{first.name}: model must be a hub name, got {first.model!r}"
    for stage in cfg.stages:
        if stage.kind == "grpo":  # a grpo stage defaults to world-sft, not the previous stage
            assert stage.model and not stage.model.startswith("world"), stage.name
        for src in stage.training_data():
            assert src.source not in TASKS, f"{stage.name}: {src.source} is a world task"


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_stage_references_name_earlier_stages(path):
    """`${stages.<name>.model}` is resolved only at run time; a typo would fail after hours of training."""
    cfg = load_pipeline(path)
    earlier: list[str] = []
    for stage in cfg.stages:
        refs = [stage.model] + [m.model for m in getattr(stage, "models", None) or []]
        refs += [getattr(stage, k, None) for k in ("base", "source_base", "source_finetuned", "target_base")]
        for ref in filter(None, refs):
            m = STAGE_REF.match(ref)
            if m:
                assert m.group(1) in earlier, f"{path.name}: {stage.name} refers to {ref}; earlier: {earlier}"
        earlier.append(stage.name)


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_columns_fit_hub_datasets(path, tmp_path):
    """Every data source of every stage, read from a stand-in with the hub's columns, gives the trainer its rows."""
    cfg = load_pipeline(path)
    for stage in _data_stages(cfg):
        shape = SHAPE[stage.kind]
        for src, rows, stats in _rows(stage, tmp_path):
            want = _expected(src.source, shape)
            assert stats["bad_rows"] == 0 and len(rows) == len(want), (stage.name, stats)
            assert [{k: r.get(k) for k in w} for r, w in zip(rows, want)] == want, stage.name
            assert all(set(r) <= set(KEEP[shape]) for r in rows), stage.name  # hub-only columns are dropped


def test_tulu3_recipes_read_the_three_tulu3_datasets():
    for name in ("tulu3_qwen2.5-0.5b.yaml", "tulu3_llama3.2-1b.yaml", "tulu3_qwen2.5-0.5b_hft.yaml"):
        cfg = load_pipeline(REPO / "configs" / "recipes" / name)
        sources = {s.kind: [d.source for d in s.data] for s in _data_stages(cfg)}
        assert sources == {"sft": ["allenai/tulu-3-sft-mixture"],
                           "dpo": ["allenai/llama-3.1-tulu-3-8b-preference-mixture"],
                           "grpo": ["allenai/RLVR-GSM-MATH-IF-Mixed-Constraints"]}, name
        dpo = next(s for s in cfg.stages if s.kind == "dpo")
        assert dpo.loss_type == ["sigmoid_norm"] and dpo.beta == 5.0  # TÜLU 3's length-normalised DPO
        hft = name.endswith("_hft.yaml")
        assert all((s.trainable.mode == "hft") == hft for s in _data_stages(cfg)), name


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("tulu3_")], ids=_ids)
def test_rlvr_rewards_score_the_mapped_ground_truth(path, tmp_path):
    """`ground_truth` reaches the rewards as `answer`: right math answers and right IF answers score, wrong ones
    do not. The recipe validates with `ifeval` beside `math_verify`, and each scores its own rows: a reward's
    None (ifeval on a math row) is left out of the sum, as TRL's GRPOTrainer does (NaN, then nansum)."""
    from posttrain.rewards import build_reward_funcs

    stage = next(s for s in load_pipeline(path).stages if s.kind == "grpo")
    assert [r.name for r in stage.rewards] == ["math_verify", "ifeval"]
    (_, rows, _), = _rows(stage, tmp_path)
    funcs, weights = build_reward_funcs(stage.rewards)

    def score(kept: list[dict], texts: list[str]) -> list[float]:
        completions = [[_msg("assistant", t)] for t in texts]  # conversational, as TRL passes them
        kwargs = {"prompts": [r["prompt"] for r in kept], "completions": completions,
                  "answer": [r["answer"] for r in kept]}
        per_func = [f(**kwargs) for f in funcs]
        return [sum(w * v[i] for w, v in zip(weights, per_func) if v[i] is not None) for i in range(len(texts))]

    math_rows = [r for r, raw in zip(rows, RLVR) if raw["dataset"] in ("gsm8k", "MATH")]
    right = ["She sold 48 + 24 = 72 clips in all.", "So the fraction is $\\boxed{\\frac{1}{2}}$."]
    wrong = ["She sold 48 + 25 = 73 clips in all.", "So the fraction is $\\boxed{\\frac{3}{2}}$."]
    assert score(math_rows, right) == [weights[0]] * 2
    assert score(math_rows, wrong) == [0.0, 0.0]
    if_rows = [r for r, raw in zip(rows, RLVR) if raw["dataset"] == "ifeval"]  # verify_paragraph_count, N 3
    assert score(if_rows, ["Calm.\n* * *\nWaves.\n* * *\nGulls."]) == [weights[1]]
    assert score(if_rows, ["Calm.\n* * *\nWaves."]) == [0.0]


def test_tulu3_preference_rows_reach_dpo_without_a_repeated_prompt(tmp_path):
    from posttrain.stages.preference import preference_dataset

    stage = next(s for s in load_pipeline(REPO / "configs" / "recipes" / "tulu3_qwen2.5-0.5b.yaml").stages
                 if s.kind == "dpo")
    dataset, _ = preference_dataset([_local(src, tmp_path) for src in stage.data], chat=True, log=lambda _m: None)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in dataset] == [
        ([_msg("user", p["prompt"])], p["chosen"][1:], p["rejected"][1:]) for p in PREFERENCES]
