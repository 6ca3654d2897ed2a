"""The building blocks of the tiled VAE (`pipelines.vae.tiling`, `pipelines.vae.stream`).

An ``AutoencoderKL`` decoder's up path (or encoder's down path) is cut into *stages* that each start at a GroupNorm
(``norm -> act -> conv``, ``norm -> act -> conv + skip [-> resample]``, ``norm_out -> act -> conv_out``), so a
runner can normalise every tile with statistics of the WHOLE image (`Moments`, `group_norm`) instead of the tile's
own, which is what makes tiles agree with each other and with the full decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.errors import ValidationError
from pipelines.tiling import Tile, plan_tiles, tile_starts

Body = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One step of the tiled path: optional GroupNorm (whole-image stats), then `body(h, skip)`."""

    norm: nn.GroupNorm | None
    body: Body
    scale: float  # output resolution / input resolution: 1, 2 (upsample) or 0.5 (downsample)
    halo: int  # context pixels (at the input resolution) a core reads in the layer-wise (exact) runner
    reach: float = 1.0  # exact receptive-field radius of norm + body, in input pixels (the streamed runner's margin)
    keeps_input: bool = False  # this stage's input is the next stage's skip (resnet first half)
    uses_skip: bool = False  # body needs the skip tensor (resnet second half)
    channels: tuple[int, int] = (0, 0)  # (input, output) channels: what the runners' canvases hold


TileMoments = tuple[int, torch.Tensor, torch.Tensor]
"""One tile's (element count per group, mean, M2) per [B, groups], float64."""


def tile_moments(x: torch.Tensor, groups: int) -> TileMoments:
    """(count, mean, M2) of one tile's core [B, C, h, w] per (sample, group), in float64 on `x`'s device."""
    g = x.detach().reshape(x.shape[0], groups, -1).to(torch.float64)
    mean = g.mean(-1)
    return g.shape[-1], mean, ((g - mean[..., None]) ** 2).sum(-1)


class Moments:
    """Per-(sample, group) count, mean and M2 merged across tiles (Chan et al. 1979 parallel variance)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the elements of one tile's core [B, C, h, w]."""
        self.merge(tile_moments(x, self.groups))

    def merge(self, part: TileMoments) -> None:
        """Add one tile's (count, mean, M2) from `tile_moments`, maybe computed on another device of the same kind
        and moved here: merged in one order, the float64 result is the same wherever each tile's part was made."""
        n_b, mean_b, m2_b = part
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        assert self.m2 is not None  # set with the mean
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per [B, groups], float64."""
        assert self.mean is not None and self.m2 is not None  # at least one part merged
        return self.mean, self.m2 / self.n


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """GroupNorm of a tile with given whole-image (mean, var) per [B, groups] (Wu & He 2018, eq. 1)."""
    b, c = x.shape[:2]
    mean, var = (s.to(device=x.device, dtype=torch.float32) for s in stats)
    rstd = torch.rsqrt(var + norm.eps)
    g = x.to(torch.float32).reshape(b, norm.num_groups, -1)
    y = ((g - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.float().view(1, c, 1, 1) + norm.bias.float().view(1, c, 1, 1)
    return y.to(x.dtype)


def _resnet_stages(res: Any, resample: nn.Module | None, scale: float) -> list[Stage]:
    """ResnetBlock2D split at its two GroupNorms; an up/downsampler after it is fused into the second half."""
    if getattr(res, "time_emb_proj", None) is not None or res.upsample is not None or res.downsample is not None:
        raise ValidationError("vae", type(res).__name__, "has a resnet layout tiled VAE does not support")

    def first(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return res.conv1(res.nonlinearity(h))

    def second(h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        assert skip is not None  # this stage keeps the resnet's input (uses_skip)
        h = res.conv2(res.dropout(res.nonlinearity(h)))
        shortcut = res.conv_shortcut(skip) if res.conv_shortcut is not None else skip
        out = (shortcut + h) / res.output_scale_factor
        return resample(out) if resample is not None else out

    halo = 4 if scale != 1 else 2
    # conv2 reads 1 px; an upsampler's conv reads 1 px at twice the resolution (0.5 here); a stride-2 downsampler
    # with diffusers' (0, 1) padding reads 1 more px to the right and below
    reach = 1.0 + {1: 0.0, 2: 0.5, 0.5: 1.0}[scale]
    return [
        Stage(res.norm1, first, 1, 1, keeps_input=True, channels=(res.conv1.in_channels, res.conv1.out_channels)),
        Stage(res.norm2, second, scale, halo, reach, uses_skip=True,
              channels=(res.conv2.in_channels, res.conv2.out_channels)),
    ]


def _block_stages(blocks: Any, samplers: str, scale: float) -> list[Stage]:
    """Stages of every resnet in up/down blocks, with the block's resampler fused into its last resnet."""
    stages: list[Stage] = []
    for block in blocks:
        if getattr(block, "attentions", None):
            raise ValidationError("vae", type(block).__name__, "has attention in its blocks; only plain ones tile")
        resample = getattr(block, samplers)
        resample = resample[0] if resample is not None else None
        for i, res in enumerate(block.resnets):
            last = i == len(block.resnets) - 1
            stages += _resnet_stages(res, resample if last else None, scale if last and resample is not None else 1)
    return stages


