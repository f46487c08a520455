"""Which parameters a stage trains: everything, Half Fine-Tuning, or regex patterns.

Half Fine-Tuning (HFT; Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466)
freezes a fresh random half of the model at each fine-tuning stage and updates the other half, so that what the
frozen half knew survives the stage. The paper draws at the "category level" inside every transformer block:
half of the attention projections (q, k, v, o for Llama 2) and half of the feed-forward projections
(gate, up, down) are updated, the others frozen, and the draw is repeated for every new stage.

How this module departs from, or fills gaps in, the paper:

* **Odd counts.** Half of Llama's 3 MLP projections is 1.5. We use *stochastic rounding* from the block's own
  seeded generator: ``k = floor(f*n)``, plus one with probability ``frac(f*n)``, so each block trains 1 or 2
  of its 3 MLP projections and the expected count is exactly ``f*n``. A fixed ``round`` would train 2 of 3
  (2/3 of MLP weights, about 61% of a Llama block) or 1 of 3 in every block, missing the paper's "half of
  the parameters" by a wide margin; stochastic rounding keeps it half on average over the blocks.
  Even counts (4 attention projections, GPT-2's 2 + 2) are exact: 2 of 4, 1 of 2.
* **Embeddings, lm_head, norms.** We could not confirm from the text at hand how the paper treats them (our
  recollection is that norms are also split by halves and embeddings/lm_head handled as one more category),
  so we make each an explicit switch. Defaults: embeddings and lm_head **frozen** (they hold most of the
  vocabulary knowledge HFT wants to keep, and in tied models they are one tensor), norms **trained** (a few
  thousand numbers per block that let the trained half rescale its inputs). The switches are written into the
  summary so every run records what it did.
* **Seeding.** The draw for a block is a ``random.Random`` seeded by SHA-256 of (seed, stage index, block path),
  never Python's salted ``hash()``, so the mask is the same on every machine and process, and independent of
  the order in which names are listed.
* **Unknown parameters.** Outside the blocks, a parameter that is neither embedding, norm nor lm_head (a
  reward model's score head, say) is trained: freezing a freshly initialised head would make the stage
  pointless. Inside a block, a parameter that is neither attention, MLP nor norm is an error in hft mode,
  because "half of the block" would then silently mean something else.
* **LoRA.** HFT is a full-weight method. To combine it with LoRA, put adapters only on the selected modules
  (``lora_target_modules``). On a peft model, ``select_trainable`` trains the adapters whose host module is
  selected and freezes every base weight, which is what LoRA means. Only the attention/MLP choice matters
  then (the norms / embeddings / lm_head switches pick no adapters), and the stage's trainable.json counts
  the adapters, not this selection (``posttrain.stages.common.select_parameters``).

The block layouts understood: Llama/Qwen2/Mistral (``model.layers.<i>.self_attn.q_proj``,
``...mlp.up_proj``), GPT-2 (``transformer.h.<i>.attn.c_attn``, ``...mlp.c_fc``), GPT-NeoX and others with
``layers|h|blocks|layer .<i>.`` and ``attn|attention`` / ``mlp|ffn|feed_forward`` sub-modules.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.config import ConfigError

# A block is the first "<container>.<index>." in the name; `.*?` keeps it the outermost stack.
_BLOCK_RE = re.compile(r"^(?P<block>(?:.*?\.)?(?:layers|h|blocks|layer)\.\d+)\.(?P<rest>.+)$")
_NORM_SEG = re.compile(r"(norm|^ln(_\w+)?$)", re.IGNORECASE)
_ATTN_SEG = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_SEG = re.compile(r"(mlp|ffn|feed_forward|feedforward)", re.IGNORECASE)
_LM_HEAD_SEG = re.compile(r"^(lm_head|embed_out)$")
_EMBED_SEG = re.compile(r"(embed|^wte$|^wpe$)", re.IGNORECASE)
# peft names: "base_model.model.<name>", "<module>.base_layer.weight", "<module>.lora_A.<adapter>.weight".
_PEFT_PREFIX = "base_model.model."
_ADAPTER_RE = re.compile(r"^(?P<host>.+?)\.lora_[A-Za-z_]+\.[^.]+(?:\..+)?$")

Kind = Literal["attn", "mlp", "norm", "embed", "lm_head", "head", "block_other"]


class TrainableConfig(BaseModel):
    """Which parameters a trainable stage updates; the ``trainable:`` field of every trainable stage.

    ``mode``: ``all`` is full fine-tuning (every parameter; the switches below do not apply); ``hft`` is Half
    Fine-Tuning (Hui et al. 2024) with ``fraction`` of each block's attention and MLP projections trained,
    drawn again for every stage; ``patterns`` trains a parameter when it matches (``re.search``) any
    ``train`` regex, or ``train`` is empty, and matches no ``freeze`` regex.
    ``embeddings`` / ``norms`` / ``lm_head`` apply in hft mode only (see the module docstring for why these
    defaults).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["all", "hft", "patterns"] = "all"
    fraction: float = 0.5
    seed: int = 0
    embeddings: bool = False
    norms: bool = True
    lm_head: bool = False
    train: list[str] = Field(default_factory=list)
    freeze: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "TrainableConfig":
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(
                f"trainable.fraction must be strictly between 0 and 1 (HFT uses 0.5), got {self.fraction}"
            )
        for field in ("train", "freeze"):
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"trainable.{field} pattern {pattern!r} is not a valid regex: {err}") from None
        if self.mode != "patterns" and (self.train or self.freeze):
            raise ValueError(f"trainable.train/freeze apply only with mode 'patterns', not mode {self.mode!r}")
        if self.mode == "patterns" and not (self.train or self.freeze):
            raise ValueError("trainable mode 'patterns' needs at least one 'train' or 'freeze' regex")
        # Only a switch moved off its default is an error: a resolved config (every field written out) must
        # validate again when read back.
        switches = {
            f for f in ("embeddings", "norms", "lm_head")
            if f in self.model_fields_set and getattr(self, f) != type(self).model_fields[f].default
        }
        if self.mode != "hft" and switches:
            raise ValueError(
                f"trainable.{'/'.join(sorted(switches))} apply only with mode 'hft', not mode {self.mode!r}"
            )
        return self


