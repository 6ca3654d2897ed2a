"""One large tiled image across devices: a step's tile batches spread over UNet replicas, gathered in order.

Tiles are independent within a step (MultiDiffusion blends their outputs afterwards), so running the batches of one
step on several devices and accumulating them on the canvas device in the same order gives the same pixels as one
device; guidance and the scheduler step still run once, on the canvas device (`pipelines.denoise.loop`). DistriFusion
(Li et al., CVPR 2024) needs stale activations only because it splits a single UNet call; this splits whole calls.

`TileReplicas` is the loop's executor (`pipelines.denoise.executor`): a step's batches go through `map` when
`splits(n)` says so (at least as many batches as devices, or forced), else one after the other on the canvas device.
On CUDA each device's batches run on its own stream, in a thread per device (`DeviceReplicas.map`).

The same job's tiled VAE runs across the same devices: `vae_replicas` (each worker's VAE) goes to
`pipelines.vae.io.decode`/`encode` (`pipelines.job.CodecOptions.replicas`), which deal each stage's tiles over them
(`pipelines.vae.lanes`); the GroupNorm moments come back per tile and are merged in tile order on the canvas
device, so the statistics and the pixels are those of one device. ControlNet units get each device's copy of
their model from that worker's `ControlCopies`, kept across jobs. The feature cache runs on every replica
(`pipelines.denoise.feature_cache`: each device's own split passes, entries moved where they are needed).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from pipelines.denoise.executor import BatchRun, Lane, to_device
from pipelines.lru import LRUCache

log = logging.getLogger(__name__)

class DeviceReplicas:
    """Modules [(module, device), ...] (the first on the canvas device) over which per-item work is dealt
    round-robin, a thread (and on CUDA a stream) per device; `calls[i]` counts the items replica i ran."""

    def __init__(self, replicas: Sequence[tuple[Any, Any]]):
        if not replicas:
            raise ValueError(f"{type(self).__name__} needs at least one (module, device)")
        self.replicas = [(module, torch.device(device)) for module, device in replicas]
        self.calls = [0] * len(self.replicas)
        self._next = 0
        self._streams = [torch.cuda.Stream(device=d) if d.type == "cuda" else None for _, d in self.replicas]

    def map(self, run: Callable[[int, Any, torch.device, Any], Any], items: Sequence[Any],
            out_device: torch.device) -> list[Any]:
        """`run(index, module, device, item)` for every item, dealt round-robin over the replicas (continuing from
        the last call, so counts stay within one of each other), a thread per device; results (tensors, also in
        tuples, lists and dicts) on `out_device`, in the items' order."""
        n = len(self.replicas)
        assigned = [[k for k in range(len(items)) if (self._next + k) % n == i] for i in range(n)]
        self._next = (self._next + len(items)) % n
        results: list[Any] = [None] * len(items)

        def work(i: int) -> None:
            module, device = self.replicas[i]
            stream = self._streams[i]
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                for k in assigned[i]:
                    results[k] = to_device(run(i, module, device, items[k]), out_device)
                    self.calls[i] += 1
            if stream is not None:
                stream.synchronize()

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="tessera-tiles") as pool:
            for f in [pool.submit(work, i) for i in range(n) if assigned[i]]:
                f.result()  # re-raises a device's error (out of memory, cancel) here
        return results


class ControlCopies:
    """One device's copies of ControlNet models, kept across jobs (a bounded LRU per worker), so a split job does
    not copy a model the previous job copied. Keyed by a weak reference to the source model: a source that was
    freed never matches a new model that reuses its id, and its copy ages out."""

    def __init__(self, device: Any, size: int = 3):
        self.device = torch.device(device)
        self._copies = LRUCache(size)  # three ControlNet units per job; a refine's tile ControlNet ages one out
        self._lock = threading.Lock()

    def get(self, model: Any) -> Any:
        """`model` on this device: the cached copy, or a deep copy made now."""
        with self._lock:
            return self._copies.get(weakref.ref(model), lambda: copy.deepcopy(model).to(self.device))

    @property
    def copies(self) -> int:
        """How many copies were made (cache misses)."""
        return self._copies.misses


class TileReplicas(DeviceReplicas):
    """UNet replicas [(unet, device), ...] (the first on the canvas device), per-replica UNet call counts, the VAE
    replicas of the same devices for the tiled VAE (`vae_replicas`, None: decode on the first device) and each
    device's ControlNet copies."""

    def __init__(self, replicas: Sequence[tuple[Any, Any]], *, force: bool = False,
                 vaes: Sequence[Any] | None = None, controlnets: Sequence[ControlCopies] | None = None):
        super().__init__(replicas)
        self.force = force
        devices = [d for _, d in self.replicas]
        self.vae_replicas = DeviceReplicas(list(zip(vaes, devices, strict=True))) if vaes else None
        self.controlnets = list(controlnets) if controlnets else [ControlCopies(d) for d in devices]

    # ------------------------------------------------------------ the loop's executor (`pipelines.denoise.executor`)
    @property
    def unets(self) -> list[Any]:
        """Each device's UNet, the canvas device's first."""
        return [unet for unet, _ in self.replicas]

    def run_batches(self, run: BatchRun, groups: Sequence[Any], out_device: Any, control: Sequence[Any]
                    ) -> Iterable[Any]:
        """A step's batches: spread over the devices when `splits` says so, else one after the other on the canvas
        device's replica; `calls[i]` counts the batches replica i ran either way."""
        if not self.splits(len(groups)):
            unet, device = self.replicas[0]
            for group in groups:
                self.calls[0] += 1
                yield run(Lane(0, unet, None, tuple(control)), group)
            return
        yield from self.map(lambda i, unet, device, group: run(Lane(i, unet, device, self.control_for(i, control)),
                                                               group), groups, out_device)

    # ------------------------------------------------------------ splitting
    def splits(self, batches: int) -> bool:
        """Whether a step with this many tile batches is spread over the devices."""
        return len(self.replicas) > 1 and (self.force or batches >= len(self.replicas))

    def control_for(self, index: int, control: Sequence[Any]) -> tuple:
        """The ControlNet units with their models on replica `index`'s device (copied once per model and device,
        kept by the device's `ControlCopies`)."""
        if index == 0:
            return tuple(control)
        return tuple(replace(unit, model=self.controlnets[index].get(unit.model)) for unit in control)




def split_note(batches: int, devices: int, force: bool = False, vae_tiled: bool = False) -> str:
    """The plan line's note on how a step's tile batches are spread, e.g. "split over 2 devices: 4+4 tile batches
    per step" (", tiled VAE too" when the plan tiles the VAE: its tiles are spread over the same devices)."""
    if devices <= 1:
        return ""
    if not (force or batches >= devices):
        return f"not split ({batches} tile batch(es) per step < {devices} devices)"
    share = [len(range(i, batches, devices)) for i in range(devices)]
    vae = ", tiled VAE too" if vae_tiled else ""
    return f"split over {devices} devices: {'+'.join(map(str, share))} tile batches per step{vae}"


def expected_speedup(batches: int, devices: int, batch_s: float = 1.0, step_s: float = 0.0) -> float:
    """Expected speed-up of one step on `devices` devices: the UNet part shrinks to ceil(batches/devices) batch
    times; the once-per-step part (`step_s`: guidance, scheduler step, gathering) does not shrink."""
    one = batches * batch_s + step_s
    many = math.ceil(batches / max(1, devices)) * batch_s + step_s
    return one / many
