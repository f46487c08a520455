"""The pipeline config and its loader: a pipeline YAML, its stages' configs, and `--set` overrides.

Every config class forbids unknown keys (`posttrain.schema.Strict`); defaults live only in the classes; YAML files
state differences. A bad key or value raises `ConfigError` with one line naming the file, the dotted path and,
for unknown keys, the closest known field (see `posttrain.schema`). `--set a.b=v` overrides are typed by the schema: a string field keeps the raw
text, any other field parses it as YAML and lets pydantic coerce it; `null` and `~` are None for every field.

Checked at load, before any model loads: every `${...}` in a stage's config must be exactly
`${stages.<name of an earlier stage>.model}`; a model reference must not be empty, and one that is an explicit
local path (`/`, `./`, `../`, `~`) must exist; a bare name (no `/`) that is no world model or local folder is a
hub name (`gpt2`) unless it is a typo of a world model's (`wrold`); a `dir/name` whose `dir/` is a local folder
must exist too unless the hub cache holds it (the rules `resolve_model` applies; an `org/name` with no local
`org/` is a hub name, never looked up here). Offline (HF_HUB_OFFLINE), a pinned hub model (`org/name@rev`)
must be in the hub cache at that revision, and a hub dataset's `revision:` must be the version datasets' cache
holds (posttrain.hub_pins). A data source
must not be a missing data file, a folder or a bare name close to a world task (`data.source_problem`).
Unnamed stages are named by `stage_names` (the kind, then kind<i>, skipping names the user gave), for the run
and for `--set`.
"""
from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from evals.config import EvalConfig
import posttrain.stages  # noqa: F401  (registers every stage kind)
from posttrain.config_refs import STAGE_REF, model_ref_problem, stage_ref_problem
from posttrain.data import source_problem
from posttrain.hub_pins import dataset_pin_problem
from posttrain.mixture import resolve_replays
from posttrain.push import PushConfig
from posttrain.registry import STAGES, RegistryError, did_you_mean
from posttrain.tracking import check_report_to
from posttrain.schema import (NAME_PATTERN, ConfigError, Nested, Strict, key_hint, parse_yaml,
                              read_yaml, unwrap, validate_in, validated)

_YAML_NULLS = ("null", "Null", "NULL", "~")


def default_stage_name(kind: str, index: int, taken: typing.Collection[str] = ()) -> str:
    """The name of an unnamed stage: its kind for the first stage, else kind<index> (`sft`, `sft1`, `dpo2`); when
    another stage has that name (`taken`), the first free one of kind_<index>, kind_<index>_2, ..."""
    first = kind if index == 0 else f"{kind}{index}"
    if first not in taken:
        return first
    return next(n for n in (f"{kind}_{index}", *(f"{kind}_{index}_{k}" for k in range(2, len(taken) + 3)))
                if n not in taken)


def stage_names(stages: list[tuple[Any, str]]) -> list[Any]:
    """The name of each (name or None, kind): its own, or `default_stage_name` skipping every name a stage was
    given and the defaults before it, so a default never clashes with a name the user wrote. The one rule for
    the pipeline's validation and for `--set stages.<name>` addressing."""
    taken = {name for name, _ in stages if name is not None}
    out = []
    for i, (name, kind) in enumerate(stages):
        if name is None:
            name = default_stage_name(kind, i, taken)
            taken.add(name)
        out.append(name)
    return out




