"""Where the tiled VAE's per-tile work runs: on one device, or on several devices' VAE replicas at once.

The runners (`pipelines.vae.tiling.run_stages`, `pipelines.vae.stream.run_streamed`) hand each stage's (or each
statistics sweep's) tiles to `Lanes.map`. With one lane the tiles run one after the other in the calling thread, as
before. With several (one tiled image split over devices, `pipelines.serving.multi_device.DeviceReplicas`), the
tiles are dealt round-robin to the lanes, each with the path built from its own device's VAE, run concurrently (a
thread and, on CUDA, a stream per device) and write their disjoint cores into the shared output canvas. What comes
back, in tile order, is each tile's GroupNorm moments (`pipelines.vae.stages.tile_moments`, float64), merged on the
first lane's device in that order: so the whole-image statistics, and with them the pixels, are the same as on one
device of the kind (every tile's convolutions and moments are the same kernels on the same inputs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from pipelines.vae.stages import Stage

Item = TypeVar("Item")
Result = TypeVar("Result")


class Dealer(Protocol):
    """Runs `run(index, module, device, item)` for every item over (module, device) replicas, results in order on
    `out_device` (`pipelines.serving.multi_device.DeviceReplicas`)."""

    replicas: Sequence[tuple[Any, torch.device]]

    def map(self, run: Callable[[int, Any, torch.device, Any], Any], items: Sequence[Any],
            out_device: torch.device) -> list[Any]: ...


@dataclass(frozen=True)
class Lanes:
    """One tiled path (decoder up path or encoder down path) per device: lane 0 is the canvas device's."""

    stages: tuple[list[Stage], ...]
    """Per lane, the same stages, built from that lane's VAE."""
    devices: tuple[torch.device, ...]
    """Per lane, the device its tiles run on."""
    dealer: Dealer | None = None
    """Who runs the lanes concurrently; None: one lane, in the calling thread."""

    @classmethod
    def one(cls, stages: list[Stage], device: torch.device) -> Lanes:
        """A single lane: every tile on `device`, one after the other."""
        return cls((stages,), (torch.device(device),))

    @classmethod
    def over(cls, vae: nn.Module, device: torch.device, build: Callable[[nn.Module], list[Stage]],
             dealer: Dealer | None = None) -> Lanes:
        """`build(vae)` on `device` as lane 0, and with a dealer of several replicas `build` of each other
        replica's VAE on its device as the other lanes (the dealer's first replica is `vae`'s own device)."""
        if dealer is None or len(dealer.replicas) < 2:
            return cls.one(build(vae), device)
        others = list(dealer.replicas)[1:]
        stages = (build(vae), *(build(module) for module, _ in others))
        devices = (torch.device(device), *(torch.device(d) for _, d in others))
        return cls(stages, devices, dealer)

    @property
    def first(self) -> list[Stage]:
        """Lane 0's stages: the ones that describe the path (scales, halos, norms)."""
        return self.stages[0]

    @property
    def device(self) -> torch.device:
        """The canvas device (lane 0): statistics are merged there."""
        return self.devices[0]

    def sub(self, start: int, stop: int | None = None) -> Lanes:
        """The same lanes over stages[start:stop] (a streamed run's layer-wise head or streamed tail)."""
        return Lanes(tuple(s[start:stop] for s in self.stages), self.devices, self.dealer)

    def map(self, work: Callable[[list[Stage], torch.device, Item], Result], items: Sequence[Item]) -> list[Result]:
        """`work(stages, device, item)` for every item, in lane 0's thread or dealt over the lanes; results (tensors
        moved to lane 0's device) in the items' order."""
        if self.dealer is None or len(self.stages) == 1:
            return [work(self.stages[0], self.devices[0], item) for item in items]

        def run(index: int, _module: Any, _device: torch.device, item: Item) -> Result:
            return work(self.stages[index], self.devices[index], item)

        return self.dealer.map(run, items, self.devices[0])


class Canvas:
    """A stage's output canvas on `device`, allocated by the first core written into it (shape [B, C, H, W] from
    that core's batch and channels and the canvas size); tiles in several threads write disjoint cores."""

    def __init__(self, device: torch.device, height: int, width: int):
        self.device, self.height, self.width = device, height, width
        self.tensor: torch.Tensor | None = None
        self._lock = threading.Lock()

    def put(self, y: torch.Tensor, y0: int, x0: int) -> None:
        """Write core `y` with its top-left pixel at (y0, x0)."""
        with self._lock:
            if self.tensor is None:
                shape = (*y.shape[:2], self.height, self.width)
                self.tensor = torch.empty(shape, dtype=y.dtype, device=self.device)
        self.tensor[..., y0 : y0 + y.shape[-2], x0 : x0 + y.shape[-1]] = y.to(self.device)
