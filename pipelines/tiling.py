"""Tile geometry, blend weights and a seam metric for tiled diffusion (MultiDiffusion / Mixture of Diffusers).

The denoising loop crops each tile from the latent canvas, runs the UNet, and accumulates the output into a
full-size canvas with a per-tile weight; after all tiles it divides by the summed weights and takes ONE
scheduler step on the whole canvas. Uniform weights give MultiDiffusion's average (Bar-Tal et al. 2023, eq. 5);
Gaussian weights give Mixture of Diffusers (Jiménez 2023, sec. 3). For a model whose output at a pixel depends
only on that pixel, tiled and untiled results agree to float precision.

All sizes here are in latent pixels unless a name says otherwise.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipelines.errors import ValidationError

BlendMode = Literal["average", "gaussian"]
BLEND_MODES: tuple[str, ...] = ("average", "gaussian")
GAUSSIAN_VARIANCE = 0.01  # Mixture of Diffusers: variance on coordinates normalised by the tile size


@dataclass(frozen=True)
class Tile:
    """One tile of the latent canvas: top-left corner (y, x) and size (h, w), in latent pixels."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices selecting this tile: `x[..., rows, cols]`."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def _check_tiling(tile_size: int, overlap: int) -> None:
    """Validate the tile size and overlap shared by every tiling entry point."""
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValidationError("tile_size", tile_size, "must be a positive integer (latent pixels)")
    if not isinstance(overlap, int) or overlap < 0:
        raise ValidationError("overlap", overlap, "must be an integer >= 0 (latent pixels)")
    if overlap >= tile_size:
        raise ValidationError("overlap", overlap, f"must be smaller than tile_size={tile_size}; try {tile_size // 4}")


def tile_starts(size: int, tile: int, overlap: int, offset: int = 0) -> list[int]:
    """Start positions of equal tiles covering [0, size): spread evenly, overlap >= `overlap`, shifted by `offset`."""
    t = min(tile, size)
    if t == size:
        return [0]
    stride = t - min(overlap, t - 1)
    n = math.ceil((size - t) / stride) + 1
    # Even spread (not a fixed stride), so no uncovered strip when (size - t) is not a multiple of the stride.
    starts = [round(i * (size - t) / (n - 1)) for i in range(n)]
    shift = offset % stride
    if shift:
        starts = [s - shift for s in starts] + [size - t]  # the shifted grid no longer reaches the end
    return sorted({min(max(s, 0), size - t) for s in starts})


def plan_tiles(height: int, width: int, tile_size: int, overlap: int, offset: tuple[int, int] = (0, 0)) -> list[Tile]:
    """Cover a (height, width) latent canvas with equal overlapping tiles; `offset` shifts the grid (dy, dx)."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValidationError(name, value, "must be a positive integer (latent pixels)")
    _check_tiling(tile_size, overlap)
    if len(offset) != 2 or not all(isinstance(o, int) for o in offset):
        raise ValidationError("offset", offset, "must be a pair of integers (dy, dx)")
    th, tw = min(tile_size, height), min(tile_size, width)
    ys = tile_starts(height, tile_size, overlap, offset[0])
    xs = tile_starts(width, tile_size, overlap, offset[1])
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def _gaussian_1d(n: int, variance: float) -> torch.Tensor:
    """Unnormalised Gaussian over n samples, centred, coordinates divided by n (Jiménez 2023, sec. 3)."""
    centre = (n - 1) / 2
    d = (torch.arange(n, dtype=torch.float64) - centre) / n  # exact negation about the centre -> symmetric
    return torch.exp(-(d * d) / (2 * variance))


def tile_weights(h: int, w: int, mode: BlendMode = "average", device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pixel blend weights [h, w] float32: ones (MultiDiffusion) or a separable Gaussian (Mixture of Diffusers)."""
    if mode == "average":
        return torch.ones(h, w, dtype=torch.float32, device=device)
    if mode == "gaussian":
        grid = torch.outer(_gaussian_1d(h, GAUSSIAN_VARIANCE), _gaussian_1d(w, GAUSSIAN_VARIANCE))
        return grid.to(dtype=torch.float32, device=device)
    raise ValidationError("mode", mode, f"must be one of {BLEND_MODES}")


