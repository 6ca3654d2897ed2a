"""Streamed tiled VAE: every tile runs the whole up (or down) path on its own, so memory stays one tile deep.

The layer-wise runner (`pipelines.vae_tiling.run_stages`) is exact but keeps about three full-resolution
activations of one layer on its store device: for SD's VAE at 4096² that is ~17 GB of host RAM in fp16. This
runner keeps nothing at full resolution but the output:

1. each tile reads its core plus a margin of context (the stages' summed receptive field, ~13 latent px for SD's
   VAE) from the stored input (the latent-resolution mid-block output when decoding, the image when encoding),
   runs every stage, and keeps only its core: with the SAME GroupNorm statistics in every tile, cores agree
   with each other and with the full decode, so there are no seams and nothing to feather;
2. those statistics are the whole image's, exact: GroupNorm j's come from a sweep that runs every tile up to
   stage j (with the exact statistics of GroupNorms 0..j-1, found by the sweeps before) and adds the moments of
   its core there (the two passes of the tiled-VAE design: gather per-tile sums over non-overlapping cores, then
   normalise with the global values). The first GroupNorm's input is stored whole, so it needs no sweep.

So the result equals the full decode up to float rounding, like the layer-wise runner. Cheaper estimates were
measured on the tiny VAE at 768² (tiles 32/8; diffusers' `enable_tiling` has mean abs error 0.040 there) and
dropped: each tile's own statistics 0.018 (max 0.83: visible tile edges); statistics of a 2x-downsampled input
1.18 on noise latents; of a 4x4 mosaic of 16² crops 0.0065 on noise but 0.022 (max 1.35) on smooth latents; and
re-sweeping with the previous sweep's estimates (a fixed-point iteration) diverged: 0.046, 0.21, 0.18, 0.67
after 1-4 sweeps, because a GroupNorm fed inputs normalised differently from when its statistics were gathered
amplifies the mismatch.

Cost: one sweep per GroupNorm, each stopping at it: the sum of the stages' prefix costs, on tiles of
(tile + 2 * margin)² instead of tile². For SD's VAE (25 GroupNorms) the sweeps cost 10.5 decodes' FLOPs
(torch's FlopCounterMode per stage), so 11.5x one decode before margins and ~17x with 128² tiles (4.5x measured
on the tiny VAE with 32² tiles). Memory no longer grows with the image, so the planner uses this runner only
when the layer-wise canvases would not fit (`pipelines.vae_tiling.layerwise_store_bytes`), with the largest
tile the device budget allows. Not done: running the low-resolution head layer by layer and streaming only the
tail would cut SD's 11.5x only to ~7.7x, for ~3 GB of host canvases at 4096² (the half-resolution level).
"""

from __future__ import annotations

import math

import torch

from pipelines.tiling import Tile
from pipelines.vae_stages import Moments, Stage, core_stats, crop_span, group_norm

Stats = dict[int, tuple[torch.Tensor, torch.Tensor]]


def margin(stages: list[Stage], res: int) -> int:
    """Context (in latent pixels) a core needs so every stage sees the same inputs as in the full decode."""
    total, r = 0.0, float(res)
    for stage in stages:
        total += stage.reach / r
        r *= stage.scale
    return math.ceil(total)


def _core_slice(core: Tile, origin_y: int, origin_x: int, r: int) -> tuple[slice, slice]:
    """The core's rows and columns inside a tile whose top-left latent pixel is (origin_y, origin_x)."""
    y, x = (core.y - origin_y) * r, (core.x - origin_x) * r
    return slice(y, y + core.h * r), slice(x, x + core.w * r)


def _tile(
    stages: list[Stage], h: torch.Tensor, core: Tile, res: int, pad: int, stats: Stats, device: torch.device,
    gather: tuple[int, Moments] | None = None,
) -> torch.Tensor | None:
    """Run the stages on one core plus `pad` latent px of context and return the core of the output; with
    `gather=(j, moments)`, stop at stage j instead and add the core of its input to `moments`."""
    lat_h, lat_w = h.shape[-2] // res, h.shape[-1] // res
    y0, y1 = crop_span(core.y, core.y + core.h, pad, lat_h)
    x0, x1 = crop_span(core.x, core.x + core.w, pad, lat_w)
    x = h[..., y0 * res : y1 * res, x0 * res : x1 * res].to(device)
    r, skip = res, None
    for i, stage in enumerate(stages):
        if gather is not None and i == gather[0]:
            rows, cols = _core_slice(core, y0, x0, r)
            gather[1].update(x[..., rows, cols])
            return None
        inp = x
        if stage.norm is not None:
            x = group_norm(x, stage.norm, stats[i])
        x = stage.body(x, skip if stage.uses_skip else None)
        skip = inp if stage.keeps_input else None
        r = int(r * stage.scale)
    rows, cols = _core_slice(core, y0, x0, r)
    return x[..., rows, cols]


def run_streamed(
    stages: list[Stage], h: torch.Tensor, cores: list[Tile], res: int, device: torch.device
) -> torch.Tensor:
    """Run stages tile by tile, end to end, with exact whole-image GroupNorm statistics (one sweep per GroupNorm).

    `h` (on any device) is at `res` x latent resolution; the output canvas is allocated on `h`'s device.
    """
    stats: Stats = {}
    for j, stage in enumerate(stages):
        if stage.norm is None:
            continue
        if j == 0:  # the stored input itself
            stats[0] = core_stats(h, cores, res, stage.norm.num_groups, device)
            continue
        moments, pad = Moments(stage.norm.num_groups), margin(stages[:j], res)
        for core in cores:
            _tile(stages, h, core, res, pad, stats, device, gather=(j, moments))
        stats[j] = moments.finalize()
    pad, out, r = margin(stages, res), None, float(res)
    for stage in stages:
        r *= stage.scale
    r = int(r)
    for core in cores:
        y = _tile(stages, h, core, res, pad, stats, device)
        if out is None:
            shape = (*y.shape[:2], h.shape[-2] // res * r, h.shape[-1] // res * r)
            out = torch.empty(shape, dtype=y.dtype, device=h.device)
        out[..., core.y * r : (core.y + core.h) * r, core.x * r : (core.x + core.w) * r] = y.to(h.device)
    return out
