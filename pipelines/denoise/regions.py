"""Regional prompts in the loop: region masks at latent resolution, the views the loop runs, seeds per region.

MultiDiffusion region control (Bar-Tal et al. 2023, sec. 4.2): each step every region's model output is blended
on the canvas with weight x feathered mask, the base prompt's with the base mask ("rest": 1 - the regions'
coverage, so only where no region is; "background": 1 everywhere, regions blended over it), and the sum is
divided by the summed weights, as tiles are (`pipelines.tiling`). In tiled runs a view only runs on the tiles its
mask touches (`tiles_touching`), so a region costs nothing where it is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.request.regions import Region
from pipelines.tiling import Tile


@dataclass(frozen=True)
class RegionView:
    """One region as the loop sees it: its per-step conditioning and its weight mask [h, w] (latent pixels)."""

    conditioning: Callable[[int], Any]
    mask: torch.Tensor


def latent_box(region: Region, width: int, height: int, canvas: tuple[int, int], vae_scale: int = 8
               ) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a region in latent pixels of a `width` x `height` stage; `canvas` = the stage-1 size
    (w, h) that pixel regions refer to. At least one latent pixel each way."""
    lh, lw = height // vae_scale, width // vae_scale
    fx0, fy0, fx1, fy1 = region.fractions(*canvas)

    def edges(f0: float, f1: float, n: int) -> tuple[int, int]:
        a = min(max(round(f0 * n), 0), n - 1)
        return a, min(max(round(f1 * n), a + 1), n)

    (y0, y1), (x0, x1) = edges(fy0, fy1, lh), edges(fx0, fx1, lw)
    return y0, x0, y1, x1


def _ramp(n: int, a: int, b: int, feather: float) -> torch.Tensor:
    """1-D feathered window over [a, b) of n: rises over `feather` px inside the edges, none at the canvas edge."""
    i = torch.arange(n, dtype=torch.float32)
    dist = torch.full((n,), float("inf"))
    if a > 0:
        dist = torch.minimum(dist, i - a + 1)
    if b < n:
        dist = torch.minimum(dist, b - i)
    ramp = (dist / (feather + 1.0)).clamp(max=1.0)
    return torch.where((i >= a) & (i < b), ramp, torch.zeros(()))


def feathered_mask(box: tuple[int, int, int, int], lh: int, lw: int, feather: float) -> torch.Tensor:
    """[lh, lw] float32 mask of a box: 1 inside, ramping to 0 over `feather` latent px at its inner edges."""
    y0, x0, y1, x1 = box
    return _ramp(lh, y0, y1, feather)[:, None] * _ramp(lw, x0, x1, feather)[None, :]


def region_masks(regions: Sequence[Region], width: int, height: int, canvas: tuple[int, int], base: str = "rest",
                 vae_scale: int = 8, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(base mask or None for "everywhere", [weight x feathered mask per region]) at this stage's latent size."""
    lh, lw = height // vae_scale, width // vae_scale
    stage_scale = width / canvas[0]
    masks = [feathered_mask(latent_box(r, width, height, canvas, vae_scale), lh, lw,
                            r.feather * stage_scale / vae_scale) for r in regions]
    base_mask = None
    if base == "rest" and masks:
        base_mask = (1.0 - torch.stack(masks).sum(0).clamp(max=1.0)).to(device)
    return base_mask, [(m * r.weight).to(device) for m, r in zip(masks, regions, strict=True)]


def tiles_touching(mask: torch.Tensor | None, tiles: Sequence[Tile]) -> list[Tile]:
    """The tiles where a view's mask is not zero (all tiles for None, the base prompt everywhere)."""
    if mask is None:
        return list(tiles)
    return [t for t in tiles if bool(mask[t.slices].any())]


def paste_region_noise(noise: torch.Tensor, regions: Sequence[Region], seeds: Sequence[int], canvas: tuple[int, int],
                       vae_scale: int = 8) -> torch.Tensor:
    """Initial noise with each seeded region's box drawn from its own seed (seed + i for image i), as Tiled
    Diffusion's "seed per region" does; later regions over earlier ones. Regions without a seed keep the noise."""
    seeded = [r for r in regions if r.seed >= 0]
    if not seeded:
        return noise
    out = noise.clone()
    h, w = noise.shape[-2] * vae_scale, noise.shape[-1] * vae_scale
    for r in seeded:
        y0, x0, y1, x1 = latent_box(r, w, h, canvas, vae_scale)
        for i in range(len(seeds)):
            g = torch.Generator("cpu").manual_seed(r.seed + i)
            local = torch.randn((noise.shape[1], y1 - y0, x1 - x0), generator=g, dtype=torch.float32)
            out[i, :, y0:y1, x0:x1] = local.to(out.device, out.dtype)
    return out


def views_per_step(regions: Sequence[Region], tiles: Sequence[Tile], width: int, height: int, base: str = "rest",
                   tile_batch: int = 1, canvas: tuple[int, int] | None = None, vae_scale: int = 8) -> int:
    """UNet calls per step with regions: each view (base, regions) over the tiles it touches, in batches of
    `tile_batch` (the loop's grouping); the planner's estimate. `canvas` = the stage-1 size (default: this one)."""
    base_mask, masks = region_masks(regions, width, height, canvas or (width, height), base, vae_scale)
    batch = max(1, tile_batch)
    return sum(-(-len(tiles_touching(m, tiles)) // batch) for m in [base_mask, *masks])
