"""Verifiable rewards for the GRPO stage: config (``RewardSpec``), name checks, and TRL reward callables.

A reward is named either by a registered builtin (``exact_match``, ``numeric_match``, ``math_verify``,
``format_regex``, ``code_exec``, ``length_penalty``; see ``builtin.py``; ``ifeval``, ``judge``: ``ifeval.py``,
``judge.py``; ``reward_model``, a learned reward model's score: ``scorer.py``) or as ``path/to/file.py:function``,
a user function with TRL's signature ``f(prompts, completions, **kwargs) -> list[float | None]``.

``build_reward_funcs`` returns callables that ``trl.GRPOTrainer(reward_funcs=...)`` accepts, plus the weights
for ``GRPOConfig(reward_weights=...)``::

    stats = RewardStats()
    funcs, weights = build_reward_funcs(cfg.rewards, stats)
    ...
    metrics.update(stats.as_metrics())  # error counts by kind: timeout, memory, crash, ..., non_finite
    stats.failed_every_call()           # the rewards that scored no completion at all, with their error kinds

A reward never raises into the trainer: a failing call scores 0 for its rows and is counted in ``stats``. A
value that is not a finite number within ``MAX_ABS_REWARD`` (``inf``, ``1e308``: one such value zeroes the
advantages of its whole group) scores 0 and is counted as ``non_finite``. An in-process user reward gets
``timeout_s`` per completion of the call, wall-clock (``deadline.py``); past it the call scores 0 (``timeout``).
A user reward's file may import modules next to it, as a script can: in-process its folder is on
``sys.path``; in the sandbox the trainer reads the ``.py`` files it imports from there and hands them over.
Builtins get completions as text (the last message's content for conversational completions); user
functions get exactly what TRL passes. With ``sandbox: true`` a user function runs in ``run_sandboxed``, one
child process per row, so one hostile completion cannot zero its whole group; TRL's live objects
(``trainer_state``, ``log_metric``, ...) are not sent there.
"""
from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from posttrain.registry import REWARDS, RegistryError, did_you_mean
from posttrain.rewards import builtin  # importing it registers the builtin rewards
from posttrain.rewards import ifeval, judge  # noqa: F401  (these register ifeval and judge)
from posttrain.rewards import scorer  # noqa: F401  (registers reward_model)
from posttrain.rewards.imports import imported_names
from posttrain.rewards.deadline import RewardTimeout, call_with_deadline
from posttrain.rewards.stats import RewardStats
from posttrain.rewards.sandbox import ERROR_KINDS, EXCEPTION, NON_FINITE, TIMEOUT, FileFunction, run_sandboxed

__all__ = ["ERROR_KINDS", "MAX_ABS_REWARD", "RewardFunc", "RewardSpec", "RewardStats", "RewardsFailed", "build_reward_funcs",
           "completion_text", "reward_file", "reward_models", "run_sandboxed", "validate_reward_name",
           "with_models"]

log = logging.getLogger(__name__)

# Arguments TRL passes that are live Python objects: they cannot cross into a sandboxed child.
_TRL_RUNTIME_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")
# Larger rewards are taken for a bug: GRPO normalizes each group by its std, so one huge value sets every other
# completion's advantage to about 0. Verifiable rewards are of order 1; a length penalty of order 100.
MAX_ABS_REWARD = 1e6


class RewardsFailed(RuntimeError):
    """Every reward of a stage failed on every completion: the run trained on no reward signal."""


class RewardSpec(BaseModel):
    """One reward of a GRPO stage, as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a registered reward, or path/to/file.py:function")
    weight: float = 1.0
    sandbox: bool = Field(False, description="run a user reward in the sandbox; code_exec always does")
    timeout_s: float = Field(5.0, gt=0, description="per completion, wall-clock: a sandboxed run, or a share of "
                                                   "an in-process user reward's call")
    memory_mb: int = Field(512, ge=64, description="memory of a sandboxed run, all its processes together (without "
                                                 "a cgroup: 2 of half each), plus a scratch tmpfs of half as much")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        validate_reward_name(name)
        return name

    @model_validator(mode="after")
    def _params_fit(self) -> "RewardSpec":
        if _file_ref(self.name) is None:
            builtin.check_params(self.name, REWARDS.get(self.name), self.params)
            if self.sandbox and self.name != "code_exec":
                raise ValueError(f"reward {self.name!r} runs no model output; sandbox applies to user rewards")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be finite")
        return self


MODEL_REWARDS = ("reward_model", "judge")  # rewards whose `model` param names a model folder


def reward_models(specs: Iterable[RewardSpec]) -> list[str]:
    """The model references the rewards read (``reward_model``'s and ``judge``'s ``model``), in order: a stage's
    other inputs, so a changed scorer or judge reruns the stage."""
    return [s.params["model"] for s in specs if s.name in MODEL_REWARDS and isinstance(s.params.get("model"), str)]


def with_models(specs: Iterable[RewardSpec], resolve: Callable[[str], str]) -> list[RewardSpec]:
    """``specs`` with each model reward's ``model`` resolved to a folder (``${stages.<name>.model}`` included)."""
    return [s.model_copy(update={"params": {**s.params, "model": resolve(s.params["model"])}})
            if s.name in MODEL_REWARDS and isinstance(s.params.get("model"), str) else s for s in specs]


