"""How Half Fine-Tuning cuts a transformer block into the units it draws (``posttrain.hft`` draws them).

A *unit* is what HFT trains or freezes as one: a projection (its weight and bias), one part of a fused
projection (the q, k or v rows of GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, NeoX's ``query_key_value``; the gate
or up rows of Phi-3's ``gate_up_proj``), or one expert of a mixture-of-experts block (its slice of every fused
3-D expert tensor, or its modules when experts are a list). A unit is a list of *pieces*: a parameter, whole or
a set of index spans along one dimension. HFT (Hui et al. 2024, arXiv 2404.18466) draws half of the attention
units and half of the MLP units of each block; cutting fused tensors and expert stacks into their parts is what
lets "half of the projections" hold on architectures that store several projections in one tensor.

Fused layouts are known per model type (``_FUSED``, read from transformers' modeling files); a tensor whose
name says it is fused (``qkv``, ``c_attn``, ``gate_up``, ...) in a model type without a layout is refused,
because drawing it whole would train all of Q, K and V or none of them.
MoE blocks (transformers 5 stores experts as 3-D parameters ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]; the expert is dim 0): the MLP units are the experts, plus the shared expert
(Qwen2-MoE's ``shared_expert``) as one more expert; the router (``gate``/``router``, and Qwen2-MoE's
``shared_expert_gate``) is never drawn: ``posttrain.hft`` applies the ``router`` switch to it.

The drawn pieces of a tensor merge into one decision (``merge_pieces``): whole, none, or a ``Part`` (the
trained spans along one dim), whose frozen rest ``FrozenSlices`` keeps bit-identical through training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from posttrain.schema import ConfigError

# A block is the first "<container>.<index>." in the name; `.*?` keeps it the outermost stack.
_BLOCK_RE = re.compile(r"^(?P<block>(?:.*?\.)?(?:layers|h|blocks|layer)\.\d+)\.(?P<rest>.+)$")
_NORM_SEG = re.compile(r"(norm|^ln(_\w+)?$)", re.IGNORECASE)
_ATTN_SEG = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_SEG = re.compile(r"(mlp|ffn|feed_forward|feedforward)", re.IGNORECASE)
_LM_HEAD_SEG = re.compile(r"^(lm_head|embed_out)$")
_EMBED_SEG = re.compile(r"(embed|^wte$|^wpe$)", re.IGNORECASE)
# Inside an MLP: the experts' container, a shared expert, and the router (Qwen2-MoE's shared_expert_gate too).
_EXPERTS_SEG = re.compile(r"^experts$")
_SHARED_SEG = re.compile(r"^shared_experts?$")
_ROUTER_SEG = re.compile(r"(^|_)(gate|router)$")
# Names that say a tensor holds several projections; without a layout below such a tensor is refused.
_FUSED_NAME = re.compile(r"(qkv|query_key_value|c_attn|gate_up|att_proj|ff_proj)", re.IGNORECASE)

Kind = Literal["attn", "mlp", "norm", "embed", "lm_head", "head", "block_other"]
Spans = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ModelInfo:
    """What the layouts need to know beyond names and shapes; ``model_info`` reads it from a model."""

    model_type: str = ""
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    tied: str = ""  # the name of the input embedding when it is also the lm_head (one tensor), else ""


def model_info(model: Any) -> ModelInfo:
    """Read the model type, attention head counts and embedding tying from a (possibly peft-wrapped) model."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        shared = out.weight if out is not None and inp is not None and out.weight is inp.weight else None
    except (AttributeError, NotImplementedError):
        shared = None
    tied = next((n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p is shared), "")
    return ModelInfo(getattr(cfg, "model_type", "") or "", heads, getattr(cfg, "num_key_value_heads", None) or heads,
                     head_dim, tied)


@dataclass(frozen=True)
class Piece:
    """A parameter, whole (``dim`` None) or the index ``spans`` ([start, stop) pairs) along ``dim``."""

    name: str
    dim: int | None = None
    spans: Spans = ()


@dataclass
class Unit:
    """What HFT draws as one; ``key`` orders the draw (a projection's key is its module path)."""

    key: str
    pieces: list[Piece]


@dataclass
class BlockUnits:
    """One block's units by category, its router parameters, and every parameter's category (for shares)."""

    attn: list[Unit] = field(default_factory=list)
    mlp: list[Unit] = field(default_factory=list)
    router: list[str] = field(default_factory=list)
    moe: bool = False
    category: dict[str, Kind] = field(default_factory=dict)


def classify(name: str) -> tuple[Kind, str | None, str]:
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


def is_expert_tensor(name: str) -> bool:
    """A fused expert stack: a parameter directly on an ``experts`` module (``mlp.experts.gate_up_proj``)."""
    parts = name.split(".")
    return len(parts) >= 2 and bool(_EXPERTS_SEG.match(parts[-2])) and classify(name)[0] == "mlp"


