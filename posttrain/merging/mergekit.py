"""A mergekit YAML (the file `mergekit-yaml` reads) as a posttrain merge stage config, for the methods both have.

    merge_method: ties                  # -> method: ties
    base_model: org/base                # -> base: org/base
    models:
      - model: org/a                    # -> models: [{model: org/a, weight: 0.5}]
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, int8_mask: true, lambda: 1.0}
    dtype: bfloat16                     # -> dtype: float32 (posttrain's math is float32 or float64)

Names, mergekit -> posttrain (checked against mergekit's main branch, `merge_methods/registry.py`,
`generalized_task_arithmetic.py` and `sparsify.py`; the README's method table has the same map):

- per model (``models[i].parameters``, or a default for every model in ``parameters``): ``weight`` -> that
  model's ``weight``; ``density``, ``epsilon`` (della) -> ``params.density`` / ``params.epsilon``, one number
  when every model has the same, else a list with one per model; breadcrumbs' ``gamma`` (the top fraction
  removed) -> ``params.beta``, and 1 − ``density`` − ``gamma`` (the bottom fraction removed) -> ``params.gamma``.
- ``lambda`` -> ``params.lam``; ``t`` (slerp) -> ``params.t``; ``normalize`` -> ``params.normalize``: for the
  sign-electing methods (ties, dare_ties, della) true is ``weights`` (divide by the agreeing models' summed
  weights) and false ``none``; linear keeps it as is; task_arithmetic, dare_linear and breadcrumbs take false only.
- mergekit's default of every parameter is written out (its ties density is 1, posttrain's 0.2), so the stage
  computes what mergekit would, up to rounding and these departures: DARE and DELLA rescale kept entries by
  1/keep probability (the papers; mergekit 0.1's ``rescale: true`` matches the L1 norm instead), so they take
  ``rescale: true`` only, and the methods that never rescale take ``rescale: false`` only; ``int8_mask`` (the
  mask's dtype) changes no value and is dropped; model_stock is per tensor (``filter_wise: false`` only).
- ``dtype`` float64 -> ``dtype: float64``, any other -> ``float32`` (posttrain computes in float32 at least and
  writes the inputs' dtype; ``out_dtype`` is refused).

A model listed as ``base_model`` among ``models`` is left out of them (mergekit skips its task vector). Anything
else (``slices``, gradients and per-tensor filters as values, LoRA ``+`` references, methods posttrain lacks) is
refused with one line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.registry import MERGE_METHODS, did_you_mean
from posttrain.schema import ConfigError, read_yaml

__all__ = ["from_mergekit", "MERGEKIT_DEFAULTS"]

# mergekit's defaults per method (registry.py: default_normalize, default_rescale; the tensor parameters'
# default_value): what a mergekit YAML means where it says nothing.
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": False, "lambda": 1.0},
    "ties": {"normalize": True, "rescale": False, "lambda": 1.0, "density": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
    "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
    "breadcrumbs": {"normalize": False, "rescale": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
    "della": {"normalize": True, "rescale": True, "lambda": 1.0, "density": 1.0, "epsilon": 0.15},
    "slerp": {},
    "model_stock": {"filter_wise": False},
}
_GLOBAL = {"normalize", "rescale", "lambda", "int8_mask", "t", "filter_wise"}
_PER_MODEL = {"weight", "density", "epsilon", "gamma"}
_SIGN_ELECTING = ("ties", "dare_ties", "della")
_TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source"}


def from_mergekit(path: str | Path) -> dict[str, Any]:
    """The merge stage config (a dict for MergeStageConfig) that the mergekit YAML at ``path`` describes;
    ConfigError (one line, naming the file and the key) for what has no posttrain equivalent."""
    doc = read_yaml(path)
    where = str(path)

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {why}")

    for key in doc:
        if key not in _TOP_LEVEL:
            why = ("layer ranges are not mapped: give whole models under models:" if key == "slices"
                   else f"not a mergekit key posttrain maps{did_you_mean(key, sorted(_TOP_LEVEL))} (it maps "
                        f"{', '.join(sorted(_TOP_LEVEL))})")
            raise refuse(key, why)
    method = doc.get("merge_method")
    if not isinstance(method, str) or method not in MERGEKIT_DEFAULTS:
        raise refuse("merge_method", f"{method!r} has no posttrain method (posttrain imports "
                                     f"{', '.join(MERGEKIT_DEFAULTS)})")
    MERGE_METHODS.get(method)  # every imported name is a registered method
    if doc.get("tokenizer_source") not in (None, "base"):
        raise refuse("tokenizer_source", "posttrain copies the base's tokenizer: only `base` is mapped")
    base = _model_ref(doc.get("base_model"), "base_model", refuse) if doc.get("base_model") is not None else None
    glob = _values(doc.get("parameters") or {}, "parameters", refuse, _GLOBAL | _PER_MODEL)
    per_model = {"weight"} | (_PER_MODEL & set(MERGEKIT_DEFAULTS[method]))
    known = per_model | (set(MERGEKIT_DEFAULTS[method]) & _GLOBAL) | {"int8_mask"}
    known |= {"t"} if method == "slerp" else set()
    for k in glob:
        if k not in known:
            raise refuse(f"parameters.{k}", f"has no effect in mergekit's {method} and no posttrain parameter")
    models = _models(doc.get("models"), method, base, {k: v for k, v in glob.items() if k in per_model}, per_model,
                     refuse)
    if method == "linear" and base is not None:
        raise refuse("base_model", "linear averages `models:` only; list the base among them to include it")
    if method != "linear" and base is None:  # mergekit requires one too; the stage would fall back to its default
        raise refuse("base_model", f"{method} merges task vectors against a base: name it (base_model: org/base)")
    settings = {**MERGEKIT_DEFAULTS[method], **{k: v for k, v in glob.items() if k in _GLOBAL}}
    params = _params(method, settings, models, refuse)
    dtype = doc.get("dtype", "float32")
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise refuse("dtype", f"{dtype!r} is not a dtype mergekit computes in")
    weights = [1.0 if method in ("model_stock", "slerp") else float(p.get("weight", 1.0)) for _, p in models]
    cfg: dict[str, Any] = {"kind": "merge", "method": method}
    if base is not None:
        cfg["base"] = base
    cfg["models"] = [{"model": ref, "weight": w} for (ref, _), w in zip(models, weights)]
    cfg["params"] = params
    cfg["dtype"] = "float64" if dtype == "float64" else "float32"
    return cfg


def _models(entries: Any, method: str, base: str | None, defaults: dict[str, Any], per_model: set[str],
            refuse) -> list[tuple[str, dict[str, Any]]]:
    """(reference, per-model parameters with the global ``defaults`` under them) for each entry of ``models:``
    that is not the base."""
    if not isinstance(entries, list) or not entries:
        raise refuse("models", "give a list of {model: ..., parameters: {...}}")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            raise refuse(f"models[{i}]", "only `model` and `parameters` are mapped")
        ref = _model_ref(entry.get("model"), f"models[{i}].model", refuse)
        own = _values(entry.get("parameters") or {}, f"models[{i}].parameters", refuse, _PER_MODEL)
        for k in own:
            if k not in per_model:
                raise refuse(f"models[{i}].parameters.{k}", f"has no effect in mergekit's {method} and no "
                                                            "posttrain parameter")
        if ref != base:  # the base's task vector is zero: mergekit skips it
            models.append((ref, defaults | own))
    if not models:
        raise refuse("models", "no model besides base_model")
    return models


def _model_ref(value: Any, key: str, refuse) -> str:
    if not isinstance(value, str) or not value:
        raise refuse(key, "give a model path or hub name (a string)")
    if "+" in value:
        raise refuse(key, f"{value!r}: a model+LoRA reference is not mapped (give the adapter folder as a model)")
    return value


def _values(block: Any, key: str, refuse, known: set[str]) -> dict[str, Any]:
    """A mergekit `parameters:` block whose keys are all ``known`` and whose values are plain numbers or
    booleans (mergekit's gradients, lists, and per-tensor filters, dicts, are not mapped)."""
    if not isinstance(block, dict):
        raise refuse(key, "expected a mapping")
    for k, v in block.items():
        if k not in known:
            raise refuse(f"{key}.{k}", f"no posttrain parameter for it{did_you_mean(k, sorted(known))} (mapped: "
                                       f"{', '.join(sorted(known))})")
        if isinstance(v, (list, dict)) or not isinstance(v, (int, float, bool)):
            raise refuse(f"{key}.{k}", "gradients and per-tensor filters are not mapped: give one number")
    return dict(block)


def _per_model(name: str, models: list[tuple[str, dict]], default: float) -> float | list[float]:
    values = [float(p.get(name, default)) for _, p in models]
    return values[0] if len(set(values)) == 1 else values


def _params(method: str, s: dict[str, Any], models: list[tuple[str, dict]], refuse) -> dict[str, Any]:
    """posttrain's ``params:`` for ``method`` from mergekit's settings ``s`` (its defaults filled in)."""
    rescales = method in ("dare_linear", "dare_ties", "della")
    if "rescale" in s and bool(s["rescale"]) != rescales:
        why = ("always divides kept entries by their keep probability (the paper; mergekit 0.1 matches the L1 "
               "norm)" if rescales else "never rescales kept entries")
        raise refuse("parameters.rescale", f"posttrain's {method} {why}: only rescale: {str(rescales).lower()} "
                                           "is mapped")
    if s.get("filter_wise"):
        raise refuse("parameters.filter_wise", "posttrain's model_stock is per tensor: only false is mapped")
    params: dict[str, Any] = {}
    if method == "linear":
        params["normalize"] = bool(s["normalize"])
    elif method in _SIGN_ELECTING:
        params["normalize"] = "weights" if s["normalize"] else "none"
    elif s.get("normalize"):
        raise refuse("parameters.normalize", f"posttrain's {method} does not divide by the summed weights: "
                                             "only normalize: false is mapped (divide the weights instead)")
    if "lambda" in s:
        params["lam"] = float(s["lambda"])
    if method == "slerp":
        if "t" not in s:
            raise refuse("parameters.t", "slerp needs t")
        params["t"] = float(s["t"])
        if len(models) != 1:
            raise refuse("models", f"slerp interpolates base_model and one model, got {len(models)} besides the base")
    if method in ("ties", "dare_linear", "dare_ties", "della"):
        params["density"] = _per_model("density", models, s["density"])
    if method == "della":
        params["epsilon"] = _per_model("epsilon", models, s["epsilon"])
    if method == "breadcrumbs":
        params["beta"], params["gamma"] = _breadcrumbs(models, s, refuse)
    return params


def _breadcrumbs(models: list[tuple[str, dict]], s: dict[str, Any], refuse) -> tuple[Any, Any]:
    """mergekit's (density kept, gamma top removed) -> posttrain's (beta top removed, gamma bottom removed).
    mergekit with density 1 prunes nothing, outliers included. Counts may differ from mergekit's by up to two
    entries per model and tensor: mergekit floors the kept count density·n and the top count gamma·n, posttrain
    the top and the bottom counts (docs/notes/merging.md: 3 of 7,248 entries per tensor on tiny Llamas)."""
    betas, gammas = [], []
    for i, (_, p) in enumerate(models):
        density, top = float(p.get("density", s["density"])), float(p.get("gamma", s["gamma"]))
        if density >= 1.0:
            betas.append(0.0)
            gammas.append(0.0)
            continue
        bottom = round(1.0 - density - top, 12)  # 12 digits: 1 − 0.9 − 0.01 is 0.09, not 0.0899999...
        if bottom < 0 or top < 0:
            raise refuse(f"models[{i}].parameters", f"density {density} + gamma {top} must not exceed 1")
        betas.append(top)
        gammas.append(bottom)
    one = len(set(betas)) == 1 and len(set(gammas)) == 1
    return (betas[0], gammas[0]) if one else (betas, gammas)