def _file_ref(name: str) -> tuple[str, str] | None:
    """``("path/to/file.py", "function")`` for a user reward name, else None."""
    path, sep, func = name.rpartition(":")
    return (path, func) if sep and path.endswith(".py") else None


def reward_file(name: str) -> str | None:
    """The absolute path of a user reward's file (``path/to/file.py:function``), as it is imported: relative
    to the working directory. None for a builtin."""
    ref = _file_ref(name)
    return os.path.abspath(ref[0]) if ref else None


def validate_reward_name(name: str) -> None:
    """Raise ValueError (with "did you mean") unless ``name`` is a registered reward or a ``file.py:function``
    whose file exists, defines ``function`` at top level and imports only modules that can be found (next to
    it or installed). The file is parsed, never run: this runs wherever a config is read, and a sandboxed
    reward must not run in the trainer's process at all. So a helper that fails when it runs, or an import
    inside a function or a ``try``, is left to the stage (see ``build_reward_funcs``)."""
    ref = _file_ref(name)
    if ref is None:
        try:
            REWARDS.get(name)
        except RegistryError as e:
            hint = " (a user reward is written path/to/file.py:function)" if ":" in name else ""
            raise ValueError(f"{e}{hint}") from None
        return
    path, func = ref
    if not os.path.isfile(path):
        raise ValueError(f"reward file {path!r} not found (from {name!r}; relative to {os.getcwd()})")
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ValueError(f"reward file {path!r} does not parse: {e}") from None
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    if func not in defined:
        hint = did_you_mean(func, defined)
        raise ValueError(f"reward file {path!r} defines no function {func!r}{hint}; defines: "
                         f"{', '.join(defined) or 'none'}")
    _check_imports(path, tree)


def _check_imports(path: str, tree: ast.Module) -> None:
    """Raise ValueError when the file, or a module next to it that it imports at top level, imports at top
    level a module that is neither next to it nor installed. Finding a top-level module runs none of its
    code. A file that touches ``sys.path`` is not checked further: the module may be where it points."""
    folder = os.path.dirname(os.path.abspath(path))
    todo, seen = [(path, tree)], {os.path.abspath(path)}
    while todo:
        file, parsed = todo.pop()
        if any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
               and n.value.id == "sys" for n in ast.walk(parsed)):
            continue
        for name in imported_names(parsed, top_level=True):
            sibling = os.path.join(folder, name + ".py")
            if os.path.isfile(sibling) and sibling not in seen:
                seen.add(sibling)
                try:
                    todo.append((sibling, ast.parse(Path(sibling).read_text(encoding="utf-8"), filename=sibling)))
                except (SyntaxError, UnicodeDecodeError) as e:
                    raise ValueError(f"reward file {path!r} imports {sibling!r}, which does not parse: {e}") from None
            elif not _findable(name, folder):
                nearby = [p.stem for p in Path(folder).glob("*.py") if p.stem != Path(file).stem]
                what = "reward file" if file == path else f"{file!r}, imported by reward file"
                raise ValueError(f"{what} {path!r}: no module named {name!r}{did_you_mean(name, nearby)} next to "
                                 f"it ({folder}) or installed")


def _findable(name: str, folder: str) -> bool:
    if name in sys.modules or name in sys.builtin_module_names:
        return True
    if importlib.machinery.PathFinder.find_spec(name, [folder]) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def completion_text(completion: Any) -> str:
    """A completion as text: strings as they are; for a conversation (list of {"role", "content"}), the
    content of its last message, with the text parts of multimodal content joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)
    return "" if completion is None else str(completion)


@functools.lru_cache(maxsize=None)
def _load_user_function(path: str, func: str) -> Callable[..., Any]:
    """Import a user's reward file by path (trusted code: the user's own) and return ``func`` from it.

    Its folder is first on ``sys.path`` while it is imported, as when Python runs it as a script, so modules
    next to it import and win over installed ones of the same name. Afterwards the folder moves to the end:
    an import inside the reward function still finds them, and the trainer's own later imports (TRL, ...)
    are not shadowed by a user's file that happens to share a name."""
    module_name = f"posttrain_user_reward_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import reward file {path!r}")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
        if folder not in sys.path:
            sys.path.append(folder)
    return getattr(module, func)


