"""`posttrain list`: every key a pipeline YAML can hold, with its default."""
from __future__ import annotations

import argparse
import inspect
import typing

from pydantic import BaseModel

import posttrain.stages  # noqa: F401  (registers every stage kind)
from evals.config import EvalConfig
from posttrain.config import PipelineConfig
from posttrain.registry import MERGE_METHODS, REWARDS, STAGES
from posttrain.rewards.builtin import FROM_SPEC


def list_keys(_: argparse.Namespace) -> int:
    """Every key a pipeline YAML can hold, with its default: the top level, each stage kind, the built-in
    rewards and the merge methods."""
    print("pipeline (top level):")
    for name in ("name", "seed", "report_to"):
        print(f"  {name}: {PipelineConfig.model_fields[name].default!r}")
    print("  push: None  (when set: {repo: org/name, stage: None (the last stage), private: False})")
    print("  eval:")
    print("\n".join(_fields(EvalConfig(), "    ")))
    print("  stages: [one of the kinds below, each with `kind:`]")
    for kind in STAGES.names():
        spec = STAGES.get(kind)
        print(f"{kind}: {spec.doc}")
        for line in _fields(spec.config(), "  "):
            print(line)
    print("rewards (grpo `rewards: [{name, weight, params, ...}]`; or path/to/file.py:function):")
    for name in REWARDS.names():
        print(f"  {name}: params {_keyword_params(REWARDS.get(name))}")
    print(f"merge methods (merge `method:`): {', '.join(MERGE_METHODS.names())}")
    return 0


def _keyword_params(fn) -> str:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in FROM_SPEC]
    return ", ".join(p.name + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
                     for p in params) or "none"


def _fields(obj, indent: str) -> list[str]:
    """`obj`'s fields with their values; a list of configs shows each entry whole, an unset optional config
    (`lora: None`) the fields it takes when set."""
    lines = []
    for name, field in type(obj).model_fields.items():
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _fields(value, indent + "  ")
        elif isinstance(value, list):
            lines.append(f"{indent}{name}: {[_every_field(v) if isinstance(v, BaseModel) else v for v in value]!r}")
        elif value is None and (unset := _optional_config(field.annotation)) is not None:
            lines.append(f"{indent}{name}: None  (when set: {_one_line(unset)})")
        else:
            lines.append(f"{indent}{name}: {value!r}")
    return lines


def _every_field(cfg) -> dict:
    """`cfg.model_dump()` with the fields a dump leaves out at their default (a data source's max_row_bytes)."""
    return {**{k: getattr(cfg, k) for k in type(cfg).model_fields}, **cfg.model_dump()}


def _optional_config(annotation):
    """A default instance of the config class in `X | None`, if it has one (lora, search, ...)."""
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            try:
                return arg()
            except Exception:  # noqa: BLE001 - a config with required fields: shown as None only
                return None
    return None


def _one_line(cfg) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in _every_field(cfg).items())