def _base_name(name: str) -> tuple[str, bool]:
    """Map a (possibly peft-wrapped) parameter name to the plain model's name; True if it is a LoRA adapter.

    An adapter maps to its host module's ``weight`` so it shares the host's decision.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    name = name.replace(".base_layer.", ".")
    adapter = _ADAPTER_RE.match(name)
    if adapter:
        return adapter["host"] + ".weight", True
    return name, False


def _classify(name: str) -> tuple[Kind, str | None, str]:
    """Return (kind, block path or None, module path) of a plain parameter name."""
    module = name.rsplit(".", 1)[0] if "." in name else name
    block = _BLOCK_RE.match(name)
    if block is None:
        segments = module.split(".")
        if any(_LM_HEAD_SEG.search(s) for s in segments):
            return "lm_head", None, module
        if any(_EMBED_SEG.search(s) for s in segments):
            return "embed", None, module
        if any(_NORM_SEG.search(s) for s in segments):
            return "norm", None, module
        return "head", None, module
    inner = block["rest"].split(".")[:-1]  # module segments inside the block, leaf dropped
    if any(_NORM_SEG.search(s) for s in inner):  # before attn: Qwen3's self_attn.q_norm is a norm
        return "norm", block["block"], module
    if inner and _ATTN_SEG.search(inner[0]):
        return "attn", block["block"], module
    if inner and _MLP_SEG.search(inner[0]):
        return "mlp", block["block"], module
    return "block_other", block["block"], module


def _block_rng(seed: int, stage_index: int, block: str) -> random.Random:
    """A generator for one block and stage, stable across processes (SHA-256, not the salted ``hash()``)."""
    digest = hashlib.sha256(f"hft|{seed}|{stage_index}|{block}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _stochastic_count(rng: random.Random, fraction: float, n: int) -> int:
    """floor(f*n), plus one with probability frac(f*n): the expected count is exactly f*n."""
    exact = fraction * n
    low = math.floor(exact)
    return low + (1 if rng.random() < exact - low else 0)


def _hft_modules(classified: dict[str, tuple[Kind, str | None, str]], cfg: TrainableConfig,
                 stage_index: int) -> set[str]:
    """The attention and MLP module paths HFT trains: per block, ``fraction`` of each kind, drawn at random."""
    groups: dict[str, dict[str, set[str]]] = {}
    for name, (kind, block, module) in classified.items():
        if kind == "block_other":
            raise ConfigError(
                f"hft: parameter {name!r} in block {block!r} is neither attention, MLP nor norm; "
                "use mode 'patterns' for this architecture"
            )
        if kind in ("attn", "mlp"):
            groups.setdefault(block, {"attn": set(), "mlp": set()})[kind].add(module)
    chosen: set[str] = set()
    for block, kinds in groups.items():
        rng = _block_rng(cfg.seed, stage_index, block)
        for kind in ("attn", "mlp"):  # fixed draw order: attention first, then MLP
            modules = sorted(kinds[kind])  # sorted, so the input order of names cannot change the draw
            if modules:
                chosen.update(rng.sample(modules, _stochastic_count(rng, cfg.fraction, len(modules))))
    return chosen


def _patterns_mask(names: list[str], cfg: TrainableConfig) -> dict[str, bool]:
    """Trained iff it matches any ``train`` regex (or none given) and no ``freeze`` regex.

    A regex that matches nothing is a ``ConfigError`` (the CLI exits 2): it is a mistake in the config, found
    only once the model's names are known.
    """
    for pattern in cfg.train + cfg.freeze:
        if not any(re.search(pattern, n) for n in names):
            raise ConfigError(f"trainable pattern {pattern!r} matches no parameter (e.g. {names[0]!r})")
    return {
        n: (not cfg.train or any(re.search(p, n) for p in cfg.train))
        and not any(re.search(p, n) for p in cfg.freeze)
        for n in names
    }


def select_trainable(param_names: list[str], cfg: TrainableConfig, stage_index: int) -> dict[str, bool]:
    """Decide, from names alone, which parameters a stage trains; ``{name: trained}`` for every name.

    HFT (Hui et al. 2024, arXiv 2404.18466): per transformer block, ``cfg.fraction`` of the attention
    projections and of the MLP projections are trained (stochastic rounding for odd counts, see the module
    docstring); a module's weight and bias go together. The draw depends only on (seed, stage index, block
    path), so the same config and stage give the same mask, and a new stage redraws it.
    Names from a peft model are understood: base weights are frozen and an adapter trains iff its host module
    is selected. Patterns are matched against the plain (un-wrapped) names.
    """
    if not param_names:
        raise ValueError("select_trainable: no parameter names given")
    base = {n: _base_name(n) for n in param_names}
    plain = sorted({b for b, _ in base.values()})
    if cfg.mode == "all":
        decided = dict.fromkeys(plain, True)
    elif cfg.mode == "patterns":
        decided = _patterns_mask(plain, cfg)
    else:
        classified = {n: _classify(n) for n in plain}
        chosen = _hft_modules(classified, cfg, stage_index)
        switch = {"norm": cfg.norms, "embed": cfg.embeddings, "lm_head": cfg.lm_head, "head": True}
        decided = {
            n: (module in chosen) if kind in ("attn", "mlp") else switch[kind]
            for n, (kind, _, module) in classified.items()
        }
    is_peft = any(adapter for _, adapter in base.values())
    # On a peft model only adapters train: its base weights stay frozen, which is what LoRA means.
    return {n: decided[b] and (adapter or not is_peft) for n, (b, adapter) in base.items()}


def lora_target_modules(param_names: list[str], mask: dict[str, bool]) -> list[str]:
    """Full module paths (no ``.weight``) of the selected attention/MLP projections, for ``LoraConfig``.

    Pass the result as ``LoraConfig(target_modules=...)`` so adapters sit only on the modules HFT selected.
    Norms, embeddings and heads are left out: LoRA adapts projections. Paths are the plain model's (a peft
    prefix is stripped), which is what peft matches ``target_modules`` against.
    """
    targets: set[str] = set()
    for name in param_names:
        if not mask[name]:
            continue
        plain, _ = _base_name(name)
        kind, _, module = _classify(plain)
        if kind in ("attn", "mlp"):
            targets.add(module)
    return sorted(targets)


def apply_trainable(model: Any, cfg: TrainableConfig, stage_index: int) -> dict[str, Any]:
    """Set ``requires_grad`` on every parameter of ``model`` per ``select_trainable``; return the summary.

    The summary (written next to the stage outputs by ``write_trainable_json``) counts elements, not tensors:
    ``{"mode", "seed", "stage_index", "trained", "frozen", "parameters": {name: bool}}``, plus the config.
    Tied parameters appear once, under the name ``named_parameters`` gives them (a tied lm_head follows the
    embeddings switch because it is the same tensor).
    A LoRA stage rewrites the counts and the mask to say that only its adapters train
    (``posttrain.stages.common.select_parameters``).
    """
    params = dict(model.named_parameters())
    mask = select_trainable(list(params), cfg, stage_index)
    trained = frozen = 0
    for name, param in params.items():
        param.requires_grad_(mask[name])
        if mask[name]:
            trained += param.numel()
        else:
            frozen += param.numel()
    return {
        "mode": cfg.mode,
        "seed": cfg.seed,
        "stage_index": stage_index,
        "trained": trained,
        "frozen": frozen,
        "config": cfg.model_dump(),
        "parameters": mask,
    }


def write_trainable_json(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the summary as JSON atomically (temporary file, then rename), so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def assert_optimizer_holds_only(optimizer: Any, model: Any) -> set[str]:
    """Return the names of the model parameters in ``optimizer``'s groups; raise if any is frozen or foreign.

    Also checks the optimizer state: a frozen parameter must own no moments, otherwise AdamW's weight decay
    or momentum could still move it.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    held: set[str] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise AssertionError("optimizer holds a tensor that is not a parameter of the model")
            held.add(names[id(param)])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if held & frozen:
        raise AssertionError(f"optimizer holds frozen parameters: {sorted(held & frozen)[:5]}")
    with_state = {names.get(id(p), "<foreign>") for p in optimizer.state}
    if with_state & frozen:
        raise AssertionError(f"optimizer has state for frozen parameters: {sorted(with_state & frozen)[:5]}")
    return held
