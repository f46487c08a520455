"""Load and save Hugging Face model folders: safetensors only unless pickle is allowed, tokenizer, dtype.

A model reference is one of: `world` (the embedded base), a named world model registered in WORLD_MODELS
(e.g. `world-sft`, built and cached on first use), a local folder, or a hub name (`org/name`, or a bare `gpt2`,
either with an optional `@revision`), resolved to the hub cache's snapshot folder of the commit that revision
points at now (posttrain.hub_pins; downloaded when the hub can be reached, else it must be cached already).
An `org/name` whose `org/` is a local folder counts as a hub name only when the hub cache holds it: otherwise
it is a mistyped folder. A bare name that starts with `world` or is close to a world model's name (`wrold`) is
a typo of it unless the hub cache holds it.

A folder whose config names its own code (`auto_map`) loads only with `trust_remote_code`, except when its
`model_type` is one transformers has (Phi-3 as released): then transformers' own class loads it, as
transformers itself does with `trust_remote_code` off, and the output's config no longer names the code.

A trained stage writes its model in the dtype its input is stored in (`saved_dtype`), whatever dtype it trained
in, so a fine-tune stays comparable tensor by tensor with its base.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from posttrain.hub_pins import PinError, cached_pin_problem, model_snapshot, split_ref
from posttrain.registry import WORLD_MODELS, did_you_mean
from posttrain.tensors import ShardedReader


class ModelError(ValueError):
    """A model reference or folder the user must fix (one line)."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# config.json `dtype` values saved_dtype trusts: names of torch's floating dtypes ("auto" and junk are unknown).
_TORCH_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def resolve_model(ref: str, log: Callable[[str], None] = print) -> str:
    """Turn a reference into a local folder `from_pretrained` takes; a hub name (`org/name[@revision]`) into
    its snapshot folder `.../snapshots/<commit>` (posttrain.hub_pins.model_snapshot), so that every reader of it
    loads one commit, and DONE can name it.

    `models/llama_aa` has the shape of a hub name (`org/name`). When `models/` is a local folder and no hub model
    `models/llama_aa` is cached, it is far more likely a mistyped folder than a hub name, so it is refused here
    in one line, rather than handed to transformers, which retries the hub for about 50 s and then fails.
    """
    if ref in WORLD_MODELS:
        return str(WORLD_MODELS.get(ref)(log=log))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path.resolve())
    problem = mistyped_folder(ref) or bare_name_problem(ref) or cached_pin_problem(ref)
    if problem:
        raise ModelError(problem)
    if _hub_shaped(ref):
        if hub_cache_folder(ref) is None:
            hub_unreachable(ref)
        try:  # the snapshot folder of the commit the revision points at now (posttrain.hub_pins)
            return model_snapshot(ref, log)
        except PinError as e:
            raise ModelError(str(e)) from None
    raise ModelError(f"model {ref!r} is not a folder, a world model or a hub name (org/name or name)")


def _hub_shaped(ref: str) -> bool:
    """`org/name` or `name`, with or without `@revision`."""
    ref = split_ref(ref)[0]
    return not ref.startswith(("world", ".", "/", "~")) and ref.count("/") <= 1 and _valid_repo_id(ref)