class RewardFunc:
    """One reward as TRL calls it: ``f(prompts=..., completions=..., **columns) -> list[float | None]``.

    A class rather than a closure so that it pickles (TRL's async GRPO ships reward functions to a spawned
    process; there ``stats`` is a copy). It holds the spec, not the user's function, for the same reason.
    """

    def __init__(self, spec: RewardSpec, label: str, stats: RewardStats):
        self.spec, self.stats, self.__name__ = spec, stats, label  # TRL logs rewards/<__name__>/mean
        self._warned: set[str] = set()

    def __call__(self, prompts: list[Any] | None = None, completions: list[Any] | None = None,
                 **kwargs: Any) -> list[float | None]:
        completions = list(completions or [])
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [None] * n
        try:
            values = list(self._score(prompts, completions, kwargs))
            if len(values) != n:
                raise ValueError(f"returned {len(values)} rewards for {n} completions")
            values = [None if v is None else float(v) for v in values]
        except (Exception, RewardTimeout) as e:  # a reward bug must cost one batch's score, never the training run
            timed_out = isinstance(e, RewardTimeout)
            self.stats.record(self.__name__, TIMEOUT if timed_out else EXCEPTION)
            self.stats.rows(self.__name__, failed=n)
            if type(e).__name__ not in self._warned:  # once per kind of failure, not once per step
                self._warned.add(type(e).__name__)
                limit = f" (over {self.spec.timeout_s * max(n, 1):g} s)" if timed_out else ""
                log.warning("reward %r failed%s; scoring its batch 0", self.__name__, limit, exc_info=not timed_out)
            return [0.0] * n
        if self._sandboxed:  # counted row by row, non-finite values included
            return values
        bad = [i for i, v in enumerate(values) if v is not None and not _in_range(v)]
        for i in bad:
            self._non_finite(values[i])
            values[i] = 0.0
        self.stats.rows(self.__name__, scored=n - len(bad), failed=len(bad))
        return values

    def _non_finite(self, value: Any) -> None:
        self.stats.record(self.__name__, NON_FINITE)
        if NON_FINITE not in self._warned:
            self._warned.add(NON_FINITE)
            log.warning("reward %r returned %r (not a finite number within +-%g); scoring it 0", self.__name__,
                        value, MAX_ABS_REWARD)

    @property
    def _sandboxed(self) -> bool:
        return self.spec.sandbox and _file_ref(self.spec.name) is not None

    def _score(self, prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]) -> list[Any]:
        spec, ref = self.spec, _file_ref(self.spec.name)
        if ref is None:  # builtin: text completions, params and the spec's sandbox settings bound
            fn = REWARDS.get(spec.name)
            own = {"timeout_s": spec.timeout_s, "memory_mb": spec.memory_mb, "stats": self.stats}
            accepted = inspect.signature(fn).parameters
            fixed = {**spec.params, **{k: v for k, v in own.items() if k in accepted}}
            texts = [completion_text(c) for c in completions]
            return fn(**{**kwargs, "prompts": prompts, "completions": texts, **fixed})  # params beat columns
        path = reward_file(spec.name)
        if spec.sandbox:
            return self._score_sandboxed(FileFunction(path, ref[1]), prompts, completions, kwargs)
        fn = _load_user_function(path, ref[1])
        call = {**kwargs, "prompts": prompts, "completions": completions, **spec.params}
        return call_with_deadline(fn, spec.timeout_s * max(len(completions), 1), **call)

    def _score_sandboxed(self, target: FileFunction, prompts: list[Any], completions: list[Any],
                         kwargs: dict[str, Any]) -> list[float | None]:
        """One child process per row: a hostile completion zeroes its own row, not its group."""
        n = len(completions)
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_RUNTIME_KWARGS}
        out: list[float | None] = []
        for i in range(n):
            row = {k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}
            row.update(self.spec.params, prompts=[prompts[i]], completions=[completions[i]])
            value, kind = run_sandboxed(target, (), timeout_s=self.spec.timeout_s, memory_mb=self.spec.memory_mb,
                                        kwargs=row)
            if kind is None and not (isinstance(value, list) and len(value) == 1
                                     and (value[0] is None or isinstance(value[0], (int, float)))):
                kind = EXCEPTION  # the function broke TRL's contract: one number (or None) per completion
            if kind is None and value[0] is not None and not _in_range(value[0]):
                self._non_finite(value[0])
                kind = NON_FINITE
            elif kind is not None:
                self.stats.record(self.__name__, kind)
            self.stats.rows(self.__name__, scored=kind is None, failed=kind is not None)
            out.append(value[0] if kind is None else 0.0)
        return out


def _in_range(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= MAX_ABS_REWARD


def build_reward_funcs(
    specs: Iterable[RewardSpec | Mapping[str, Any]], stats: RewardStats | None = None
) -> tuple[list[RewardFunc], list[float]]:
    """TRL reward callables and their weights (``GRPOConfig.reward_weights``) for ``specs``.

    Failures are counted in ``stats``. Each callable's ``__name__`` is the builtin's name or the user
    function's name, suffixed ``_2``, ``_3`` ... when a name repeats, so TRL's per-reward logs stay apart.
    """
    stats = stats if stats is not None else RewardStats()
    funcs, weights, seen = [], [], {}
    for raw in specs:
        spec = raw if isinstance(raw, RewardSpec) else RewardSpec.model_validate(raw)
        ref = _file_ref(spec.name)
        if ref and not spec.sandbox:  # import now: a broken reward file should stop the stage, not zero it
            _load_user_function(reward_file(spec.name), ref[1])
        base = ref[1] if ref else spec.name
        seen[base] = seen.get(base, 0) + 1
        funcs.append(RewardFunc(spec, base if seen[base] == 1 else f"{base}_{seen[base]}", stats))
        weights.append(spec.weight)
    return funcs, weights
