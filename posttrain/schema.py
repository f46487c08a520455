"""The schema every config is read with: strict pydantic models, one-line errors, capped YAML.

`Strict` forbids unknown keys and refuses a boolean where a number is wanted (`max_steps: true` is not 1; an int
is still a float). `validated` turns pydantic's errors into one `ConfigError` line naming the file and the dotted
key path, with "did you mean" for an unknown key, or the nested block's field for a TRL-style flat key
(`learning_rate` -> `trainer.learning_rate`). `read_yaml` reads every config file within `yaml_caps`'s limits.
Every layer above uses these; the pipeline's own config and `--set` live in `posttrain.config`.
"""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from posttrain import yaml_caps
from posttrain.registry import did_you_mean


def dotted(loc: tuple) -> str:
    """A pydantic location as a key path: ('stages', 0, 'model') -> 'stages[0].model'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class ConfigError(ValueError):
    """A config problem the user must fix; its message is one line."""


# Names that become folder names (stages, the pipeline's run dir): no slashes, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: Any) -> Any:
        # pydantic's lax mode reads True as 1 for an int or float field; a YAML `true` there is a mistake. Full
        # strict mode would also refuse the ints YAML gives float fields, so only bools are refused, here.
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and isinstance(v, (bool, list, dict)) and _bool_for_number(v, field.annotation):
            raise ValueError(f"expected a number, got {v!r}" if isinstance(v, bool) else
                             "expected a number for every entry, got a boolean (true/false)")
        return v


def _bool_for_number(v: Any, tp: Any) -> bool:
    """True when `v` is (or holds, in a list or dict value) a bool where `tp` wants an int or float."""
    alts = unwrap(tp, into_containers=False)
    if isinstance(v, bool):
        return bool not in alts and Any not in alts and any(t in (int, float) for t in alts)
    for t in alts:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if isinstance(v, list) and origin in (list, tuple, set) and args:
            return any(_bool_for_number(x, args[0]) for x in v)
        if isinstance(v, dict) and origin is dict and len(args) == 2:
            return any(_bool_for_number(x, args[1]) for x in v.values())
    return False


class Nested(ValueError):
    """Carries an already-formatted path out of a nested validation."""


def validated(cls: type[BaseModel], data: Any, where: str) -> BaseModel:
    """`cls.model_validate(data)`, or ConfigError `<where>: <key path>: <problem>` in one line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_error(e, cls)}") from None


def validate_in(cls: type[BaseModel], data: dict, prefix: str) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise Nested(format_error(e, cls, prefix)) from None


def unwrap(tp: Any, into_containers: bool = True) -> list[Any]:
    """The alternatives of an annotation through Optional/Union/Annotated and, with `into_containers`, the
    concrete types inside list/tuple/set/dict (a dict's values); without, list/dict types stay whole."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in unwrap(a, into_containers)]
    if origin is typing.Annotated:
        return unwrap(typing.get_args(tp)[0], into_containers)
    if into_containers and origin in (list, tuple, set):
        return [t for a in typing.get_args(tp) for t in unwrap(a)]
    if into_containers and origin is dict:
        return unwrap(typing.get_args(tp)[1])
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
        models = [t for t in unwrap(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        current = models[0] if models else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_error(e: ValidationError, cls: type[BaseModel], prefix: str = "") -> str:
    errors = e.errors()
    # An unknown key first: a mistyped required key also reports the real one missing, which hides the typo.
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = dotted(loc)
    full = f"{prefix}.{path}" if prefix and path else (prefix or path)
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if isinstance(err.get("ctx", {}).get("error"), Nested):
        return msg
    if err["type"] == "extra_forbidden":
        owner = _model_at(cls, loc)
        fields = list(owner.model_fields) if owner else []
        key = str(loc[-1])  # a nested field of that exact name beats a fuzzy match (num_train_epochs: trainer)
        hint = key_hint(owner, key)
        return f"{full}: unknown key{hint}" + (f"; known: {', '.join(fields)}" if fields and not hint else "")
    inp = err.get("input")
    # The input only when it is short and not already quoted: a stage's dict or the whole stages list would
    # turn the one line into a dump of the config.
    if "input" in err and err["type"] != "missing" and not isinstance(inp, (dict, list, tuple, set, BaseModel)) \
            and len(repr(inp)) <= 80 and repr(inp) not in msg:
        return f"{full}: {msg} (got {inp!r})"
    return f"{full}: {msg}" if full else msg


def key_hint(owner: type[BaseModel] | None, key: str) -> str:
    """Did-you-mean for an unknown key of `owner`: a nested field of that exact name (num_train_epochs:
    trainer's), a close own field, a close nested field (learning_rat: trainer.learning_rate, not the own
    padding_free that a loose match would pick), a loosely close own field; '' when nothing is close."""
    fields = list(owner.model_fields) if owner else []
    return (nested_hint(owner, key, exact=True) or _close(key, fields, 0.8) or nested_hint(owner, key)
            or did_you_mean(key, fields))


def _close(key: str, fields: list[str], cutoff: float) -> str:
    close = difflib.get_close_matches(key, fields, n=3, cutoff=cutoff)
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""


def nested_hint(owner: type[BaseModel] | None, key: str, exact: bool = False) -> str:
    """' (did you mean 'trainer.learning_rate'?)' when `key` (or a close spelling) is a field of a block nested
    in `owner` (TRL-style flat keys at stage level), else ''."""
    if owner is None:
        return ""
    nested: dict[str, list[str]] = {}  # field name -> dotted paths
    for name, field in owner.model_fields.items():
        for sub in unwrap(field.annotation, into_containers=False):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                for leaf in sub.model_fields:
                    nested.setdefault(leaf, []).append(f"{name}.{leaf}")
    leaves = [key] if key in nested else [] if exact else difflib.get_close_matches(key, list(nested), n=2,
                                                                                      cutoff=0.8)
    paths = [p for leaf in leaves for p in nested[leaf]]
    return " (did you mean " + " or ".join(repr(p) for p in paths) + "?)" if paths else ""


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping (every config YAML is read here), within `yaml_caps`'s limits: a file over 1 MB
    or an alias bomb is a one-line ConfigError, decided before anything is built from it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml_caps.read(p) or {}
    except yaml_caps.YamlRefused as e:
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within `yaml_caps`'s limits (a `--set` value); ConfigError naming ``where``."""
    try:
        return yaml_caps.load(text, where)
    except yaml_caps.YamlRefused as e:
        raise ConfigError(str(e)) from None
