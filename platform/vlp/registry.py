"""Named registries: components are chosen by a ``type`` key in their config.

A registry maps a type name to a builder. Config classes validate the ``type`` key against the
registry, so a typo fails at config load with the list of known types, not deep inside a worker.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} type {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} type {name!r}; known: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def validate(self, name: str) -> str:
        """For config validators: the name if registered, else ValueError listing the known names."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} type {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return name

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items
