"""Strict pydantic configs and the YAML loader.

Every config class forbids unknown keys; defaults live only here; YAML files state differences. A bad key or
value raises `ConfigError` with one line naming the file, the dotted path and, for unknown keys, the closest
known field ("did you mean"). `--set a.b=v` overrides are typed by the schema: a string field keeps the raw
text, any other field parses it as YAML and lets pydantic coerce it.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from posttrain.registry import STAGES, RegistryError, did_you_mean


class ConfigError(ValueError):
    """A config problem the user must fix; its message is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EvalConfig(Strict):
    """The one eval block shared by every stage kind; the same settings run on base and after every stage."""

    enabled: bool = True
    suite: str = "world"
    limit: int | None = Field(100, ge=1, description="examples per task (None = all)")
    batch_size: int = Field(32, ge=1)
    backend: Literal["auto", "hf", "vllm"] = "auto"
    seed: int = 0
    num_fewshot: int = Field(0, ge=0)
    max_new_tokens: int = Field(24, ge=1)
    max_drop: dict[str, float] = Field(default_factory=dict, description="task -> allowed drop below base")
    on_drop: Literal["stop", "warn"] = "stop"


class PipelineConfig(Strict):
    """A pipeline YAML: stages run in order, each handing the next an HF model folder."""

    name: str = "pipeline"
    seed: int = 0
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stages: list[Any] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_kinds(cls, stages: Any) -> Any:
        if not isinstance(stages, list):
            return stages
        out = []
        for i, raw in enumerate(stages):
            if isinstance(raw, BaseModel):
                out.append(raw)
                continue
            if not isinstance(raw, dict) or "kind" not in raw:
                raise ValueError(f"stages[{i}] needs a 'kind' ({', '.join(STAGES.names())})")
            try:
                spec = STAGES.get(raw["kind"])
            except RegistryError as e:
                raise ValueError(f"stages[{i}].kind: {e}") from None
            out.append(_validate(spec.config, raw, prefix=f"stages[{i}]"))
        for i, stage in enumerate(out):  # unnamed stages: the kind, then kind<i>; checked with the rest below
            if stage.name is None:
                stage.name = stage.kind if i == 0 else f"{stage.kind}{i}"
        names = [s.name for s in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(sorted(dup))}")
        return out


class _Nested(ValueError):
    """Carries an already-formatted path out of a nested validation."""


def _validate(cls: type[BaseModel], data: dict, prefix: str) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _Nested(_format_error(e, cls, prefix)) from None