class PipelineConfig(Strict):
    """A pipeline YAML: stages run in order, each handing the next an HF model folder."""

    name: str = Field("pipeline", pattern=NAME_PATTERN, description="names the run dir (runs/<time>-<name>)")
    seed: int = 0
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report_to: list[str] | str = Field("none", validate_default=True, description="none, or transformers' trackers: [tensorboard, wandb]")
    stages: list[Any] = Field(min_length=1)
    push: PushConfig | None = Field(None, description="after a successful run, upload a stage's model (posttrain push)")

    @model_validator(mode="after")
    def _push_stage(self) -> "PipelineConfig":
        names = [s.name for s in self.stages]
        if self.push is not None and self.push.stage is not None and self.push.stage not in names:
            raise Nested(f"push.stage: no stage {self.push.stage!r}{did_you_mean(self.push.stage, names)}; "
                         f"stages: {', '.join(names)}")
        return self

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: Any) -> list[str]:
        return check_report_to(v)

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
                raise Nested(f"stages[{i}]: needs a 'kind' ({', '.join(STAGES.names())})")
            try:
                spec = STAGES.get(raw["kind"])
            except RegistryError as e:
                raise Nested(f"stages[{i}].kind: {e}") from None
            out.append(validate_in(spec.config, raw, prefix=f"stages[{i}]"))
        names = stage_names([(s.name, s.kind) for s in out])
        for stage, name in zip(out, names):  # unnamed stages get default names; duplicates are checked below
            stage.name = name
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise Nested(f"stages: stage names must be unique; repeated: {', '.join(sorted(dup))}")
        for i, stage in enumerate(out):
            problem = stage_ref_problem(stage, names[:i], names[i + 1 :], prefix=f"stages[{i}].")
            if problem:
                raise Nested(problem)
        problem = _scorer_input_problem(out, names)
        if problem:
            raise Nested(problem)
        problem = resolve_replays(out, names)
        if problem:
            raise Nested(problem)
        return out


def _scorer_input_problem(stages: list[Any], names: list[str]) -> str | None:
    """The one-line problem with a stage that would take a reward stage's output (a sequence classifier, not a
    language model) as its `model:` input, by default (the stage before it) or by `${stages.<name>.model}`.
    Another reward stage may: it trains the classifier further. Nor may a merge or a transfer read its weights."""
    scorers = {s.name for s in stages if not s.generates()}
    for i, stage in enumerate(stages):
        scoring = set(stage.scorers())
        weights = [r for r in stage.other_inputs() if r not in scoring]
        ref = next((r for r in weights if (m := STAGE_REF.match(r or "")) and m.group(1) in scorers), None)
        if stage.generates() and ref:
            return (f"stages[{i}] ({stage.name}): {ref} is a reward model (it scores text and generates none); a "
                    f"{stage.kind} stage combines language models' weights")
        if not stage.generates() or not stage.reads_input():
            continue
        m = STAGE_REF.match(stage.model or "")
        source = m.group(1) if m else (names[i - 1] if stage.model is None and i > 0 else None)
        if source in scorers:
            how = f"{stage.model}" if m else f"the previous stage, '{source}'"
            return (f"stages[{i}].model: {how} is a reward model (it scores text and generates none); set "
                    f"`model:` to a language model, e.g. ${{stages.<earlier stage>.model}} or the reward stage's input")
    return None


def _field_is_str(cls: type[BaseModel] | None, key: str, raw: str = "") -> bool:
    """True when `--set key=raw` should keep raw as a string rather than parse it as YAML."""
    if cls is None or key not in cls.model_fields:
        return False
    types_ = unwrap(cls.model_fields[key].annotation, into_containers=False)
    if raw.lstrip()[:1] in ("[", "{") and any(typing.get_origin(t) in (list, tuple, set, dict) for t in types_):
        return False  # `str | list[str]` given a YAML list: the list
    literal_str = all(isinstance(a, str) for t in types_ if typing.get_origin(t) is Literal for a in typing.get_args(t))
    return any(t is str for t in types_) or (
        any(typing.get_origin(t) is Literal for t in types_) and literal_str
    )


