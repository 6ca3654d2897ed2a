"""One small least-recently-used cache, shared by the prompt, stage-1, upscaler and ControlNet caches."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache:
    """`get(key, make)` returns the cached value or stores `make()`; the oldest entry goes beyond `size`."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        value = make()  # not stored if it raises
        self._data[key] = value
        while len(self._data) > self.size:
            self._data.popitem(last=False)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value` under `key` (the newest entry)."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: Hashable) -> Any:
        """Remove and return the entry under `key`; None when there is none."""
        return self._data.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def values(self) -> list[Any]:
        """The cached values, oldest first."""
        return list(self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
