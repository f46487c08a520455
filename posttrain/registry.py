"""Name-to-object registries shared by stages, merge methods, rewards and parameter selectors.

Follows lm-evaluation-harness's registry (unknown names answer with "did you mean") and verl's rule that
registering a name twice is an error. Registration happens through explicit imports in one ``__init__``,
never by scanning subclasses or by import paths written in YAML.
"""
from __future__ import annotations

import difflib
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

    def _add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise RegistryError(f"{self.what} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(
                f"unknown {self.what} {name!r}{did_you_mean(name, list(self._items))}; known: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


# The named registries. Each module that fills one imports it from here.
STAGES: Registry[Any] = Registry("stage kind")
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
REWARDS: Registry[Callable[..., Any]] = Registry("reward")