def plan_cores(length: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, length) into ceil(length / tile) near-equal consecutive cores (start, end): the pixel upscaler's
    tiles, each run with context around it (`pipelines.models.upscalers.upscale_tensor`)."""
    n = max(1, math.ceil(length / tile))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def ramp_weights(start: int, end: int, lo: int, hi: int, overlap: int, scale: int) -> torch.Tensor:
    """1-D output weights of the window [lo, hi) whose core is [start, end), at `scale` output pixels per input
    pixel: 1 inside, linear ramps `overlap` wide centred on each seam, so neighbours' weights sum to 1 (feathering)."""
    x = torch.arange(lo * scale, hi * scale, dtype=torch.float32) + 0.5
    width = max(overlap * scale, 1)
    w = torch.ones_like(x)
    if start > lo:  # a seam on the left: ramp from 0 to 1 centred on it
        w = torch.minimum(w, (0.5 + (x - start * scale) / width).clamp(0, 1))
    if end < hi:
        w = torch.minimum(w, (0.5 - (x - end * scale) / width).clamp(0, 1))
    return w


def grid_offset(seed: int, step: int, tile_size: int, overlap: int) -> tuple[int, int]:
    """Reproducible random grid shift (dy, dx) for a step, to move seams between steps; a local RNG only."""
    _check_tiling(tile_size, overlap)
    rng = random.Random(f"tessera-grid:{seed}:{step}")
    stride = tile_size - overlap
    return rng.randrange(stride), rng.randrange(stride)


def new_canvas(
    batch: int, channels: int, height: int, width: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero float32 accumulation canvas [B, C, H, W] and weight sum [H, W]."""
    canvas = torch.zeros(batch, channels, height, width, dtype=torch.float32, device=device)
    return canvas, torch.zeros(height, width, dtype=torch.float32, device=device)


def accumulate(canvas: torch.Tensor, wsum: torch.Tensor, tile: Tile, value: torch.Tensor, weight: torch.Tensor) -> None:
    """Add one tile's output times its weight into the canvas, in float32 (MultiDiffusion eq. 5 numerator)."""
    rows, cols = tile.slices
    w = weight.to(device=canvas.device, dtype=torch.float32)
    canvas[..., rows, cols] += value.to(device=canvas.device, dtype=torch.float32) * w
    wsum[rows, cols] += w


def finish(canvas: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
    """Weighted average: canvas / summed weights (float32); a pixel no tile covered (inpainting skips tiles with
    nothing masked) is 0. Covered pixels divide by their own sum, bit for bit."""
    return canvas / wsum.clamp_min(torch.finfo(wsum.dtype).tiny)


def tile_boundaries(tiles: list[Tile], scale: int = 8) -> tuple[list[int], list[int]]:
    """Pixel-space (xs, ys) of tile edges strictly inside the image (image size = the tiles' extent)."""
    width = max(t.x + t.w for t in tiles)
    height = max(t.y + t.h for t in tiles)
    xs = {e for t in tiles for e in (t.x, t.x + t.w) if 0 < e < width}
    ys = {e for t in tiles for e in (t.y, t.y + t.h) if 0 < e < height}
    return sorted(x * scale for x in xs), sorted(y * scale for y in ys)


def _as_array(image) -> np.ndarray:
    """A PIL image or HxW(xC) array as HxWxC, in its own dtype (lines are widened when read: a 4096² RGB image
    stays 50 MB instead of 400 MB as float64)."""
    arr = np.asarray(image)
    return arr[..., None] if arr.ndim == 2 else arr


def _line_jumps(arr: np.ndarray, positions: list[int], axis: int) -> list[float]:
    """Mean |difference| across each line (between index p-1 and p along `axis`); skips lines off the image."""
    size = arr.shape[axis]
    return [
        float(np.abs(np.take(arr, p, axis=axis).astype(np.float64) - np.take(arr, p - 1, axis=axis)).mean())
        for p in positions
        if 0 < p < size
    ]


def _reference_lines(boundaries: list[int], size: int, distance: int) -> list[int]:
    """Interior lines `distance` away from each boundary that are not themselves near a boundary."""
    candidates = {b + s * distance for b in boundaries for s in (-1, 1)}
    return sorted(c for c in candidates if 0 < c < size and all(abs(c - b) >= distance // 2 for b in boundaries))


def seam_score(image, boundaries_x: list[int], boundaries_y: list[int], distance: int = 4) -> float:
    """Mean jump across tile-boundary lines / mean jump across interior lines `distance` px away (~1 = no seams)."""
    arr = _as_array(image)
    if not boundaries_x and not boundaries_y:
        return float("nan")
    h, w = arr.shape[:2]
    seam = _line_jumps(arr, boundaries_x, 1) + _line_jumps(arr, boundaries_y, 0)
    ref = _line_jumps(arr, _reference_lines(boundaries_x, w, distance), 1)
    ref += _line_jumps(arr, _reference_lines(boundaries_y, h, distance), 0)
    if not seam or not ref:
        return float("nan")
    eps = 1e-12
    return (float(np.mean(seam)) + eps) / (float(np.mean(ref)) + eps)
