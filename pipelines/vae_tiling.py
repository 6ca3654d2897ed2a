"""Tiled VAE decode/encode for diffusers ``AutoencoderKL`` with whole-image GroupNorm statistics.

Design (see DESIGN.md, "Tiled VAE"). Decoding: ``post_quant_conv``, ``conv_in`` and the mid-block (with its
global self-attention) run ONCE on the whole latent: that is latent resolution, so cheap. The up-blocks, where
the memory goes, run tile by tile, *layer by layer*: the up path is cut into stages that each start at a
GroupNorm (``norm -> act -> conv``, ``norm -> act -> conv + skip [-> upsample]``, ``norm_out -> act -> conv_out``).
A stage is run over every tile before the next one starts:

1. each tile reads its core (a partition of the canvas, from ``plan_tiles`` with overlaps split at their
   midpoints) plus a small halo from the stage's input canvas, with the GroupNorm applied using statistics of
   the WHOLE image (per-tile count/mean/M2 over the cores, combined with Chan's parallel formula);
2. it writes only its core into the stage's output canvas, and adds the core's moments to the statistics the
   next stage's GroupNorm will use (so "gather stats" and "normalise" are the two passes of every GroupNorm,
   fused with the neighbouring stage).

Because each stage has at most two 3x3 convolutions, a halo of 2-4 pixels at the stage's resolution holds all
the context its core needs, so the result equals the full decode up to float rounding (MAE ~1e-7 on the tiny
VAE, against ~4e-2 for diffusers' ``enable_tiling``): no colour shift, no seams, no feathering needed. The
``overlap`` argument only sets where the cores split; results do not depend on it.

Trade-off: the stage canvases (input, skip and output of one stage, about three activations of one layer at
full size) are kept on ``store_device``: the CPU by default when decoding on an accelerator, so the device only
ever holds one tile's working set (plus the latent-resolution mid-block). That costs host RAM and one
host<->device round trip per stage (~2 x layers) instead of the O(layers^2) recomputation a store-free scheme
would need. The mid-block's attention at latent resolution relies on memory-efficient SDPA (the torch 2 default
on CUDA). Encoding mirrors this: the down-blocks (and ``conv_in``) tiled with whole-image statistics, then the
mid-block, ``conv_norm_out``, ``conv_out`` and ``quant_conv`` once at latent resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.errors import ValidationError
from pipelines.tiling import Tile, plan_tiles, tile_starts

log = logging.getLogger(__name__)

Body = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One step of the tiled path: optional GroupNorm (whole-image stats), then `body(h, skip)`."""

    norm: nn.GroupNorm | None
    body: Body
    scale: float  # output resolution / input resolution: 1, 2 (upsample) or 0.5 (downsample)
    halo: int  # context pixels (at the input resolution) the body needs around a core
    keeps_input: bool = False  # this stage's input is the next stage's skip (resnet first half)
    uses_skip: bool = False  # body needs the skip tensor (resnet second half)


