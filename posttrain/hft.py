"""Which parameters a stage trains: everything, Half Fine-Tuning, or regex patterns.

Half Fine-Tuning (HFT; Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466)
freezes a fresh random half of the model at each fine-tuning stage and updates the other half, so that what the
frozen half knew survives the stage. The paper draws at the "category level" inside every transformer block:
half of the attention projections (q, k, v, o for Llama 2) and half of the feed-forward projections
(gate, up, down) are updated, the others frozen, and the draw is repeated for every new stage.

How this module departs from, or fills gaps in, the paper:

* **Units.** What is drawn is a unit (``posttrain.hft_layouts``): a projection; one part of a fused projection
  (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` and NeoX's ``query_key_value`` give q, k and v, Phi-3's
  ``gate_up_proj`` gives gate and up), so GPT-2, Phi-3 and NeoX draw 2 of q, k, v, o like Llama; or, in a
  mixture-of-experts block, one expert (its slices of every expert tensor together), Qwen2-MoE's shared expert
  counting as one more. A drawn part of a fused tensor trains through a gradient mask (below).
* **Router.** An MoE router (``mlp.gate``, and Qwen2-MoE's ``shared_expert_gate``) is not drawn. It is
  **frozen** by default (``router: false``): trained beside a half-frozen expert set, it would learn to send
  tokens to the trained experts, and the frozen experts' knowledge would survive in weights no token reaches.
* **Odd counts.** Half of Llama's 3 MLP projections is 1.5. We use *stochastic rounding* from the block's own
  seeded generator: ``k = floor(f*n)``, plus one with probability ``frac(f*n)``, so each block trains 1 or 2
  of its 3 MLP projections and the expected count is exactly ``f*n``. A fixed ``round`` would train 2 of 3
  (2/3 of MLP weights, about 61% of a Llama block) or 1 of 3 in every block, missing the paper's "half of
  the parameters" by a wide margin; stochastic rounding keeps it half on average over the blocks.
  Even counts (4 attention projections, 8 experts) are exact.
* **Embeddings, lm_head, norms.** We could not confirm from the text at hand how the paper treats them (our
  recollection is that norms are also split by halves and embeddings/lm_head handled as one more category),
  so we make each an explicit switch. Defaults: embeddings and lm_head **frozen** (they hold most of the
  vocabulary knowledge HFT wants to keep), norms **trained** (a few thousand numbers per block that let the
  trained half rescale its inputs). In a tied model the two are one tensor, which trains if either switch is
  on, with a warning that it is both. The switches are written into the summary.
* **Seeding.** The draw for a block is a ``random.Random`` seeded by SHA-256 of (seed, stage index, block path),
  never Python's salted ``hash()``, so the mask is the same on every machine and process, and independent of
  the order in which names are listed.
* **Unknown parameters.** Outside the blocks, a parameter that is neither embedding, norm nor lm_head (a
  reward model's score head, say) is trained: freezing a freshly initialised head would make the stage
  pointless. Inside a block, an unknown parameter, or a fused tensor without a known layout, is an error in
  hft mode, because "half of the block" would then silently mean something else.
* **Partly trained tensors.** ``requires_grad`` is per tensor, so a tensor with a frozen part trains with a
  hook that zeroes the frozen part's gradient, and ``FrozenSlices`` copies the frozen part back after every
  optimizer step (the stage adds its callback): AdamW's decoupled weight decay moves an entry whose gradient
  is zero, and so may other optimizers; the restore makes any optimizer and weight decay safe, at the cost of
  one copy of the frozen parts in memory. torch has no per-element freezing; peft and transformers neither.
* **LoRA.** HFT is a full-weight method. To combine it with LoRA, adapters go only on the selected modules and
  expert tensors (``lora_targets``); one adapter spans a whole tensor, so a fused projection or an expert stack
  with any drawn part carries an adapter over all its parts (the stage warns), and routers get none.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.schema import ConfigError
from posttrain.hft_layouts import (
    FrozenSlices,
    ModelInfo,
    Part,
    Piece,
    block_units,
    classify,
    is_expert_tensor,
    merge_pieces,
    model_info,
    router_names,
)

# peft names: "base_model.model.<name>", "<module>.base_layer.weight", "<module>.lora_A.<adapter>.weight".
_PEFT_PREFIX = "base_model.model."
_ADAPTER_RE = re.compile(r"^(?P<host>.+?)\.lora_[A-Za-z_]+\.[^.]+(?:\..+)?$")
_GUARD_ATTR = "_posttrain_frozen_slices"


class TrainableConfig(BaseModel):
    """Which parameters a trainable stage updates; the ``trainable:`` field of every trainable stage.

    ``mode``: ``all`` is full fine-tuning (every parameter; the switches below do not apply); ``hft`` is Half
    Fine-Tuning (Hui et al. 2024) with ``fraction`` of each block's attention and MLP units (projections, parts
    of fused projections, experts) trained, drawn again for every stage; ``patterns`` trains a parameter when
    it matches (``re.search``) any ``train`` regex, or ``train`` is empty, and matches no ``freeze`` regex.
    ``embeddings`` / ``norms`` / ``lm_head`` / ``router`` apply in hft mode only (see the module docstring for
    why these defaults).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["all", "hft", "patterns"] = "all"
    fraction: float = 0.5
    seed: int = 0
    embeddings: bool = False
    norms: bool = True
    lm_head: bool = False
    router: bool = False
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
            f for f in ("embeddings", "norms", "lm_head", "router")
            if f in self.model_fields_set and getattr(self, f) != type(self).model_fields[f].default
        }
        if self.mode != "hft" and switches:
            raise ValueError(
                f"trainable.{'/'.join(sorted(switches))} apply only with mode 'hft', not mode {self.mode!r}"
            )
        return self