def router_names(names: list[str]) -> set[str]:
    """The router parameters of MoE blocks: an MLP's ``gate``/``router`` (and ``shared_expert_gate``) beside
    an ``experts`` module; names of dense MLPs are never routers."""
    moe = {n.split(".experts.")[0] for n in names if ".experts." in n}
    routers = set()
    for name in names:
        module = name.rsplit(".", 1)[0]
        parent, _, leaf = module.rpartition(".")
        if parent in moe and _ROUTER_SEG.search(leaf):
            routers.add(name)
    return routers


# ---- fused projections: which output rows are which projection ------------------------------------------------

def _thirds(out: int, info: ModelInfo) -> dict[str, Spans]:
    """GPT-2's c_attn: [q; k; v], each hidden wide (``split(self.split_size, dim=2)`` in modeling_gpt2)."""
    third = out // 3
    return {"q": ((0, third),), "k": ((third, 2 * third),), "v": ((2 * third, out),)}


def _phi3_qkv(out: int, info: ModelInfo) -> dict[str, Spans]:
    """Phi-3's qkv_proj: [q (heads*head_dim); k (kv*head_dim); v (kv*head_dim)] (modeling_phi3 slices so)."""
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    return {"q": ((0, q),), "k": ((q, q + kv),), "v": ((q + kv, q + 2 * kv),)}


