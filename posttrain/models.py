"""Load and save Hugging Face model folders: safetensors only unless pickle is allowed, tokenizer, dtype.

A model reference is one of: `world` (the embedded base), a named world model registered in WORLD_MODELS
(e.g. `world-sft`, built and cached on first use), a local folder, or a hub name (`org/name`, loaded by
transformers from its cache; offline machines need it cached already).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from posttrain.registry import Registry, did_you_mean

# Named models of the embedded world: name -> function(log) returning a local HF folder (built once, cached).
WORLD_MODELS: Registry[Callable[..., Path]] = Registry("world model")


def _world_base(log: Callable[[str], None] = print) -> Path:
    from posttrain.world import base_model

    return base_model(log)


WORLD_MODELS.register("world", _world_base)


class ModelError(ValueError):
    """A model reference or folder the user must fix (one line)."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_model(ref: str, log: Callable[[str], None] = print) -> str:
    """Turn a reference into something `from_pretrained` takes: a local folder path or a hub name."""
    if ref in WORLD_MODELS:
        return str(WORLD_MODELS.get(ref)(log=log))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path.resolve())
    if ref.startswith(("world", ".", "/", "~")) or ref.count("/") != 1:
        hint = did_you_mean(ref, WORLD_MODELS.names())
        raise ModelError(f"model {ref!r} is not a folder, a world model{hint} or a hub name (org/name)")
    return ref  # a hub name


def check_weights(folder: str, allow_pickle: bool) -> None:
    """Refuse pickle weights (arbitrary code on load) unless the config opts in with allow_pickle: true."""
    path = Path(folder)
    if not path.is_dir():
        return  # hub names are checked by transformers with use_safetensors
    has_safe = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    if pickles and not has_safe and not allow_pickle:
        raise ModelError(
            f"{path}: weights are pickle files ({', '.join(sorted(pickles)[:3])}), which can run code when loaded; "
            "convert them to safetensors or set allow_pickle: true in the stage config"
        )
    if not has_safe and not pickles:
        raise ModelError(f"{path}: no weights found (*.safetensors)")


def check_remote_code(folder: str, trust_remote_code: bool) -> None:
    """Refuse a folder whose config names its own Python code (`auto_map`) unless the config opts in."""
    path = Path(folder)
    if trust_remote_code or not path.is_dir():
        return  # hub names: transformers refuses remote code itself while trust_remote_code is off
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
            modules = sorted({r.split("--")[-1].split(".")[0] + ".py" for r in refs})
            raise ModelError(
                f"{path}: {name} names the model's own code ({', '.join(modules) or 'auto_map'}), which runs when "
                "loaded; set trust_remote_code: true in the stage config if you trust it"
            )


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_remote_code(ref, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as TRL does when a tokenizer has no pad token
    return tok


def load_model(ref: str, *, dtype: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load a causal LM for training; float32 on CPU (bf16 matmuls are slow and lossy there)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_weights(ref, allow_pickle)
    check_remote_code(ref, trust_remote_code)
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return AutoModelForCausalLM.from_pretrained(
        ref,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )


# Below this size a CPU run uses one torch thread. Measured on 2 cores with the world's 1M-parameter model:
# `make stage=sft` trained in 349 s with torch's default 2 threads while one other torch process ran, and in
# 40 s with one thread; the world eval took 12.5 s vs 5.5 s. On matrices this small intra-op threading costs
# more than it gains, and two spinning thread pools on 2 cores thrash.
SMALL_MODEL_PARAMS = 20_000_000


def fit_cpu_threads(n_params: int) -> bool:
    """Use one torch thread for a small model on CPU unless OMP_NUM_THREADS says otherwise; True if set."""
    import torch

    if n_params >= SMALL_MODEL_PARAMS or "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return False
    torch.set_num_threads(1)
    return True


def folder_params(folder: str) -> int:
    """Parameters of a local model folder, estimated from its safetensors bytes at 4 bytes each (exact for
    float32, half the true count for bf16); a hub name or a folder without safetensors counts as large."""
    path = Path(folder)
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) // 4 if files else SMALL_MODEL_PARAMS


def save_model_folder(model: Any, tokenizer: Any, out: Path) -> Path:
    """Write a complete HF folder: config, safetensors weights, tokenizer (with chat template), generation config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (out / "generation_config.json").is_file():
        gen.save_pretrained(out)
    return out


# Named trained world models (world-sft, ...) register themselves; imported last to avoid a cycle.
from posttrain.world import trained as _trained  # noqa: E402,F401
