"""Every common architecture through every stage: tiny random models (tests/tiny_archs.py) of Llama (tied and
untied), Qwen2, Qwen3, Mistral, Gemma2, Phi-3, GPT-2, GPT-NeoX, OLMo2 and Qwen2-MoE, each through sft, sft with
HFT, sft with LoRA, dpo, grpo, task-arithmetic and TIES merges, transfer and eval.

Each cell is one stage run by the pipeline on one architecture; what every output must hold: it loads in
transformers as the input's class with no missing or unexpected weights, it keeps the input's tensor names,
shapes and dtypes on disk and its embedding tie, its tokenizer keeps the chat template, the stage changed
something, and every weight its `trainable.json` lists as frozen is bit-identical on disk to the input's.
Architectures share the world's tokenizer; each base is built once for the module. Cells of one architecture
share their inputs (the merges and the transfer read the sft outputs), so each stage runs once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer
from tests.tiny_archs import ARCHS, disk_sources, headers, make_tiny, tensor_bytes, world_tokenizer

TRAINER = {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2,
           "lr_scheduler_type": "constant", "warmup_steps": 0, "save_steps": 50, "max_length": 64}
# A reward with a spread inside every group, so GRPO's advantages are non-zero and the weights move.
SPREAD = "def spread(completions, **kwargs):\n    return [float(i % 2) for i in range(len(completions))]\n"


def _stage(cell: str, base: Path, reward: Path, out) -> dict:
    """The stage config of `cell`; `out(cell)` is another cell's model folder. Trainable cells start from the
    base; the merges and the transfer combine the sft outputs with it, as a real recipe would."""
    sft = {"kind": "sft", "model": str(base), "data": [{"source": "arithmetic", "limit": 8}],
           "trainer": world_trainer("sft", **TRAINER)}
    stages = {
        "sft": lambda: sft,
        "sft_hft": lambda: {**sft, "trainable": {"mode": "hft", "seed": 0}},
        "sft_lora": lambda: {**sft, "lora": {"r": 2, "alpha": 4}},
        "dpo": lambda: {"kind": "dpo", "model": str(base), "data": [{"source": "style", "limit": 8}],
                        "rpo_alpha": 0.5, "trainer": world_trainer("dpo", **TRAINER)},
        "orpo": lambda: {"kind": "orpo", "model": str(base), "data": [{"source": "style", "limit": 8}],
                         "trainer": world_trainer("dpo", **TRAINER)},
        "reward": lambda: {"kind": "reward", "model": str(base), "data": [{"source": "style", "limit": 8}],
                           "trainer": world_trainer("dpo", **TRAINER)},
        "grpo": lambda: {"kind": "grpo", "model": str(base), "data": [{"source": "verifiable", "limit": 8}],
                         "rewards": [{"name": f"{reward}:spread"}], "num_generations": 2,
                         "max_completion_length": 4,
                         "trainer": world_trainer("grpo", **{**TRAINER, "max_length": None})},
        "merge_ta": lambda: {"kind": "merge", "method": "task_arithmetic", "base": str(base), "models": [
            {"model": str(out("sft")), "weight": 0.5}, {"model": str(out("sft_hft")), "weight": 0.5}]},
        "merge_ties": lambda: {"kind": "merge", "method": "ties", "base": str(base), "models": [
            {"model": str(out("sft")), "weight": 1.0}, {"model": str(out("sft_hft")), "weight": 1.0}]},
        "transfer": lambda: {"kind": "transfer", "model": str(out("sft_lora")), "source_base": str(base),
                             "source_finetuned": str(out("sft"))},
    }
    return stages[cell]()


CELLS = ["sft", "sft_hft", "sft_lora", "dpo", "orpo", "reward", "grpo", "merge_ta", "merge_ties", "transfer", "eval"]
TRAINED = {"sft", "sft_hft", "sft_lora", "dpo", "orpo", "grpo"}
# Cells that fail today for a reason another change owns: (arch, cell) -> reason. strict: they must fail.
XFAIL: dict[tuple[str, str], str] = {}


class ArchRuns:
    """Builds each architecture's base once and runs each (architecture, cell) once, remembering failures so
    that cells reading a failed cell's output fail fast with its error instead of running it again."""

    def __init__(self, root: Path):
        self.root, self.tok = root, world_tokenizer()
        self.reward = root / "spread.py"
        self.reward.write_text(SPREAD)
        self.bases: dict[str, Path] = {}
        self.done: dict[tuple[str, str], Path | Exception] = {}

    def base(self, arch: str) -> Path:
        if arch not in self.bases:
            self.bases[arch] = make_tiny(arch, self.root / arch / "base", self.tok)
        return self.bases[arch]

    def output(self, arch: str, cell: str) -> Path:
        key = (arch, cell)
        if key not in self.done:
            try:
                self.done[key] = self._run(arch, cell)
            except Exception as e:  # kept, and raised again for every cell that needs this output
                self.done[key] = e
        if isinstance(self.done[key], Exception):
            raise self.done[key]
        return self.done[key]

    def _run(self, arch: str, cell: str) -> Path:
        stage = _stage(cell, self.base(arch), self.reward, lambda other: self.output(arch, other))
        cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [{"name": cell, **stage}]})
        run_dir = self.root / arch / cell
        run_pipeline(cfg, run_dir, lambda m: None)
        return run_dir / "stages" / f"01_{cell}" / "model"


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    return ArchRuns(tmp_path_factory.mktemp("archs"))


