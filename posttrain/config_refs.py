"""Model references in stage configs, checked when a config loads (posttrain.config), before any stage runs:
every `${...}` must be `${stages.<an earlier stage>.model}`, and a model reference must be able to exist (not
empty, not a missing explicit path, not a typo of a world model's name, not a mistyped `dir/name`). The checks
read names, the filesystem and the hub cache only: they build no world model and ask no hub.
"""
from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from posttrain.hub_pins import cached_pin_problem
from posttrain.models import bare_name_problem, mistyped_folder
from posttrain.registry import did_you_mean
from posttrain.schema import dotted, unwrap

# `${stages.<name>.model}`, the one way a stage names an earlier stage's output (the pipeline resolves it).
STAGE_REF = re.compile(r"^\$\{stages\.([A-Za-z0-9_.-]+)\.model\}$")
_STAGE_FIELD_REF = re.compile(r"^\$\{stages\.([A-Za-z0-9_.-]+)\.([A-Za-z0-9_]+)\}$")


def _strings(obj: Any, loc: tuple = ()) -> typing.Iterator[tuple[tuple, str]]:
    """(key path, value) of every string in a dumped config."""
    if isinstance(obj, str):
        yield loc, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, loc + (k,))
    elif isinstance(obj, (list, tuple)):
        for j, v in enumerate(obj):
            yield from _strings(v, loc + (j,))


def stage_ref_problem(stage: Any, earlier: list[str], later: list[str] = (), prefix: str = "") -> str | None:
    """The one-line problem with the first `${...}` in `stage`'s config that is not exactly
    `${stages.<one of earlier>.model}`, or None. Any field is scanned, not only `model`/`other_inputs()`."""
    for loc, value in _strings(stage.model_dump()):
        if "${" not in value:
            continue
        where = f"{prefix}{dotted(loc)}"
        m = STAGE_REF.match(value)
        if m is None:
            f = _STAGE_FIELD_REF.match(value)
            hint = f" (did you mean '${{stages.{f.group(1)}.model}}'?)" if f else ""
            return f"{where}: {value} is not a model reference{hint}; write ${{stages.<earlier stage name>.model}}"
        name = m.group(1)
        if name in earlier:
            continue
        if name == stage.name:
            why = f" ('{name}' is this stage)"
        elif name in later:
            why = f" ('{name}' runs after this stage)"
        else:
            why = did_you_mean(name, earlier) or (f"; earlier stages: {', '.join(earlier)}" if earlier else "")
        return f"{where}: {value} names no earlier stage{why}"
    return None


def model_ref_problem(stage: Any, prefix: str = "") -> str | None:
    """The one-line problem with a model reference of `stage` (`model` and `other_inputs()`) that cannot exist:
    an empty one, an explicit local path (`/`, `./`, `../`, `~`) that is missing, a bare name (no `/`) that is a
    typo of a world model's or no hub name (`models.bare_name_problem`), or a `dir/name` whose `dir/` is a local
    folder without `name` (and, for `org/name`, no such model in the hub cache: `models.mistyped_folder`), or a
    hub name's `@revision` that is empty or, offline, not in the hub cache (`hub_pins.cached_pin_problem`); the
    rules `resolve_model` applies. Checks names, the filesystem and the hub cache only: builds no world model,
    asks no hub."""

    empty = _empty_model_ref(stage)
    if empty is not None:
        return f"{prefix}{dotted(empty)}: empty model reference{_default_hint(type(stage), empty)}"
    refs = ([stage.model] if stage.model else []) + list(stage.other_inputs())
    dumped = None
    for ref in dict.fromkeys(refs):
        if not ref or "${" in ref:
            continue
        path = Path(ref).expanduser()
        if path.exists():
            continue
        if ref.startswith(("/", "./", "../", "~")) or ref in (".", ".."):
            parent = path.parent
            hint = did_you_mean(path.name, [p.name for p in parent.iterdir()]) if parent.is_dir() else ""
            problem = f"model {ref!r} is not a folder (no such path){hint}"
        else:
            problem = mistyped_folder(ref) or bare_name_problem(ref) or cached_pin_problem(ref)
            if problem is None:
                continue
        dumped = dumped if dumped is not None else list(_strings(stage.model_dump()))
        loc = next((loc for loc, v in dumped if v == ref), ("model",))
        return f"{prefix}{dotted(loc)}: {problem}"
    return None


def _default_hint(cls: type[BaseModel], loc: tuple) -> str:
    """How to ask for the default of the stage field at `loc`: null (when None is allowed) or leaving it out."""
    field = cls.model_fields.get(loc[0]) if len(loc) == 1 else None
    if field is None or field.is_required():
        return ""
    if type(None) in unwrap(field.annotation, into_containers=False):
        return " (null or omit it for the default)"
    return " (omit it for the default)"


_PROBE = "posttrain-probe/empty-model-ref"


def _empty_model_ref(stage: Any) -> tuple | None:
    """The key path of the first empty (or blank) string where `stage` takes a model reference, or None.

    `Path("")` is `.`, and a stage may test an empty `base:` as unset in one place and as set in another, so ''
    is refused rather than read as either. Which empty strings are model references is asked of the stage
    itself: a blank `model`, or one that `other_inputs()` returns once it is set to a probe value, so a stage
    kind's model field needs no list here (`other_inputs` may leave an empty `base:` out, as it does None)."""
    if isinstance(stage.model, str) and not stage.model.strip():
        return ("model",)
    dump = stage.model_dump()
    for loc, value in _strings(dump):
        if value.strip() or loc in (("model",), ("name",), ("kind",)):
            continue
        probe = copy.deepcopy(dump)
        node = probe
        for part in loc[:-1]:
            node = node[part]
        node[loc[-1]] = _PROBE
        try:
            probed = type(stage).model_validate(probe)
        except ValidationError:
            continue  # the probe value is refused there: not a model reference
        if _PROBE in probed.other_inputs():
            return loc
    return None
