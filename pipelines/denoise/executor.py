"""Where the loop's UNet batches run: the `TileExecutor` the loop is given.

A step's batches of tiles are independent (MultiDiffusion blends their outputs afterwards), so whoever runs the
loop may spread them: the default, `SERIAL`, runs them one after the other on the loop's own UNet; serving supplies
`pipelines.serving.multi_device.TileReplicas` to run them over several devices' replicas. The loop only calls
`run_batches` and never asks what kind of executor it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Lane:
    """Where one batch runs: a replica's UNet on its device, with the ControlNet units on that device."""

    index: int
    unet: Any
    device: Any
    control: tuple


BatchRun = Callable[["Lane | None", Any], Any]
"""(lane, batch of tiles) -> the batch's UNet output; lane None = the loop's own UNet, on the canvas device."""


class TileExecutor(Protocol):
    """Runs a step's batches of tiles and yields their outputs in order, on the canvas device."""

    unets: Sequence[Any]
    """Every UNet a batch may run on (the canvas device's first; empty: only the loop's own), for the feature
    cache's per-replica split passes."""
    vae_replicas: Any
    """The same devices' VAEs for the tiled VAE (`pipelines.vae.lanes`), or None (one device)."""

    def run_batches(self, run: BatchRun, groups: Sequence[Any], out_device: Any, control: Sequence[Any]) -> Iterable[Any]:
        ...


class Serial:
    """One batch after the other on the loop's own UNet (the default)."""

    unets: Sequence[Any] = ()
    vae_replicas: Any = None

    def run_batches(self, run: BatchRun, groups: Sequence[Any], out_device: Any, control: Sequence[Any]) -> Iterable[Any]:
        for group in groups:
            yield run(None, group)


SERIAL = Serial()


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists, tuples and dicts) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value