def _unwrap(tp: Any, into_containers: bool = True) -> list[Any]:
    """The alternatives of an annotation through Optional/Union/Annotated and, with `into_containers`, the
    concrete types inside list/tuple/set/dict (a dict's values); without, list/dict types stay whole."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a, into_containers)]
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0], into_containers)
    if into_containers and origin in (list, tuple, set):
        return [t for a in typing.get_args(tp) for t in _unwrap(a)]
    if into_containers and origin is dict:
        return _unwrap(typing.get_args(tp)[1])
    return [tp]


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the last element of `loc` (for did-you-mean on unknown keys)."""
    current: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        models = [t for t in _unwrap(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        current = models[0] if models else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_error(e: ValidationError, cls: type[BaseModel], prefix: str = "") -> str:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = _dotted(loc)
    full = f"{prefix}.{path}" if prefix and path else (prefix or path)
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if isinstance(err.get("ctx", {}).get("error"), _Nested):
        return msg
    if err["type"] == "extra_forbidden":
        owner = _model_at(cls, loc)
        fields = list(owner.model_fields) if owner else []
        return f"{full}: unknown key{did_you_mean(str(loc[-1]), fields)}" + (
            f"; known: {', '.join(fields)}" if fields and not did_you_mean(str(loc[-1]), fields) else ""
        )
    if "input" in err and err["type"] not in ("missing",):
        return f"{full}: {msg} (got {err['input']!r})"
    return f"{full}: {msg}" if full else msg


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _field_is_str(cls: type[BaseModel] | None, key: str, raw: str = "") -> bool:
    """True when `--set key=raw` should keep raw as a string rather than parse it as YAML."""
    if cls is None or key not in cls.model_fields:
        return False
    types_ = _unwrap(cls.model_fields[key].annotation, into_containers=False)
    if raw.lstrip()[:1] in ("[", "{") and any(typing.get_origin(t) in (list, tuple, set, dict) for t in types_):
        return False  # `str | list[str]` given a YAML list: the list
    literal_str = all(isinstance(a, str) for t in types_ if typing.get_origin(t) is Literal for a in typing.get_args(t))
    return any(t is str for t in types_) or (
        any(typing.get_origin(t) is Literal for t in types_) and literal_str
    )


def apply_override(data: dict, dotted: str, raw: str, root: type[BaseModel]) -> None:
    """Set `a.b.c=raw` in `data` in place; `stages.<i|name>.x` addresses a pipeline's stage."""
    if not dotted or any(not p for p in dotted.split(".")):
        raise ConfigError(f"--set {dotted}={raw}: expected a.b.c=value")
    parts = dotted.split(".")
    node: Any = data
    cls: Any = root
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node, cls = _stage_node(node, part, dotted), None
            cls = _stage_cls(node)
            continue
        if cls is not None and part not in cls.model_fields:
            raise ConfigError(f"--set {dotted}: unknown key '{part}'{did_you_mean(part, list(cls.model_fields))}")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        sub = cls.model_fields[part].annotation if cls is not None else None
        models = [t for t in _unwrap(sub) if isinstance(t, type) and issubclass(t, BaseModel)] if sub else []
        node, cls = nxt, (models[0] if models else None)
    key = parts[-1]
    if isinstance(node, list):
        raise ConfigError(f"--set {dotted}: cannot replace a whole stage")
    if cls is not None and key not in cls.model_fields:
        raise ConfigError(f"--set {dotted}: unknown key '{key}'{did_you_mean(key, list(cls.model_fields))}")
    node[key] = raw if _field_is_str(cls, key, raw) else yaml.safe_load(raw)


def _stage_node(stages: list, part: str, dotted: str) -> dict:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    for i, s in enumerate(stages):
        if s.get("name", s.get("kind") if i == 0 else None) == part:
            return s
    names = [s.get("name", s.get("kind")) for s in stages]
    raise ConfigError(f"--set {dotted}: no stage '{part}'{did_you_mean(part, names)}")


def _stage_cls(node: dict) -> type[BaseModel] | None:
    try:
        return STAGES.get(node.get("kind", "")).config
    except RegistryError:
        return None


def parse_sets(sets: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s}: expected key=value")
        k, v = s.split("=", 1)
        out.append((k.strip(), v))
    return out


def load_pipeline(path: str | Path | None, sets: list[str] | None = None, data: dict | None = None) -> PipelineConfig:
    """Read a pipeline YAML (or `data`), apply `--set` overrides, validate; errors name the file and path."""
    import posttrain.stages  # noqa: F401  (registers the stage kinds; a library caller need not know to)

    where = str(path) if path else "<config>"
    raw = read_yaml(path) if path else dict(data or {})
    for key, value in parse_sets(sets):
        apply_override(raw, key, value, PipelineConfig)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_format_error(e, PipelineConfig)}") from None
    return _check_files(cfg, where)


def stage_pipeline(kind: str, path: str | Path | None, sets: list[str] | None, base: dict | None = None) -> PipelineConfig:
    """A one-stage pipeline for `posttrain stage <kind>`; `--set` paths are relative to the stage."""
    import posttrain.stages  # noqa: F401  (registers the stage kinds)

    try:
        spec = STAGES.get(kind)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    where = str(path) if path else f"<{kind} defaults>"
    stage = read_yaml(path) if path else {}
    if stage.get("kind", kind) != kind:
        raise ConfigError(f"{where}: kind is {stage['kind']!r} but the command asked for {kind!r}")
    stage["kind"] = kind
    pipe = dict(base or {})
    for key, value in parse_sets(sets):
        if key.startswith("eval.") or key == "seed":  # pipeline-level settings stay reachable
            apply_override(pipe, key, value, PipelineConfig)
        else:
            apply_override(stage, key, value, spec.config)
    try:
        validated = spec.config.model_validate(stage)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_format_error(e, spec.config)}") from None
    pipe.setdefault("name", kind)
    pipe["stages"] = [validated]
    try:
        cfg = PipelineConfig.model_validate(pipe)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_format_error(e, PipelineConfig)}") from None
    return _check_files(cfg, where, prefix="")


def _check_files(cfg: PipelineConfig, where: str, prefix: str = "stages[{i}].") -> PipelineConfig:
    """Refuse local data files that do not exist now, not after the base model was loaded and evaluated."""
    from posttrain.data import missing_file

    for i, stage in enumerate(cfg.stages):
        for j, src in enumerate(getattr(stage, "data", None) or []):
            path = missing_file(src)
            if path is not None:
                raise ConfigError(f"{where}: {prefix.format(i=i)}data[{j}].source: data file {path} not found")
    return cfg
