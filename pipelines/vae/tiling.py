"""Tiled VAE decode/encode for diffusers ``AutoencoderKL`` with whole-image GroupNorm statistics.

Design (README, "Tiled diffusion and tiled VAE"). Decoding: ``post_quant_conv``, ``conv_in`` and the mid-block (with its
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

``mode="stream"`` runs the high-resolution stages with `pipelines.vae.stream` instead (each tile through all of
them, exact statistics from one extra sweep per GroupNorm) and only as many low-resolution stages layer by layer
as ``host_budget`` bytes of canvases allow (`decode_splits`; None streams every stage: no full-resolution canvas at
all); the planner picks it when the layer-wise canvases would not fit the host (`pipelines.planner`).

With ``replicas`` (one tiled image split over devices, `pipelines.serving.multi_device`), both runners deal each
stage's tiles (and each statistics sweep's) over the devices' VAEs and merge the tiles' moments in tile order on the
canvas device (`pipelines.vae.lanes`): the same pixels as one device, bit for bit.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from pipelines.errors import ValidationError
from pipelines.tiling import Tile, plan_tiles
from pipelines.vae.lanes import Canvas, Dealer, Lanes
from pipelines.vae.stages import (
    Moments,
    Stage,
    TileMoments,
    core_stats,
    crop_span,
    decoder_stages,
    encoder_stages,
    group_norm,
    tile_cores,
    tile_moments,
    window,
)
from pipelines.vae.stream import Split, choose, run_streamed, splits

log = logging.getLogger(__name__)

Mode = Literal["exact", "stream"]


def _run_stage(
    lanes: Lanes, index: int, h: torch.Tensor, skip: torch.Tensor | None, cores: list[Tile], res: int,
    stats: tuple[torch.Tensor, torch.Tensor] | None, next_groups: int | None,
) -> tuple[torch.Tensor, Moments | None]:
    """Run stage `index` over every tile core (spread over the lanes); return the output canvas and its moments
    for the next GroupNorm, merged in core order."""
    first = lanes.first[index]
    height, width = h.shape[-2:]
    canvas = Canvas(h.device, int(height * first.scale), int(width * first.scale))
    rows, cols = window(cores, first.halo, res)  # equal windows: the allocator reuses tile buffers

    def work(stages: list[Stage], device: torch.device, core: Tile) -> TileMoments | None:
        stage = stages[index]
        y0, y1 = crop_span(core.y * res, (core.y + core.h) * res, stage.halo, height, rows)
        x0, x1 = crop_span(core.x * res, (core.x + core.w) * res, stage.halo, width, cols)
        x = h[..., y0:y1, x0:x1].to(device)
        if stage.norm is not None:
            assert stats is not None  # a GroupNorm stage gets the whole image's statistics
            x = group_norm(x, stage.norm, stats)
        s = None
        if stage.uses_skip:
            assert skip is not None  # the stage before kept its input
            s = skip[..., y0:y1, x0:x1].to(device)
        y = stage.body(x, s)
        r = int(res * stage.scale)
        oy, ox = int((core.y * res - y0) * stage.scale), int((core.x * res - x0) * stage.scale)
        y = y[..., oy : oy + core.h * r, ox : ox + core.w * r]
        canvas.put(y, core.y * r, core.x * r)
        return tile_moments(y, next_groups) if next_groups else None

    parts = lanes.map(work, cores)
    moments = Moments(next_groups) if next_groups else None
    if moments is not None:
        for part in parts:
            assert part is not None  # next_groups set: every tile returns its moments
            moments.merge(part)
    assert canvas.tensor is not None  # at least one core was put
    return canvas.tensor, moments


def run_stages(
    stages: list[Stage] | Lanes, h: torch.Tensor, cores: list[Tile], res: int, device: torch.device | None = None,
) -> torch.Tensor:
    """Run stages layer by layer over all tiles; `h` lives on the store device at `res` x latent resolution. With
    `Lanes` the tiles of each stage are spread over their devices (`pipelines.vae.lanes`), else all run on `device`."""
    if isinstance(stages, Lanes):
        lanes = stages
    else:
        assert device is not None  # a plain stage list runs on `device`
        lanes = Lanes.one(stages, device)
    skip: torch.Tensor | None = None
    stats = None
    path = lanes.first
    if path[0].norm is not None:
        stats = core_stats(h, cores, res, path[0].norm.num_groups, lanes.device)
    for i, stage in enumerate(path):
        following = path[i + 1].norm if i + 1 < len(path) else None
        groups = following.num_groups if following is not None else None
        out, moments = _run_stage(lanes, i, h, skip, cores, res, stats, groups)
        skip = h if stage.keeps_input else None
        h, res = out, int(res * stage.scale)
        stats = moments.finalize() if moments is not None else None
    return h


def _default_store(device: torch.device, store_device: torch.device | str | None) -> torch.device:
    """Where stage canvases live: as given, else the CPU when computing on an accelerator."""
    if store_device is not None:
        return torch.device(store_device)
    return torch.device("cpu") if device.type != "cpu" else device


def decode_splits(vae: Any, latent_h: int, latent_w: int, batch: int = 1) -> list[Split]:
    """The store-device bytes of a tiled decode at this size for each hand-over between the layer-wise and the
    streamed runner (`pipelines.vae.stream.splits`); the last is the layer-wise run. From the VAE's own stages,
    so it fits any AutoencoderKL (SD's at 4096² in fp16: ~17 GB layer-wise, ~6 GB streaming from 2048² up)."""
    itemsize = vae.dtype.itemsize
    return splits(decoder_stages(vae.decoder), 1, latent_h, latent_w, itemsize, batch=batch)


def _run(lanes: Lanes, h: torch.Tensor, cores: list[Tile], res: int, mode: Mode, host_budget: int | None = None,
         encode: bool = False) -> torch.Tensor:
    """Run a path layer by layer ("exact"), or ("stream") its high-resolution stages tile by tile and the rest
    layer by layer, as many layer by layer as `host_budget` allows for their canvases (None: stream them all)."""
    if mode != "stream":
        return run_stages(lanes, h, cores, res)
    stages = lanes.first
    lat_h, lat_w = h.shape[-2] // res, h.shape[-1] // res
    options = splits(stages, res, lat_h, lat_w, h.element_size(), encode=encode, batch=h.shape[0])
    split = choose(options, host_budget)
    log.debug("streamed VAE %s: %d of %d stages tile by tile, %.2f GB of canvases", "encode" if encode else "decode",
              split.streamed, split.stages, split.host_bytes / 1e9)
    head, tail = lanes.sub(0, split.at), lanes.sub(split.at)
    first, second = (run_streamed, run_stages) if encode else (run_stages, run_streamed)
    if head.first:
        h = first(head, h, cores, res)
        res = int(res * math.prod(stage.scale for stage in head.first))
    return second(tail, h, cores, res) if tail.first else h


def _check_args(x: torch.Tensor, tile_size: int, overlap: int, multiple: int, what: str, mode: str = "exact"
                ) -> None:
    """Validate a 4-D input whose sides are multiples of `multiple`, the tile arguments and the mode."""
    if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValidationError(what, tuple(x.shape), f"must be [B, C, H, W] with H and W multiples of {multiple}")
    plan_tiles(max(x.shape[-2] // multiple, 1), max(x.shape[-1] // multiple, 1), tile_size, overlap)
    if mode not in ("exact", "stream"):
        raise ValidationError("mode", mode, "must be 'exact' (layer by layer) or 'stream' (tile by tile)")


def plain_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Exactly what `vae.decode(latents).sample` computes without diffusers' own tiling or slicing."""
    z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    return vae.decoder(z)


@torch.no_grad()
def decode_cores(
    vae: Any, latents: torch.Tensor, cores: list[Tile], store_device: torch.device | str | None = None,
    mode: Mode = "exact", host_budget: int | None = None, replicas: Dealer | None = None,
) -> torch.Tensor:
    """Decode with the given latent core partition: whole mid-block, up path over the cores (by `mode`; with
    `replicas`, each stage's tiles spread over their devices, `pipelines.vae.lanes`)."""
    dec = vae.decoder
    z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    store = _default_store(latents.device, store_device)
    lanes = Lanes.over(vae, latents.device, lambda v: decoder_stages(v.decoder), replicas)
    # no local name keeps the mid-block output: the layer-wise runner frees it after the first stages
    out = _run(lanes, dec.mid_block(dec.conv_in(z), None).to(store), cores, 1, mode, host_budget)
    return out.to(latents.device)


@torch.no_grad()
def tiled_decode(
    vae: Any, latents: torch.Tensor, tile_size: int = 64, overlap: int = 16,
    *, store_device: torch.device | str | None = None, mode: Mode = "exact", host_budget: int | None = None,
    replicas: Dealer | None = None,
) -> torch.Tensor:
    """`vae.decode(latents).sample` in bounded device memory; tile_size/overlap in latent pixels.

    mode: exact (layer by layer, full-size canvases on the store device) | stream (tile by tile, bounded host
    memory too, several times the compute; `pipelines.vae.stream`): as many low-resolution stages layer by layer
    as `host_budget` bytes of canvases allow, the rest tile by tile (None: every stage tile by tile). All equal
    the full decode up to rounding. `replicas` (VAE replicas on several devices, the first being `vae`'s) spread
    each stage's tiles over the devices: the same pixels as one device.
    """
    _check_args(latents, tile_size, overlap, 1, "latents", mode)
    latents = latents.to(vae.dtype)
    if tile_size >= max(latents.shape[-2:]):
        return plain_decode(vae, latents)
    cores = tile_cores(latents.shape[-2], latents.shape[-1], tile_size, overlap)
    log.debug("tiled VAE decode: %s latent in %d tiles", tuple(latents.shape[-2:]), len(cores))
    return decode_cores(vae, latents, cores, store_device, mode, host_budget, replicas)


def _downscale(vae: Any) -> int:
    """Pixel-to-latent scale factor of the VAE (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def plain_encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Exactly what `vae.encode(images).latent_dist.mode()` computes without diffusers' tiling or slicing."""
    h = vae.encoder(images)
    moments = vae.quant_conv(h) if vae.quant_conv is not None else h
    return moments.chunk(2, dim=1)[0]


@torch.no_grad()
def encode_cores(
    vae: Any, images: torch.Tensor, cores: list[Tile], store_device: torch.device | str | None = None,
    mode: Mode = "exact", host_budget: int | None = None, replicas: Dealer | None = None,
) -> torch.Tensor:
    """Encode with the given latent core partition; returns the latent distribution's mode (its mean). With
    `replicas`, the down path's tiles are spread over their devices like `decode_cores`'."""
    enc, scale = vae.encoder, _downscale(vae)
    store = _default_store(images.device, store_device)
    lanes = Lanes.over(vae, images.device, lambda v: encoder_stages(v.encoder), replicas)
    h = _run(lanes, images.to(store), cores, scale, mode, host_budget, encode=True)
    h = h.to(images.device)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    moments = vae.quant_conv(h) if vae.quant_conv is not None else h
    return moments.chunk(2, dim=1)[0]


@torch.no_grad()
def tiled_encode(
    vae: Any, images: torch.Tensor, tile_size: int = 512, overlap: int = 64,
    *, store_device: torch.device | str | None = None, mode: Mode = "exact", host_budget: int | None = None,
    replicas: Dealer | None = None,
) -> torch.Tensor:
    """`vae.encode(images).latent_dist.mode()` in bounded device memory; tile_size/overlap in pixels (see
    `tiled_decode` for `mode`, `host_budget` and `replicas`; encoding streams the high-resolution head instead)."""
    scale = _downscale(vae)
    _check_args(images, max(tile_size // scale, 1), overlap // scale, scale, "images", mode)
    images = images.to(vae.dtype)
    if tile_size >= max(images.shape[-2:]):
        return plain_encode(vae, images)
    cores = tile_cores(images.shape[-2] // scale, images.shape[-1] // scale, tile_size // scale, overlap // scale)
    return encode_cores(vae, images, cores, store_device, mode, host_budget, replicas)
