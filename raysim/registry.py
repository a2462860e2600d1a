"""Name -> class registries filled by decorators, extended through Python entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A named collection of classes; third-party packages add to it via an entry-point group."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._plugins_loaded = False
        self._broken: dict[str, str] = {}  # plugin name -> why it failed to load

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """Why `name` is not available, with the valid choices."""
        if name in self._broken:
            return f"{self.kind} {name!r} failed to load: {self._broken[name]}"
        return f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_plugins(self) -> None:
        # Plugins register themselves on import; loading is lazy so a broken plugin only
        # matters to the run that asks for a name.
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            try:
                self._items.setdefault(ep.name, ep.load())
            except Exception as err:  # a plugin's own import error must not break the others
                self._broken[ep.name] = f"{type(err).__name__}: {err}"
                log.debug("could not load %s plugin %r: %s", self.kind, ep.name, err)