def apply_override(data: dict, dotted: str, raw: str, root: type[BaseModel]) -> None:
    """Set `a.b.c=raw` in `data` in place; `stages.<i|name>.x` addresses a pipeline's stage (an unnamed one by
    its default name, see `stage_names`), `data.<i>.x` an entry of any other list."""
    if not dotted or any(not p for p in dotted.split(".")):
        raise ConfigError(f"--set {dotted}={raw}: expected a.b.c=value")
    parts = dotted.split(".")
    node: Any = data
    cls: Any = root
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if i == 1 and parts[0] == "stages" and root is PipelineConfig:
                node = _stage_node(node, part, dotted)
                cls = _stage_cls(node)
            else:  # an entry of a list of blocks (`data.0.source`): cls stays the entry's model
                node = node[_list_index(node, part, dotted, ".".join(parts[:i]))]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is {node!r}, not a block with keys")
        if cls is not None and part not in cls.model_fields:
            raise ConfigError(f"--set {dotted}: unknown key '{part}'{_key_hint(cls, part)}")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = _default_for_set(cls, part, dotted)
        sub = cls.model_fields[part].annotation if cls is not None else None
        models = [t for t in unwrap(sub) if isinstance(t, type) and issubclass(t, BaseModel)] if sub else []
        node, cls = nxt, (models[0] if models else None)
    key = parts[-1]
    if isinstance(node, list):
        what = "a whole stage" if len(parts) == 2 and parts[0] == "stages" else "a list entry"
        raise ConfigError(f"--set {dotted}: cannot replace {what}; set one of its keys ({dotted}.<key>=...)"
                          f" or the whole list")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: {'.'.join(parts[:-1])} is {node!r}, not a block with keys")
    if cls is not None and key not in cls.model_fields:
        raise ConfigError(f"--set {dotted}: unknown key '{key}'{_key_hint(cls, key)}")
    if raw.strip() in _YAML_NULLS:  # YAML's null, for a string field too (resets it to its None default)
        node[key] = None
    else:
        node[key] = raw if _field_is_str(cls, key, raw) else parse_yaml(raw, f"--set {dotted}")


def _key_hint(cls: type[BaseModel], key: str) -> str:
    """Did-you-mean for an unknown `--set` key, as for one in a YAML file (`learning_rate` at stage level:
    'trainer.learning_rate')."""
    return key_hint(cls, key)


def _blame_set(e: ConfigError, where: str, sets: list[str] | None, stages: Any = None) -> ConfigError:
    """`e` (`<where>: <key path>: <problem>`) with `--set <key>=<value>` in place of the file `where` when that
    override set the key (a bad value from the command line is not the YAML file's); `stages`: the raw stage
    list, whose names `stages.<name>.` keys use. Without a file (`<config>`, `<sft defaults>`) `e` stays."""
    if where.startswith("<"):
        return e
    text = str(e).removeprefix(f"{where}: ")
    path = re.sub(r"\[(\d+)\]", r".\1", text.split(":", 1)[0])
    names = stage_names([(s.get("name"), str(s.get("kind"))) if isinstance(s, dict) else ("", "")
                         for s in stages]) if isinstance(stages, list) else []
    for key, raw in reversed(parse_sets(sets)):  # the last override of a key wins, as it did when applied
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "stages" and parts[1] in names:
            parts[1] = str(names.index(parts[1]))
        if path == ".".join(parts) or path.startswith(".".join(parts) + "."):
            return ConfigError(f"--set {key}={raw}: {text}")
    return e


def _default_for_set(cls: type[BaseModel] | None, part: str, dotted: str) -> Any:
    """What `--set a.part.x=v` edits when the config leaves `part` out: a block ({}: the rest keep their
    defaults), or a copy of a list's default, so that `data.0.limit=3` edits the default data list."""
    if cls is None:
        return {}
    field = cls.model_fields[part]
    types_ = unwrap(field.annotation, into_containers=False)
    if not any((isinstance(t, type) and issubclass(t, BaseModel)) or typing.get_origin(t) in (dict, list)
               or t is Any for t in types_):
        raise ConfigError(f"--set {dotted}: {part} is a value, not a block with keys")
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        return [d.model_dump() if isinstance(d, BaseModel) else d for d in default]
    return {}


def _entries(n: int) -> str:
    return f"{n} entries (0..{n - 1})" if n > 1 else ("1 entry (0)" if n else "no entries")