class Moments:
    """Per-(sample, group) count, mean and M2 merged across tiles (Chan et al. 1979 parallel variance)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the elements of one tile's core [B, C, h, w]."""
        g = x.detach().reshape(x.shape[0], self.groups, -1).to(torch.float64)
        n_b = g.shape[-1]
        mean_b = g.mean(-1)
        m2_b = ((g - mean_b[..., None]) ** 2).sum(-1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per [B, groups], float64."""
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


def _resnet_stages(res: nn.Module, resample: nn.Module | None, scale: float) -> list[Stage]:
    """ResnetBlock2D split at its two GroupNorms; an up/downsampler after it is fused into the second half."""
    if getattr(res, "time_emb_proj", None) is not None or res.upsample is not None or res.downsample is not None:
        raise ValidationError("vae", type(res).__name__, "has a resnet layout tiled VAE does not support")

    def first(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return res.conv1(res.nonlinearity(h))

    def second(h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        h = res.conv2(res.dropout(res.nonlinearity(h)))
        shortcut = res.conv_shortcut(skip) if res.conv_shortcut is not None else skip
        out = (shortcut + h) / res.output_scale_factor
        return resample(out) if resample is not None else out

    halo = 4 if scale != 1 else 2
    return [
        Stage(res.norm1, first, 1, 1, keeps_input=True),
        Stage(res.norm2, second, scale, halo, uses_skip=True),
    ]


def _block_stages(blocks: nn.ModuleList, samplers: str, scale: float) -> list[Stage]:
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


def decoder_stages(decoder: nn.Module) -> list[Stage]:
    """The decoder's up path (after the mid-block) as GroupNorm-delimited stages."""
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        raise ValidationError("vae", type(decoder.conv_norm_out).__name__, "must use GroupNorm (AutoencoderKL)")
    stages = _block_stages(decoder.up_blocks, "upsamplers", 2)

    def out(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return decoder.conv_out(decoder.conv_act(h))

    return stages + [Stage(decoder.conv_norm_out, out, 1, 1)]


def encoder_stages(encoder: nn.Module) -> list[Stage]:
    """The encoder's conv_in and down path (before the mid-block) as GroupNorm-delimited stages."""

    def conv_in(h: torch.Tensor, _skip: torch.Tensor | None) -> torch.Tensor:
        return encoder.conv_in(h)

    return [Stage(None, conv_in, 1, 1)] + _block_stages(encoder.down_blocks, "downsamplers", 0.5)


def tile_cores(height: int, width: int, tile_size: int, overlap: int) -> list[Tile]:
    """Partition of the canvas: the tiles of `plan_tiles`, with each overlap split at its midpoint."""
    plan_tiles(height, width, tile_size, overlap)  # validates

    def spans(size: int) -> list[tuple[int, int]]:
        t = min(tile_size, size)
        starts = tile_starts(size, tile_size, overlap)
        cuts = [0] + [(b + a + t) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [size]
        return list(zip(cuts, cuts[1:], strict=False))

    return [Tile(y0, x0, y1 - y0, x1 - x0) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def _crop(start: int, stop: int, halo: int, size: int) -> tuple[int, int]:
    """[start - halo, stop + halo) clamped to [0, size)."""
    return max(start - halo, 0), min(stop + halo, size)


def _run_stage(
    stage: Stage, h: torch.Tensor, skip: torch.Tensor | None, cores: list[Tile], res: int,
    stats: tuple[torch.Tensor, torch.Tensor] | None, next_groups: int | None, device: torch.device,
) -> tuple[torch.Tensor, Moments | None]:
    """Run one stage over every tile core; return the output canvas and its moments for the next GroupNorm."""
    out: torch.Tensor | None = None
    moments = Moments(next_groups) if next_groups else None
    height, width = h.shape[-2:]
    for core in cores:
        y0, y1 = _crop(core.y * res, (core.y + core.h) * res, stage.halo, height)
        x0, x1 = _crop(core.x * res, (core.x + core.w) * res, stage.halo, width)
        x = h[..., y0:y1, x0:x1].to(device)
        if stage.norm is not None:
            x = group_norm(x, stage.norm, stats)
        s = skip[..., y0:y1, x0:x1].to(device) if stage.uses_skip else None
        y = stage.body(x, s)
        r = int(res * stage.scale)
        oy, ox = int((core.y * res - y0) * stage.scale), int((core.x * res - x0) * stage.scale)
        y = y[..., oy : oy + core.h * r, ox : ox + core.w * r]
        if out is None:
            shape = (*y.shape[:2], int(height * stage.scale), int(width * stage.scale))
            out = torch.empty(shape, dtype=y.dtype, device=h.device)
        out[..., core.y * r : (core.y + core.h) * r, core.x * r : (core.x + core.w) * r] = y.to(h.device)
        if moments is not None:
            moments.update(y)
    return out, moments


def run_stages(
    stages: list[Stage], h: torch.Tensor, cores: list[Tile], res: int, device: torch.device,
) -> torch.Tensor:
    """Run stages layer by layer over all tiles; `h` lives on the store device at `res` x latent resolution."""
    skip: torch.Tensor | None = None
    stats = None
    if stages[0].norm is not None:
        first = Moments(stages[0].norm.num_groups)
        for core in cores:
            rows, cols = slice(core.y * res, (core.y + core.h) * res), slice(core.x * res, (core.x + core.w) * res)
            first.update(h[..., rows, cols].to(device))
        stats = first.finalize()
    for i, stage in enumerate(stages):
        following = stages[i + 1].norm if i + 1 < len(stages) else None
        groups = following.num_groups if following is not None else None
        out, moments = _run_stage(stage, h, skip, cores, res, stats, groups, device)
        skip = h if stage.keeps_input else None
        h, res = out, int(res * stage.scale)
        stats = moments.finalize() if moments is not None else None
    return h


def _default_store(device: torch.device, store_device: torch.device | str | None) -> torch.device:
    """Where stage canvases live: as given, else the CPU when computing on an accelerator."""
    if store_device is not None:
        return torch.device(store_device)
    return torch.device("cpu") if device.type != "cpu" else device


def _check_args(x: torch.Tensor, tile_size: int, overlap: int, multiple: int, what: str) -> None:
    """Validate a 4-D input whose sides are multiples of `multiple`, and the tile arguments."""
    if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValidationError(what, tuple(x.shape), f"must be [B, C, H, W] with H and W multiples of {multiple}")
    plan_tiles(max(x.shape[-2] // multiple, 1), max(x.shape[-1] // multiple, 1), tile_size, overlap)


def plain_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Exactly what `vae.decode(latents).sample` computes without diffusers' own tiling or slicing."""
    z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    return vae.decoder(z)


@torch.no_grad()
def decode_cores(
    vae: nn.Module, latents: torch.Tensor, cores: list[Tile], store_device: torch.device | str | None = None
) -> torch.Tensor:
    """Decode with the given latent core partition: whole mid-block, up path layer by layer over the cores."""
    dec = vae.decoder
    z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    h = dec.mid_block(dec.conv_in(z), None)
    store = _default_store(latents.device, store_device)
    out = run_stages(decoder_stages(dec), h.to(store), cores, 1, latents.device)
    return out.to(latents.device)


@torch.no_grad()
def tiled_decode(
    vae: nn.Module, latents: torch.Tensor, tile_size: int = 64, overlap: int = 16,
    *, store_device: torch.device | str | None = None,
) -> torch.Tensor:
    """`vae.decode(latents).sample` in bounded device memory; tile_size/overlap in latent pixels."""
    _check_args(latents, tile_size, overlap, 1, "latents")
    latents = latents.to(vae.dtype)
    if tile_size >= max(latents.shape[-2:]):
        return plain_decode(vae, latents)
    cores = tile_cores(latents.shape[-2], latents.shape[-1], tile_size, overlap)
    log.debug("tiled VAE decode: %s latent in %d tiles", tuple(latents.shape[-2:]), len(cores))
    return decode_cores(vae, latents, cores, store_device)


def _downscale(vae: nn.Module) -> int:
    """Pixel-to-latent scale factor of the VAE (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def plain_encode(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Exactly what `vae.encode(images).latent_dist.mode()` computes without diffusers' tiling or slicing."""
    h = vae.encoder(images)
    moments = vae.quant_conv(h) if vae.quant_conv is not None else h
    return moments.chunk(2, dim=1)[0]


@torch.no_grad()
def encode_cores(
    vae: nn.Module, images: torch.Tensor, cores: list[Tile], store_device: torch.device | str | None = None
) -> torch.Tensor:
    """Encode with the given latent core partition; returns the latent distribution's mode (its mean)."""
    enc, scale = vae.encoder, _downscale(vae)
    store = _default_store(images.device, store_device)
    h = run_stages(encoder_stages(enc), images.to(store), cores, scale, images.device).to(images.device)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    moments = vae.quant_conv(h) if vae.quant_conv is not None else h
    return moments.chunk(2, dim=1)[0]


@torch.no_grad()
def tiled_encode(
    vae: nn.Module, images: torch.Tensor, tile_size: int = 512, overlap: int = 64,
    *, store_device: torch.device | str | None = None,
) -> torch.Tensor:
    """`vae.encode(images).latent_dist.mode()` in bounded device memory; tile_size/overlap in pixels."""
    scale = _downscale(vae)
    _check_args(images, max(tile_size // scale, 1), overlap // scale, scale, "images")
    images = images.to(vae.dtype)
    if tile_size >= max(images.shape[-2:]):
        return plain_encode(vae, images)
    cores = tile_cores(images.shape[-2] // scale, images.shape[-1] // scale, tile_size // scale, overlap // scale)
    return encode_cores(vae, images, cores, store_device)