Mask = dict[str, "bool | Part"]


def _base_name(name: str) -> tuple[str, bool]:
    """Map a (possibly peft-wrapped) parameter name to the plain model's name; True if it is a LoRA adapter.

    An adapter maps to its host module's path, so it shares the decision on the host's parameters.
    """
    name = re.sub(r"\.base_layer(?=\.)", "", name.removeprefix(_PEFT_PREFIX))  # nested in ParamWrappers too
    adapter = _ADAPTER_RE.match(name)
    return (adapter["host"], True) if adapter else (name, False)


def _block_rng(seed: int, stage_index: int, block: str) -> random.Random:
    """A generator for one block and stage, stable across processes (SHA-256, not the salted ``hash()``)."""
    digest = hashlib.sha256(f"hft|{seed}|{stage_index}|{block}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _stochastic_count(rng: random.Random, fraction: float, n: int) -> int:
    """floor(f*n), plus one with probability frac(f*n): the expected count is exactly f*n."""
    exact = fraction * n
    low = math.floor(exact)
    return low + (1 if rng.random() < exact - low else 0)


def _hft_mask(shapes: dict[str, Any], cfg: TrainableConfig, stage_index: int, info: ModelInfo) -> Mask:
    """Per block, ``fraction`` of the attention units and of the MLP units, drawn at random; the switches for
    the rest (a tied embedding trains if either of its two switches is on)."""
    drawn: dict[str, list[Piece]] = {}
    routers: set[str] = set()
    for block, units in block_units(shapes, info).items():
        rng = _block_rng(cfg.seed, stage_index, block)
        for kind in ("attn", "mlp"):  # fixed draw order: attention first, then MLP
            pool = sorted(getattr(units, kind), key=lambda u: u.key)  # the input order of names cannot matter
            if pool:
                for unit in rng.sample(pool, _stochastic_count(rng, cfg.fraction, len(pool))):
                    for piece in unit.pieces:
                        drawn.setdefault(piece.name, []).append(piece)
        routers.update(units.router)
    switch = {"norm": cfg.norms, "embed": cfg.embeddings, "lm_head": cfg.lm_head, "head": True}
    mask: Mask = {}
    for name, shape in shapes.items():
        kind = classify(name)[0]
        if name in routers:
            mask[name] = cfg.router
        elif name == info.tied:
            mask[name] = cfg.embeddings or cfg.lm_head
        else:
            mask[name] = merge_pieces(drawn.get(name, []), shape) if kind in ("attn", "mlp") else switch[kind]
    return mask


def _patterns_mask(names: list[str], cfg: TrainableConfig) -> Mask:
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


def select_trainable(params: list[str] | Mapping[str, Any], cfg: TrainableConfig, stage_index: int,
                     info: ModelInfo | None = None) -> Mask:
    """Decide which parameters a stage trains; ``{name: True | False | Part}`` for every name.

    ``params``: names, or names mapped to shapes (needed to split fused and expert tensors); ``info``: the
    model type and head counts (``hft_layouts.model_info``), needed for fused layouts and embedding tying.
    HFT (Hui et al. 2024, arXiv 2404.18466): per transformer block, ``cfg.fraction`` of the attention units
    and of the MLP units are trained (stochastic rounding for odd counts, see the module docstring); a
    module's weight and bias go together. The draw depends only on (seed, stage index, block path), so the
    same config and stage give the same mask, and a new stage redraws it.
    Names from a peft model are understood: base weights are frozen and an adapter trains iff anything of its
    host module is selected. Patterns are matched against the plain (un-wrapped) names.
    """
    if not params:
        raise ValueError("select_trainable: no parameter names given")
    shapes = dict(params) if isinstance(params, Mapping) else dict.fromkeys(params)
    base = {n: _base_name(n) for n in shapes}
    plain = {b: shapes[n] for n, (b, adapter) in base.items() if not adapter}
    if cfg.mode == "all":
        decided: Mask = dict.fromkeys(plain, True)
    elif cfg.mode == "patterns":
        decided = _patterns_mask(sorted(plain), cfg)
    else:
        decided = _hft_mask(plain, cfg, stage_index, info or ModelInfo())
    if not any(adapter for _, adapter in base.values()):
        return {n: decided[b] for n, (b, _) in base.items()}
    # On a peft model only adapters train: its base weights stay frozen, which is what LoRA means.
    hosts: dict[str, bool] = {}
    for name, on in decided.items():
        module = name.rsplit(".", 1)[0]
        hosts[module] = hosts.get(module, False) or bool(on)
    return {n: adapter and hosts.get(b, False) for n, (b, adapter) in base.items()}


def lora_targets(mask: Mask) -> tuple[list[str], list[str]]:
    """(module paths, expert tensor names) holding a selected attention/MLP part, for ``LoraConfig``'s
    ``target_modules`` and ``target_parameters``.

    Norms, embeddings, heads and MoE routers are left out: LoRA adapts projections and experts. Paths are the
    plain model's (a peft prefix is stripped), which is what peft matches against.
    """
    routers = router_names([_base_name(n)[0] for n in mask])
    modules: set[str] = set()
    tensors: set[str] = set()
    for name, on in mask.items():
        plain_name, adapter = _base_name(name)
        if adapter:  # a peft model's names: the adapter's host module
            modules.update([plain_name] if on else [])
            continue
        kind, _, module = classify(plain_name)
        if not on or kind not in ("attn", "mlp") or plain_name in routers:
            continue
        if is_expert_tensor(plain_name):
            tensors.add(plain_name)
        else:
            modules.add(module)
    return sorted(modules), sorted(tensors)


def lora_target_modules(param_names: list[str], mask: Mask) -> list[str]:
    """The module paths of ``lora_targets`` for a model without expert tensors."""
    return lora_targets({n: mask[n] for n in param_names})[0]


def _trained_numel(on: bool | Part, numel: int) -> int:
    if isinstance(on, Part):  # every index along `dim` stands for numel // size elements
        return numel // on.size * sum(b - a for a, b in on.spans)
    return numel * bool(on)


def block_shares(mask: Mask, sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """Each block's trained share of its elements: attention, MLP (routers included) and the whole block
    (norms included). A partly trained tensor counts its trained elements."""
    acc: dict[str, dict[str, list[int]]] = {}
    for name, on in mask.items():
        kind, block, _ = classify(_base_name(name)[0])
        if block is None:
            continue
        trained = _trained_numel(on, sizes[name])
        for key in ({"attn", "mlp"} & {kind}) | {"total"}:
            cell = acc.setdefault(block, {}).setdefault(key, [0, 0])
            cell[0] += trained
            cell[1] += sizes[name]
    return {b: {k: round(t / n, 6) for k, (t, n) in sorted(v.items()) if n} for b, v in sorted(acc.items())}


def _tie_warning(cfg: TrainableConfig, info: ModelInfo) -> list[str]:
    if cfg.mode != "hft" or not info.tied or cfg.embeddings == cfg.lm_head:
        return []
    on, other = ("lm_head", "input embeddings") if cfg.lm_head else ("embeddings", "lm_head")
    return [f"trainable.{on}: true on a model with tied embeddings (one tensor) trains its {other} too"]


def apply_trainable(model: Any, cfg: TrainableConfig, stage_index: int) -> dict[str, Any]:
    """Set ``requires_grad`` on every parameter of ``model`` per ``select_trainable``; return the summary.

    A partly trained tensor (``Part``) gets ``requires_grad`` and its frozen part is guarded by
    ``FrozenSlices`` (gradient mask now; the stage restores after every optimizer step, ``frozen_slices``).
    The summary (written next to the stage outputs by ``write_trainable_json``) counts elements, not tensors:
    ``{"mode", "seed", "stage_index", "trained", "frozen", "config", "parameters": {name: bool | {"dim",
    "trained": [[start, stop], ...], "of"}}, "blocks": {block: {"attn", "mlp", "total": share}}, "warnings"}``,
    plus ``"moe": {"experts", "router", "shared_expert"}`` (the policy) in hft mode on an MoE model. Tied parameters
    appear once, under the name ``named_parameters`` gives them.
    A LoRA stage rewrites the counts and the mask to say that only its adapters train
    (``posttrain.stages.common.select_parameters``).
    """
    params = dict(model.named_parameters())
    info = model_info(model)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    mask = select_trainable(shapes, cfg, stage_index, info)
    previous = getattr(model, _GUARD_ATTR, None)
    if previous is not None:
        previous.remove()
    guard = FrozenSlices()
    for name, param in params.items():
        param.requires_grad_(bool(mask[name]))
        if isinstance(mask[name], Part):
            guard.add(param, mask[name])
    model.__dict__[_GUARD_ATTR] = guard  # not a submodule or parameter: a plain attribute
    sizes = {n: p.numel() for n, p in params.items()}
    trained = sum(_trained_numel(mask[n], sizes[n]) for n in params)
    summary: dict[str, Any] = {
        "mode": cfg.mode,
        "seed": cfg.seed,
        "stage_index": stage_index,
        "trained": trained,
        "frozen": sum(sizes.values()) - trained,
        "config": cfg.model_dump(),
        "parameters": {n: v.to_json() if isinstance(v, Part) else v for n, v in mask.items()},
        "blocks": block_shares(mask, sizes),
        "warnings": _tie_warning(cfg, info),
    }
    if cfg.mode == "hft" and any(is_expert_tensor(_base_name(n)[0]) or ".experts." in n for n in params):
        summary["moe"] = {"experts": "drawn whole (an expert's slices of every expert tensor together)",
                          "router": "trained" if cfg.router else "frozen"}
        if any(".shared_expert." in n or ".shared_experts." in n for n in params):
            summary["moe"]["shared_expert"] = "drawn as one more expert"
    return summary


def frozen_slices(model: Any) -> FrozenSlices | None:
    """The guard ``apply_trainable`` attached to ``model`` (peft-wrapped or not), None if nothing is partial."""
    guard = getattr(model, _GUARD_ATTR, None)
    return guard if guard else None


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