def _valid_repo_id(ref: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def bare_name_problem(ref: str) -> str | None:
    """The one-line reason a bare name (no `/`) that is neither a world model nor a local folder cannot be a hub
    name, or None. `gpt2` is a hub name. Names starting with `world` belong to the world, so `world-sftt` is a
    typo; so is a name close to a world model's (`wrold`, the did-you-mean) unless the hub cache holds a model of
    that name. A name the hub does not allow (`my model`) is nothing. The rule `resolve_model` applies; the
    config check runs it at load. Reads names, the filesystem and the hub cache only, never the network."""
    if "/" in ref or ref in WORLD_MODELS or Path(ref).expanduser().exists():
        return None
    hint = did_you_mean(ref, WORLD_MODELS.names())
    if ref.startswith("world") or (hint and hub_cache_folder(ref) is None):
        return f"model {ref!r} is not a folder, a world model{hint} or a hub model cached here"
    if not _hub_shaped(ref):
        return f"model {ref!r} is not a folder, a world model or a hub name (org/name or name)"
    return None


def mistyped_folder(ref: str) -> str | None:
    """The one-line reason a missing `dir/name` (or deeper) path whose parent is a local folder is a mistyped
    folder, or None: when it exists, has no `/`, its parent is no local folder, or it is hub-shaped (`org/name`)
    and that hub model is cached. The rule `resolve_model` applies; the config check runs it at load. Reads the
    filesystem and the hub cache only, never the network."""
    path = Path(ref).expanduser()
    if "/" not in ref or path.exists() or not path.parent.is_dir():
        return None
    hub_shaped = _hub_shaped(ref)
    if hub_shaped and hub_cache_folder(ref) is not None:
        return None
    siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
    hub = ", and no hub model of that name is cached (download it first if you meant one)" if hub_shaped else ""
    return f"model {ref!r} is not a folder: {path.parent} has no {path.name!r}{did_you_mean(path.name, siblings)}{hub}"


def hub_unreachable(name: str) -> None:
    """Refuse, in one line and at once, a hub model that is not cached here while the hub cannot be reached
    (offline mode, or its host does not resolve); transformers would retry for ~25 s and fail with exit 1.
    A reachable hub is left to transformers, which downloads the model or names what is wrong."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    where = f"model {name!r} is not a folder, a world model or a hub model cached here"
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{where}, and HF_HUB_OFFLINE is set")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ModelError(f"{where}, and the hub ({host}) cannot be reached: {e}") from None


def hub_cache_folder(ref: str) -> Path | None:
    """The local snapshot folder of hub model `ref` (`name`, its `main` revision, or `name@revision`) when its
    config.json is cached, else None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    name, revision = split_ref(ref)
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (huggingface_hub's validation errors are ValueErrors)
        return None
    return Path(found).parent if isinstance(found, str) else None  # None, or the cached "no such file" marker


def check_weights(folder: str, allow_pickle: bool, opt_in: str = "set allow_pickle: true in the stage config") -> None:
    """Refuse pickle weights (arbitrary code on load) unless the caller opted in (`opt_in` says how)."""
    path = Path(folder)
    if not path.is_dir():
        return  # hub names are checked by transformers with use_safetensors
    has_safe = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    if pickles and not has_safe and not allow_pickle:
        raise ModelError(
            f"{path}: weights are pickle files ({', '.join(sorted(pickles)[:3])}), which can run code when loaded; "
            f"convert them to safetensors or {opt_in}"
        )
    if not has_safe and not pickles:
        raise ModelError(f"{path}: no weights found (*.safetensors)")


def check_remote_code(folder: str, trust_remote_code: bool, log: Callable[[str], None] | None = None,
                      opt_in: str = "set trust_remote_code: true in the stage config if you trust it") -> bool:
    """Refuse a folder whose config names its own Python code (`auto_map`) unless the caller opted in (`opt_in`
    says how), except where transformers has the class itself: a config.json whose `model_type` it knows (with
    a causal-LM class), a tokenizer_config.json whose `tokenizer_class` it has. Such a folder (Phi-3 as
    released) loads with transformers' class, as transformers itself loads it with trust_remote_code off, and
    `log` (default: stderr) says so once per folder. Returns True then: `load_model` and `load_tokenizer` drop the
    auto_map, so an output does not name code it does not carry. A hub name is read from the hub cache; one not
    cached is left to transformers, which refuses remote code itself while trust_remote_code is off."""
    path = Path(folder) if Path(folder).is_dir() else hub_cache_folder(folder)
    if trust_remote_code or path is None:
        return False
    native = []
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = _read_json(path / name).get("auto_map")
        if not auto_map:
            continue
        own = _transformers_class(path, name, auto_map)
        if own is None:
            refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
            modules = sorted({r.split("--")[-1].split(".")[0] + ".py" for r in refs})
            raise ModelError(f"{path}: {name} names the model's own code ({', '.join(modules) or 'auto_map'}), "
                             f"which runs when loaded; {opt_in}")
        native.append(f"{own} for {name}")
    if native and str(path) not in _NATIVE_NOTED:
        _NATIVE_NOTED.add(str(path))
        msg = (f"{path}: its auto_map names the model's own code, which transformers has built in: loading "
               f"{', '.join(native)}, not the folder's code")
        log(msg) if log else print(msg, file=sys.stderr, flush=True)
    return bool(native)


_NATIVE_NOTED: set[str] = set()  # folders check_remote_code has logged as loaded with transformers' classes


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _transformers_class(folder: Path, name: str, auto_map: dict) -> str | None:
    """The name of transformers' own class for what `name`'s auto_map points at, or None when it has none.
    Asked as transformers' Auto classes ask it (`has_local_code`): the config's model_type in CONFIG_MAPPING, the
    tokenizer config's tokenizer_class a class of transformers. A config.json auto_map that also names a
    tokenizer needs the tokenizer config's class too."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if name == "config.json":
        model_type = _read_json(folder / name).get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            return None
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map \
                and _transformers_class(folder, "tokenizer_config.json", {}) is None:
            return None
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    tokenizer_class = _read_json(folder / name).get("tokenizer_class")
    found = tokenizer_class_from_name(tokenizer_class) if isinstance(tokenizer_class, str) else None
    return found.__name__ if found is not None and found.__module__.startswith("transformers.") else None


def is_sequence_classifier(folder: str) -> bool:
    """True for a local folder whose config.json names only `*ForSequenceClassification` architectures (a reward
    stage's output): loaded as a causal LM it would get a new, random LM head."""
    archs = _read_json(Path(folder) / "config.json").get("architectures") or []
    return bool(archs) and all(str(a).endswith("ForSequenceClassification") for a in archs)


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    native = check_remote_code(ref, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    if native:
        tok.init_kwargs.pop("auto_map", None)  # else save_pretrained writes it back into tokenizer_config.json
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as TRL does when a tokenizer has no pad token
    return tok


def load_model(ref: str, *, dtype: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
               quantization_config: Any = None, scorer: bool = False):
    """Load a causal LM for training; float32 on CPU (bf16 matmuls are slow and lossy there).

    `scorer`: load it as a sequence classifier with one output (a reward model: transformers'
    `AutoModelForSequenceClassification`, `num_labels=1`); from a causal LM folder its score head is new and
    drawn from torch's generator, so the caller seeds it.

    The dtype trained in is not the dtype saved: `train_and_save` writes the input's stored dtype back
    (`saved_dtype`). So a bf16 model trained in float32 on CPU comes out bf16, and a float32 model (the world
    base) trained in bf16 on a bf16 GPU comes out float32, so that its fine-tunes still merge and transfer
    against that base (both refuse a dtype difference between a base and its fine-tune).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_weights(ref, allow_pickle)
    extra: dict[str, Any] = {} if quantization_config is None else {"quantization_config": quantization_config}
    if check_remote_code(ref, trust_remote_code):
        config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
        if hasattr(config, "auto_map"):
            del config.auto_map  # save_pretrained would write it into the output, which has no code to load
        extra["config"] = config
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if scorer:
        extra["num_labels"] = 1
    auto = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    return auto.from_pretrained(
        ref,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        **extra,
    )


def saved_dtype(ref: str | None) -> str | None:
    """The dtype a model's weights are stored in (`"bfloat16"`, `"float32"`, ...), None when unknown.

    Read from the safetensors headers: the floating dtype holding the most elements (a model that keeps a few
    tensors in another dtype counts as its main one). The headers, not config.json, because they are what the
    merge and transfer stages compare, and a config's `dtype`/`torch_dtype` is only what its writer claimed
    (hub configs saying float32 over bf16 weights exist). A folder with pickle weights only falls back to its
    config. A hub name is looked up in the local hub cache; one not cached, or not a folder at all, is None.
    """
    if not ref:
        return None
    folder = Path(ref) if Path(ref).is_dir() else hub_cache_folder(ref)
    if folder is None:
        return None
    counts: dict[str, int] = {}
    try:
        with ShardedReader(folder) as reader:  # pickle weights are refused here, unread: the config decides
            for _, shape, dtype in reader.layout():
                if dtype.is_floating_point:
                    key = str(dtype).removeprefix("torch.")
                    counts[key] = counts.get(key, 0) + math.prod(shape)
    except (OSError, ValueError):  # no safetensors, or a shard missing (transformers names it when it loads)
        pass
    if counts:
        return max(counts, key=counts.__getitem__)
    try:
        config = json.loads((folder / "config.json").read_text())
        found = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return found if found in _TORCH_FLOAT_DTYPES else None


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


def save_model_folder(model: Any, tokenizer: Any, out: Path, dtype: str | None = None) -> Path:
    """Write a complete HF folder: config, safetensors weights, tokenizer (with chat template), generation config.

    `dtype` (e.g. the input's `saved_dtype`) casts the model's floating weights, in place, before writing;
    config.json's `dtype` follows (transformers writes the model's dtype). None writes them as they are.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        cast_model(model, dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (out / "generation_config.json").is_file():
        gen.save_pretrained(out)
    return out


def cast_model(model: Any, dtype: str) -> Any:
    """Cast a model's floating parameters and buffers to `dtype` in place (integer tensors are left alone)."""
    import torch

    target = getattr(torch, dtype)
    if model.dtype == target:
        return model
    if target.itemsize > model.dtype.itemsize and model.device.type != "cpu":
        # bf16 -> float32 on the GPU would double the weights' memory next to the optimizer state the trainer
        # still holds there; save_pretrained copies every tensor to the CPU anyway, so cast there.
        model.to("cpu")
    return model.to(target)


def cast_saved_weights(folder: Path, dtype: str) -> bool:
    """Rewrite a model folder's safetensors with every floating tensor in `dtype`, and config.json's dtype;
    True if anything changed. For weights that `trainer.save_model` wrote (FSDP/DeepSpeed gather them from
    shards on save, so the model object cannot be cast beforehand)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder, target, changed = Path(folder), getattr(torch, dtype), False
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        if any(t.is_floating_point() and t.dtype != target for t in tensors.values()):
            tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
            save_file(tensors, str(file), metadata={"format": "pt"})
            changed = True
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / "model.safetensors.index.json"
    if changed and index.is_file():  # the index's total_size counts bytes, which changed with the dtype
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        if any(data.get(k) != dtype for k in keys):
            data.update(dict.fromkeys(keys, dtype))
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed = True
    return changed