@pytest.fixture(scope="module")
def world_task_index():
    """lm-eval's TaskManager indexes its ~13k built-in task YAMLs on every construction (10-20 s here), and
    the runner builds one per eval; the world tasks these evals run need none of them, so the matrix builds
    one index of the world's tasks and shares it. The eval itself (model load, requests, metrics) is lm-eval's
    as in any run."""
    import lm_eval.tasks

    real, made = lm_eval.tasks.TaskManager, {}

    def shared(include_path=None, **kw):
        if str(include_path) not in made:
            made[str(include_path)] = real(include_path=include_path, **{"include_defaults": False, **kw})
        return made[str(include_path)]

    mp = pytest.MonkeyPatch()
    mp.setattr(lm_eval.tasks, "TaskManager", shared)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def sources():
    """arch -> {disk tensor name: the parameter names it is saved from} (transformers 5 renames and fuses some:
    GPT-NeoX's lm_head is saved as embed_out, Qwen2-MoE's fused experts are saved one tensor per expert)."""
    return {}


def _cell_params():
    for arch in ARCHS:
        for cell in CELLS:
            reason = XFAIL.get((arch, cell))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(arch, cell, marks=marks, id=f"{arch}-{cell}")


@pytest.mark.parametrize("arch, cell", list(_cell_params()))
def test_cell(runs, sources, world_task_index, arch, cell):
    base = runs.base(arch)
    if cell == "eval":
        return _check_eval(runs.output(arch, "sft"))
    out = runs.output(arch, cell)
    if cell == "reward":
        return _check_reward_model(base, out)
    _check_loads_like(base, out)
    before, after = tensor_bytes(base if cell != "transfer" else runs.output(arch, "sft_lora")), tensor_bytes(out)
    assert [k for k in before if before[k] != after[k]], f"{cell} changed no weight"
    if cell in TRAINED:
        if arch not in sources:
            sources[arch] = disk_sources(base)
        _check_frozen_bit_identical(out.parent / "trainable.json", sources[arch], before, after)


def _check_loads_like(base: Path, out: Path) -> None:
    """Names, shapes and dtypes on disk, config's architecture and tie, the class, weights and tie once loaded,
    and the tokenizer's chat template are the input's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want, got = headers(base), headers(out)
    assert sorted(got) == sorted(want)
    assert _layout(got) == _layout(want)
    cfg_in, cfg_out = (json.loads((f / "config.json").read_text()) for f in (base, out))
    for key in ("model_type", "architectures", "tie_word_embeddings", "vocab_size"):
        assert cfg_out.get(key) == cfg_in.get(key), key
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == cfg_in["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == bool(cfg_in.get("tie_word_embeddings")), "the embedding tie changed"
    assert AutoTokenizer.from_pretrained(out).chat_template


def _check_reward_model(base: Path, out: Path) -> None:
    """A reward stage's model/ is the architecture's one-output sequence classifier: the base's body, trained,
    and a score head in place of the LM head, which scores a chosen and a rejected reply differently."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg_in = json.loads((base / "config.json").read_text())
    model, info = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.model_type == cfg_in["model_type"] and model.config.num_labels == 1
    body_in, body_out = headers(base), headers(out)
    shared = [k for k in body_out if k in body_in]
    assert len(shared) >= len(body_in) - 2, "the body is not the base's"  # all but the LM head (and a tie)
    before, after = tensor_bytes(base), tensor_bytes(out)
    assert [k for k in shared if before[k] != after[k]], "reward changed no weight of the body"
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["Certainly! 4", "4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**enc).logits[:, 0]
    assert torch.isfinite(scores).all() and scores[0] != scores[1]


def _layout(heads: dict[str, dict]) -> dict[str, tuple]:
    return {k: (v["dtype"], v["shape"]) for k, v in heads.items()}


def _check_frozen_bit_identical(trainable_json: Path, sources: dict[str, set[str]], before: dict, after: dict):
    """Every tensor on disk saved only from parameters trainable.json lists as frozen (and, with LoRA, not under
    an adapted module nor an adapted parameter, which the merged model/ changes) has the input's bytes. A partly
    trained tensor (HFT's fused projections and experts) is checked slice by slice in tests/test_hft_fused_moe.py."""
    info = json.loads(trainable_json.read_text())
    lora = info.get("lora") or {}
    adapted = tuple(f"{m}." for m in lora.get("modules", []))  # and the tensors peft adapts directly (MoE experts)
    frozen = {n for n, on in info["parameters"].items()
              if not on and not n.startswith(adapted) and n not in lora.get("parameters", [])}
    checked = [k for k, params in sources.items() if params <= frozen]
    moved = [k for k in checked if before[k] != after[k]]
    assert not moved, f"frozen per trainable.json but changed on disk: {moved}"
    if info["mode"] == "hft":
        assert checked, "HFT froze nothing"


def _check_eval(model: Path) -> None:
    from evals.runner import evaluate_model
    from posttrain.config import EvalConfig

    result = evaluate_model(str(model), settings=EvalConfig(limit=2, max_new_tokens=4),
                            tasks=["world_facts", "world_arithmetic"], log=lambda m: None)
    scores = result["scores"]
    assert {"world_facts/acc", "world_arithmetic/exact_match"} <= set(scores), scores
    assert all(0.0 <= s["value"] <= 1.0 for s in scores.values())
