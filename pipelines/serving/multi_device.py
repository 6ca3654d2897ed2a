"""One large tiled image across devices: a step's tile batches spread over UNet replicas, gathered in order.

Tiles are independent within a step (MultiDiffusion blends their outputs afterwards), so running the batches of one
step on several devices and accumulating them on the canvas device in the same order gives the same pixels as one
device; guidance and the scheduler step still run once, on the canvas device (`pipelines.denoise.loop`). DistriFusion
(Li et al., CVPR 2024) needs stale activations only because it splits a single UNet call; this splits whole calls.

`TileReplicas` is handed to the loop as its UNet: called directly it is the canvas device's UNet, and the loop's
per-batch call goes through `map` when `splits(n)` says so (at least as many batches as devices, or forced).
On CUDA each device's batches run on its own stream, in a thread per device.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

log = logging.getLogger(__name__)

class TileReplicas:
    """UNet replicas [(unet, device), ...] (the first on the canvas device) and per-replica UNet call counts."""

    def __init__(self, replicas: Sequence[tuple[Any, Any]], *, force: bool = False):
        if not replicas:
            raise ValueError("TileReplicas needs at least one (unet, device)")
        self.replicas = [(unet, torch.device(device)) for unet, device in replicas]
        self.force = force
        self.calls = [0] * len(self.replicas)
        self._next = 0
        self._controlnets: dict[tuple[int, int], Any] = {}
        self._streams = [torch.cuda.Stream(device=d) if d.type == "cuda" else None for _, d in self.replicas]

    # ------------------------------------------------------------ the UNet face (the canvas device's replica)
    def __call__(self, *args, **kwargs):
        self.calls[0] += 1
        return self.replicas[0][0](*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("replicas", "calls", "force", "_controlnets", "_streams", "_next"):
            raise AttributeError(name)
        return getattr(self.replicas[0][0], name)

    # ------------------------------------------------------------ splitting
    def splits(self, batches: int) -> bool:
        """Whether a step with this many tile batches is spread over the devices."""
        return len(self.replicas) > 1 and (self.force or batches >= len(self.replicas))

    def control_for(self, index: int, control: Sequence[Any]) -> tuple:
        """The ControlNet units with their models on replica `index`'s device (copied once per model)."""
        if index == 0:
            return tuple(control)
        device = self.replicas[index][1]
        out = []
        for unit in control:
            key = (id(unit.model), index)
            if key not in self._controlnets:
                self._controlnets[key] = copy.deepcopy(unit.model).to(device)
            out.append(replace(unit, model=self._controlnets[key]))
        return tuple(out)

    def map(self, run: Callable[[int, Any, torch.device, Any], torch.Tensor], items: Sequence[Any],
            out_device: torch.device) -> list[torch.Tensor]:
        """`run(index, unet, device, item)` for every item, dealt round-robin over the replicas (continuing from the
        last call, so counts stay within one of each other), a thread per device; results on `out_device`, in the
        items' order."""
        n = len(self.replicas)
        assigned = [[k for k in range(len(items)) if (self._next + k) % n == i] for i in range(n)]
        self._next = (self._next + len(items)) % n
        results: list[torch.Tensor | None] = [None] * len(items)

        def work(i: int) -> None:
            unet, device = self.replicas[i]
            stream = self._streams[i]
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                for k in assigned[i]:
                    results[k] = run(i, unet, device, items[k]).to(out_device)
                    self.calls[i] += 1
            if stream is not None:
                stream.synchronize()

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="tessera-tiles") as pool:
            for f in [pool.submit(work, i) for i in range(n) if assigned[i]]:
                f.result()  # re-raises a device's error (out of memory, cancel) here
        return results  # type: ignore[return-value]


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists, tuples and dicts) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value


def split_note(batches: int, devices: int, force: bool = False) -> str:
    """The plan line's note on how a step's tile batches are spread, e.g. "split over 2 devices: 4+4 tile batches
    per step"."""
    if devices <= 1:
        return ""
    if not (force or batches >= devices):
        return f"not split ({batches} tile batch(es) per step < {devices} devices)"
    share = [len(range(i, batches, devices)) for i in range(devices)]
    return f"split over {devices} devices: {'+'.join(map(str, share))} tile batches per step"


def expected_speedup(batches: int, devices: int, batch_s: float = 1.0, step_s: float = 0.0) -> float:
    """Expected speed-up of one step on `devices` devices: the UNet part shrinks to ceil(batches/devices) batch
    times; the once-per-step part (`step_s`: guidance, scheduler step, gathering) does not shrink."""
    one = batches * batch_s + step_s
    many = math.ceil(batches / max(1, devices)) * batch_s + step_s
    return one / many
