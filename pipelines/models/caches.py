"""The auxiliary weights a `ModelManager` owns beside its pipeline: ControlNets, annotators and upscaler models.

Each kind sits in a bounded least-recently-used cache (`pipelines.lru.LRUCache`); `ModelManager.unload()` empties
them all, and `resident_bytes` tells the planner how much device memory they hold. The loaders
(`pipelines.control.models.load_controlnet`, `pipelines.control.preprocessors.preprocess`,
`pipelines.models.upscalers.load_upscaler`) take one of these caches as their `cache` argument; without one they
load afresh and keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.lru import LRUCache

if TYPE_CHECKING:
    import torch

CONTROLNETS = 3
"""ControlNets kept: the three units of one job (pipelines.request's unit limit) or two units plus the tile model."""
ANNOTATORS = 2
"""controlnet-aux detectors kept (depth, openpose, ... each a few hundred MB)."""
UPSCALERS = 2
"""Upscaler models kept (the hires upscaler and the Upscale tab's, when they differ)."""
_SCAN_DEPTH = 3
"""How deep `module_bytes` looks through a detector's attributes for its torch modules."""


@dataclass(frozen=True)
class WeightCaches:
    """One manager's ControlNet, annotator and upscaler caches (bounded LRU, emptied by `clear`)."""

    controlnets: LRUCache = field(default_factory=lambda: LRUCache(CONTROLNETS))
    """Keyed by (resolved spec, mtime, device, dtype); values are diffusers ControlNetModels."""
    annotators: LRUCache = field(default_factory=lambda: LRUCache(ANNOTATORS))
    """Keyed by (detector class, folder, device); values are controlnet-aux detectors."""
    upscalers: LRUCache = field(default_factory=lambda: LRUCache(UPSCALERS))
    """Keyed by (file, mtime, device, dtype); values are spandrel ImageModelDescriptors."""

    def clear(self) -> None:
        """Forget every cached model (its memory is freed once nothing else holds it)."""
        for cache in (self.controlnets, self.annotators, self.upscalers):
            cache.clear()

    def __len__(self) -> int:
        return len(self.controlnets) + len(self.annotators) + len(self.upscalers)

    def resident_bytes(self, device: torch.device | str | None = None) -> int:
        """Bytes of the parameters and buffers of every cached model (on `device`'s type when given)."""
        values = [*self.controlnets.values(), *self.annotators.values(), *self.upscalers.values()]
        return module_bytes(values, device)


def module_bytes(obj: Any, device: torch.device | str | None = None) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of the torch modules in `obj`: a module, a spandrel
    descriptor (`.model`), a detector holding modules in its attributes, or a list of those; shared tensors count
    once. With `device`, only tensors on a device of that type count."""
    import torch

    kind = None if device is None else torch.device(device).type
    seen: dict[tuple[str, int, int], int] = {}
    for module in _modules(obj, _SCAN_DEPTH, set()):
        for t in (*module.parameters(), *module.buffers()):
            if kind is None or t.device.type == kind:
                seen[(str(t.device), t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def _modules(obj: Any, depth: int, visited: set[int]) -> list[torch.nn.Module]:
    """The torch modules reachable from `obj` through lists, dicts and attributes, at most `depth` levels down."""
    import torch

    if id(obj) in visited or depth < 0:
        return []
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, list | tuple):
        return [m for item in obj for m in _modules(item, depth, visited)]
    if isinstance(obj, dict):
        return [m for item in obj.values() for m in _modules(item, depth - 1, visited)]
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return []
    return [m for item in attrs.values() for m in _modules(item, depth - 1, visited)]
