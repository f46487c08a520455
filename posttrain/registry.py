"""Name-to-object registries shared by stages, merge methods, rewards and parameter selectors.

Follows lm-evaluation-harness's registry (unknown names answer with "did you mean") and verl's rule that
registering a name twice is an error. Registration happens through explicit imports in one ``__init__``,
never by scanning subclasses or by import paths written in YAML.

A lazy entry (`Registry.lazy`) names the module that registers it: the name is known (and listed, and checked
for typos) at once, and the module is imported when the entry is first used. The model loader resolves world
model names this way without importing the orchestration that builds them.
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message is one line meant for the user."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | Any) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


class Registry(Generic[T]):
    """A map from names to objects of one kind (``what``), filled once at import time."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; used bare (``reg.register("x", f)``) or as a decorator."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def deco(o: T) -> T:
            self._add(name, o)
            return o

        return deco

    def lazy(self, name: str, module: str) -> None:
        """Reserve `name` for an object that importing `module` registers; imported on the first `get`."""
        self._add(name, _Lazy(module))

    def _add(self, name: str, obj: T) -> None:
        if name in self._items and not isinstance(self._items[name], _Lazy):
            raise RegistryError(f"{self.what} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            obj = self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(
                f"unknown {self.what} {name!r}{did_you_mean(name, list(self._items))}; known: {known}"
            ) from None
        if isinstance(obj, _Lazy):
            importlib.import_module(obj.module)
            obj = self._items[name]
            if isinstance(obj, _Lazy):
                raise RegistryError(f"{self.what} {name!r}: importing {obj.module} did not register it")
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class _Lazy:
    """A registry entry not loaded yet: the module whose import registers it."""

    def __init__(self, module: str):
        self.module = module


# The named registries. Each module that fills one imports it from here.
STAGES: Registry[Any] = Registry("stage kind")
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
REWARDS: Registry[Callable[..., Any]] = Registry("reward")

# Named models of the embedded world: name -> function(log) returning a local HF folder (built once, cached). The
# loader (posttrain.models) resolves these names; the modules that build them sit above it (world/trained.py runs
# a one-stage pipeline), so each is imported on first use.
WORLD_MODELS: Registry[Callable[..., Path]] = Registry("world model")
WORLD_MODELS.lazy("world", "posttrain.world")
WORLD_MODELS.lazy("world-v2", "posttrain.world.v2")
WORLD_MODELS.lazy("world-large", "posttrain.world.large")  # claims only (issue 23): ~11M, built by `make claims`
for _name in ("world-sft", "world-sft-arithmetic", "world-sft-reversal", "world-dpo-style",
              "world-grpo-verifiable"):  # world.trained.RECIPES (a test checks the two lists agree)
    WORLD_MODELS.lazy(_name, "posttrain.world.trained")