def _halves(out: int, info: ModelInfo) -> dict[str, Spans]:
    """Phi-3's gate_up_proj: [gate; up] (``chunk(2, dim=-1)``, gate first, in modeling_phi3)."""
    return {"gate": ((0, out // 2),), "up": ((out // 2, out),)}


def _neox_qkv(out: int, info: ModelInfo) -> dict[str, Spans]:
    """NeoX's query_key_value is interleaved per head: rows [h*3d, h*3d+d) are head h's q, then its k, its v
    (modeling_gpt_neox views the output as [..., heads, 3*head_dim] and chunks the last dim in three)."""
    d = out // (3 * info.heads) if info.heads else 0
    return {p: tuple((h * 3 * d + i * d, h * 3 * d + (i + 1) * d) for h in range(info.heads))
            for i, p in enumerate("qkv")}


# (model_type, module leaf) -> (split function of the output size, True for Conv1D: the output dim is the last).
_FUSED: dict[tuple[str, str], tuple[Callable[[int, ModelInfo], dict[str, Spans]], bool]] = {
    ("gpt2", "c_attn"): (_thirds, True),
    ("phi3", "qkv_proj"): (_phi3_qkv, False),
    ("phi3", "gate_up_proj"): (_halves, False),
    ("gpt_neox", "query_key_value"): (_neox_qkv, False),
}


def _need_shape(name: str, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is None:
        raise ValueError(f"hft: {name!r} is a fused or expert tensor; its shape is needed to split it")
    return shape


def _fused_units(module: str, names: list[str], shapes: dict[str, Any], info: ModelInfo) -> list[Unit] | None:
    """The parts of a fused projection as units, None when the module is not fused (an ordinary projection)."""
    leaf = module.rsplit(".", 1)[-1]
    layout = _FUSED.get((info.model_type, leaf))
    if layout is None:
        if _FUSED_NAME.search(leaf):
            raise ConfigError(
                f"hft: cannot split the fused projection {module!r} (model type {info.model_type!r}) into its "
                "parts; HFT knows gpt2, phi3 and gpt_neox layouts; use trainable mode 'patterns'")
        return None
    split, conv1d = layout
    parts: dict[str, list[Piece]] = {}
    for name in sorted(names):
        shape = _need_shape(name, shapes.get(name))
        dim = len(shape) - 1 if conv1d else 0
        spans = split(shape[dim], info)
        tiled = sorted(s for part in spans.values() for s in part)
        if not tiled or [a for a, _ in tiled] != [0] + [b for _, b in tiled[:-1]] or tiled[-1][1] != shape[dim]:
            raise ConfigError(f"hft: {name!r} has {shape[dim]} output rows, which the {info.model_type} layout "
                              f"({info.heads} heads, {info.kv_heads} kv heads) does not split; use mode 'patterns'")
        for part, sp in spans.items():
            parts.setdefault(part, []).append(Piece(name, dim, sp))
    return [Unit(f"{module}[{part}]", pieces) for part, pieces in parts.items()]


# ---- a block's units ----------------------------------------------------------------------------------------------

def _projection_units(modules: dict[str, list[str]], shapes: dict[str, Any], info: ModelInfo) -> list[Unit]:
    units: list[Unit] = []
    for module, names in sorted(modules.items()):
        fused = _fused_units(module, names, shapes, info)
        units += fused if fused is not None else [Unit(module, [Piece(n) for n in sorted(names)])]
    return units


def _expert_units(block: str, mlp: dict[str, list[str]], shapes: dict[str, Any]) -> tuple[list[Unit], list[str]]:
    """MLP units of an MoE block (experts, shared expert) and its router parameters."""
    units: dict[str, list[Piece]] = {}
    router: list[str] = []
    for module, names in sorted(mlp.items()):
        segs = module.split(".")
        at = next((i for i, s in enumerate(segs) if _EXPERTS_SEG.match(s)), None)
        shared = next((i for i, s in enumerate(segs) if _SHARED_SEG.match(s)), None)
        if at is not None and at == len(segs) - 1:  # fused 3-D stacks: expert e is index e of dim 0
            sizes = {_need_shape(n, shapes.get(n))[0] for n in names}
            if len(sizes) != 1:
                raise ConfigError(f"hft: the expert tensors of {module!r} disagree on the expert count {sorted(sizes)}")
            for e in range(sizes.pop()):
                units.setdefault(f"{module}[{e:04d}]", []).extend(Piece(n, 0, ((e, e + 1),)) for n in names)
        elif at is not None and segs[at + 1].isdigit():  # a ModuleList of experts: expert j's modules
            units.setdefault(f"{'.'.join(segs[:at + 1])}[{int(segs[at + 1]):04d}]", []).extend(map(Piece, names))
        elif shared is not None:  # the shared expert counts as one more expert
            units.setdefault(".".join(segs[:shared + 1]), []).extend(map(Piece, names))
        elif _ROUTER_SEG.search(segs[-1]):
            router += names
        else:
            raise ConfigError(f"hft: {names[0]!r} in the MoE block {block!r} is neither an expert, a shared expert "
                              "nor the router; use trainable mode 'patterns' for this architecture")
    return [Unit(k, sorted(v, key=lambda p: (p.name, p.spans))) for k, v in sorted(units.items())], router


def block_units(shapes: dict[str, Any], info: ModelInfo) -> dict[str, BlockUnits]:
    """Every block's units, from plain parameter names (``shapes`` maps each to its shape, or None).

    A parameter inside a block that is neither attention, MLP nor norm is an error: "half of the block" would
    then silently mean something else.
    """
    grouped: dict[str, dict[str, dict[str, list[str]]]] = {}
    out: dict[str, BlockUnits] = {}
    for name in shapes:
        kind, block, module = classify(name)
        if block is None:
            continue
        if kind == "block_other":
            raise ConfigError(f"hft: parameter {name!r} in block {block!r} is neither attention, MLP nor norm; "
                              "use trainable mode 'patterns' for this architecture")
        out.setdefault(block, BlockUnits()).category[name] = kind
        if kind in ("attn", "mlp"):
            grouped.setdefault(block, {"attn": {}, "mlp": {}})[kind].setdefault(module, []).append(name)
    for block, kinds in grouped.items():
        units = out[block]
        units.attn = _projection_units(kinds["attn"], shapes, info)
        units.moe = any(_EXPERTS_SEG.match(s) for m in kinds["mlp"] for s in m.split("."))
        if units.moe:
            units.mlp, units.router = _expert_units(block, kinds["mlp"], shapes)
        else:
            units.mlp = _projection_units(kinds["mlp"], shapes, info)
    return out


# ---- partly trained tensors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """A partly trained tensor: the index ``spans`` along ``dim`` (of ``size``) train, the rest is frozen."""

    dim: int
    spans: Spans
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "trained": [list(s) for s in self.spans], "of": self.size}


def merge_pieces(pieces: list[Piece], shape: tuple[int, ...] | None) -> bool | Part:
    """The decision on one tensor from the drawn pieces of it: whole, none, or the union of their spans."""
    if not pieces:
        return False
    if any(p.dim is None for p in pieces):
        return True
    dim, spans = pieces[0].dim, sorted(s for p in pieces for s in p.spans)
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    size = shape[dim]
    return True if merged == [(0, size)] else Part(dim, tuple(merged), size)


class FrozenSlices:
    """The frozen parts of partly trained tensors, kept bit-identical through training.

    ``add`` snapshots a tensor's frozen part and hooks its gradient to zero there (so clipping and the
    optimizer's moments see only the trained part); ``restore`` copies the snapshots back, and ``callback``
    is a transformers ``TrainerCallback`` that restores after every optimizer step (weight decay included).
    """

    def __init__(self) -> None:
        self.entries: list[list[Any]] = []  # [param, dim, frozen indices, snapshot]
        self.handles: list[Any] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, param: Any, part: Part) -> None:
        import torch

        keep = torch.zeros(part.size, dtype=torch.bool)
        for a, b in part.spans:
            keep[a:b] = True
        frozen = (~keep).nonzero().flatten().to(param.device)
        self.entries.append([param, part.dim, frozen, param.detach().index_select(part.dim, frozen)])  # a copy
        self.handles.append(param.register_hook(_zero_grad_hook(part.dim, frozen)))

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for entry in self.entries:
                param, dim, frozen, snapshot = entry
                if frozen.device != param.device or snapshot.dtype != param.dtype:  # the trainer moved the model
                    entry[2] = frozen = frozen.to(param.device)
                    entry[3] = snapshot = snapshot.to(param.device, param.dtype)
                param.index_copy_(dim, frozen, snapshot)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.entries, self.handles = [], []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class _Restore(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kw):
                guard.restore()

        return _Restore()


def _zero_grad_hook(dim: int, frozen: Any):
    on_device: dict[Any, Any] = {}

    def hook(grad):
        if grad.device not in on_device:
            on_device[grad.device] = frozen.to(grad.device)
        return grad.index_fill(dim, on_device[grad.device], 0)

    return hook