def _list_index(items: list, part: str, dotted: str, what: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    raise ConfigError(f"--set {dotted}: {what} has {_entries(len(items))}; no entry '{part}'")


def _stage_node(stages: list, part: str, dotted: str) -> dict:
    names = stage_names([(s.get("name"), str(s.get("kind"))) if isinstance(s, dict) else ("", "")
                         for s in stages])
    if part.isdigit() and int(part) < len(stages):
        found = int(part)
    elif part in names:
        found = names.index(part)
    else:
        known = list(dict.fromkeys(n for n in names if n))  # deduped: a clash is reported at validation
        raise ConfigError(f"--set {dotted}: no stage '{part}'{did_you_mean(part, known)}; stages has "
                          f"{_entries(len(stages))}: {', '.join(known)}")
    if not isinstance(stages[found], dict):
        raise ConfigError(f"--set {dotted}: stages[{found}] is {stages[found]!r}, not a stage")
    return stages[found]


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
    where = str(path) if path else "<config>"
    raw = read_yaml(path) if path else copy.deepcopy(dict(data or {}))  # --set must not edit the caller's dicts
    if "stages" not in raw and isinstance(raw.get("kind"), str):
        raise ConfigError(f"{where}: stages: missing; this is a stage config (kind: {raw['kind']}): run it with "
                          f"`posttrain stage {raw['kind']} --config {where}`")
    for key, value in parse_sets(sets):
        apply_override(raw, key, value, PipelineConfig)
    try:
        return _check_files(validated(PipelineConfig, raw, where), where)
    except ConfigError as e:
        raise _blame_set(e, where, sets, raw.get("stages")) from None


def stage_pipeline(kind: str, path: str | Path | None, sets: list[str] | None, base: dict | None = None,
                   doc: dict | None = None) -> PipelineConfig:
    """A one-stage pipeline for `posttrain stage <kind>`; `--set` paths are relative to the stage. ``doc``: the
    stage config already read (`posttrain merge --from-mergekit` translates it from ``path``)."""
    try:
        spec = STAGES.get(kind)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    where = str(path) if path else f"<{kind} defaults>"
    stage = dict(doc) if doc is not None else read_yaml(path) if path else {}
    if "stages" in stage:
        raise ConfigError(f"{where}: stages: this is a pipeline file, not a stage config: run it with "
                          f"`posttrain run {where}`")
    if stage.get("kind", kind) != kind:
        raise ConfigError(f"{where}: kind is {stage['kind']!r} but the command asked for {kind!r}")
    stage["kind"] = kind
    pipe = dict(base or {})
    for key, value in parse_sets(sets):
        if key.startswith(("eval.", "push.")) or key == "seed":  # pipeline-level settings stay reachable
            apply_override(pipe, key, value, PipelineConfig)
        else:
            apply_override(stage, key, value, spec.config)
    try:
        stage_cfg = validated(spec.config, stage, where)
        problem = stage_ref_problem(stage_cfg, [], [])  # before PipelineConfig, whose paths start at stages[0]
        if problem:
            raise ConfigError(f"{where}: {problem}" + ("; `posttrain stage` runs one stage, so there is none"
                                                       if "names no earlier stage" in problem else ""))
        pipe.setdefault("name", kind)
        pipe["stages"] = [stage_cfg]
        return _check_files(validated(PipelineConfig, pipe, where), where, prefix="")
    except ConfigError as e:
        raise _blame_set(e, where, sets) from None


def _check_files(cfg: PipelineConfig, where: str, prefix: str = "stages[{i}].") -> PipelineConfig:
    """Refuse local data files and model folders that do not exist now, not after the base model was loaded
    and evaluated and earlier stages trained."""
    for i, stage in enumerate(cfg.stages):
        problem = model_ref_problem(stage, prefix.format(i=i))
        if problem:
            raise ConfigError(f"{where}: {problem}")
        for j, src in enumerate(stage.training_data()):
            problem = source_problem(src)
            if problem is not None:
                raise ConfigError(f"{where}: {prefix.format(i=i)}data[{j}].source: {problem}")
            problem = dataset_pin_problem(src.source, src.subset, src.revision) if src.revision else None
            if problem is not None:  # offline, a pinned hub dataset that is not the version datasets would load
                raise ConfigError(f"{where}: {prefix.format(i=i)}data[{j}].revision: {problem}")
    return cfg