def decoder_stages(decoder: Any) -> list[Stage]:
    """The decoder's up path (after the mid-block) as GroupNorm-delimited stages."""
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        raise ValidationError("vae", type(decoder.conv_norm_out).__name__, "must use GroupNorm (AutoencoderKL)")
    stages = _block_stages(decoder.up_blocks, "upsamplers", 2)

    def out(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return decoder.conv_out(decoder.conv_act(h))

    channels = (decoder.conv_out.in_channels, decoder.conv_out.out_channels)
    return stages + [Stage(decoder.conv_norm_out, out, 1, 1, channels=channels)]


def encoder_stages(encoder: Any) -> list[Stage]:
    """The encoder's conv_in and down path (before the mid-block) as GroupNorm-delimited stages."""

    def conv_in(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return encoder.conv_in(h)

    channels = (encoder.conv_in.in_channels, encoder.conv_in.out_channels)
    return [Stage(None, conv_in, 1, 1, channels=channels)] + _block_stages(encoder.down_blocks, "downsamplers", 0.5)


def tile_cores(height: int, width: int, tile_size: int, overlap: int) -> list[Tile]:
    """Partition of the canvas: the tiles of `plan_tiles`, with each overlap split at its midpoint."""
    plan_tiles(height, width, tile_size, overlap)  # validates

    def spans(size: int) -> list[tuple[int, int]]:
        t = min(tile_size, size)
        starts = tile_starts(size, tile_size, overlap)
        cuts = [0] + [(b + a + t) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [size]
        return list(zip(cuts, cuts[1:], strict=False))

    return [Tile(y0, x0, y1 - y0, x1 - x0) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def crop_span(start: int, stop: int, halo: int, size: int, window: int = 0) -> tuple[int, int]:
    """[start - halo, stop + halo) clamped to [0, size); with `window` (>= the longest core + 2 halo), a span of
    exactly min(window, size) that contains it, moved inside the canvas at its edges.

    Equal tile shapes matter on a CPU: glibc's heap reuses a freed buffer for a request of the same size, but
    tiles of a dozen different shapes fragment it. Streaming SD-shaped tiles of the tiny VAE at 2048² grew the
    process by 1.6 GB for 170 MB of live tensors with clamped spans, by 0.3 GB with equal windows.
    """
    lo, hi = max(start - halo, 0), min(stop + halo, size)
    if not window:
        return lo, hi
    lo = min(lo, size - min(window, size))
    return lo, lo + min(window, size)


def window(cores: list[Tile], halo: int, res: int = 1) -> tuple[int, int]:
    """(rows, columns) of the equal windows `crop_span` cuts around `cores` at `res` x latent resolution."""
    return max(c.h for c in cores) * res + 2 * halo, max(c.w for c in cores) * res + 2 * halo


def core_stats(
    h: torch.Tensor, cores: list[Tile], res: int, groups: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image GroupNorm (mean, var) of a stored canvas at `res` x latent resolution, gathered core by core."""
    moments = Moments(groups)
    for core in cores:
        rows, cols = slice(core.y * res, (core.y + core.h) * res), slice(core.x * res, (core.x + core.w) * res)
        moments.update(h[..., rows, cols].to(device))
    return moments.finalize()
