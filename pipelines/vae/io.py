"""Latents <-> pixels: full, tiled and TAESD decodes, the fp16 NaN guard, encodes, cheap previews."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from pipelines.images import to_pil
from pipelines.vae.lanes import Dealer
from pipelines.vae.tiling import Mode, tiled_decode, tiled_encode

log = logging.getLogger(__name__)

# Linear latent -> RGB approximation for SD 1.x/2.x latents (no model needed), used when TAESD is absent.
_APPROX_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                            [-0.184, -0.271, -0.473]])


@dataclass
class DecodeReport:
    """How a decode went: which path ran and any fallback taken."""

    notes: list[str] = field(default_factory=list)


def _vae_factor(vae) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def _decode_once(vae, z: torch.Tensor, tiled: bool, tile: int, overlap: int, tile_mode: Mode,
                 host_budget: int | None, replicas: Dealer | None = None) -> torch.Tensor:
    if tiled:
        return tiled_decode(vae, z, tile_size=tile, overlap=overlap, mode=tile_mode, host_budget=host_budget,
                            replicas=replicas)
    return vae.decode(z, return_dict=False)[0]


@torch.no_grad()
def decode(model, latents: torch.Tensor, *, mode: str = "full", tiled: bool = False, tile: int = 64,
           overlap: int = 16, tile_mode: Mode = "exact", host_budget: int | None = None,
           report: DecodeReport | None = None, replicas: Dealer | None = None) -> torch.Tensor:
    """Diffusion latents -> [-1,1] images. mode: full | taesd; tile_mode: exact | stream, host_budget: bytes of
    canvases a streamed decode may keep layer by layer (`pipelines.vae.tiling.tiled_decode`); `replicas`: a tiled
    decode's tiles spread over these VAE replicas' devices (the same pixels). One image at a time."""
    report = report if report is not None else DecodeReport()
    if mode == "taesd" and model.taesd is not None:
        return torch.cat([model.taesd.decode(x[None].to(model.taesd.dtype), return_dict=False)[0] for x in latents])
    if mode == "taesd":
        report.notes.append("TAESD unavailable: full VAE decode")
    vae = model.vae
    scale, shift = _vae_factor(vae)
    outs = []
    for x in latents:
        z = (x[None] / scale + shift).to(vae.dtype)
        img = _decode_once(vae, z, tiled, tile, overlap, tile_mode, host_budget, replicas)
        if not torch.isfinite(img).all() and vae.dtype != torch.float32:
            # fp16 VAEs (SDXL's especially) overflow to NaN/inf; decode again in fp32 (on this device) and say so.
            log.warning("VAE decode produced NaN/inf in %s; decoding again in fp32", vae.dtype)
            report.notes.append("fp32 VAE fallback")
            img = _fp32_decode(vae, z, tiled, tile, overlap, tile_mode, host_budget)
        outs.append(img.float())
    return torch.cat(outs)


def _fp32_decode(vae, z, tiled, tile, overlap, tile_mode, host_budget):
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        return _decode_once(vae, z.float(), tiled, tile, overlap, tile_mode, host_budget)
    finally:
        vae.to(dtype)


@torch.no_grad()
def encode(model, images: torch.Tensor, *, tiled: bool = False, tile_px: int = 512, overlap_px: int = 64,
           tile_mode: Mode = "exact", host_budget: int | None = None, replicas: Dealer | None = None) -> torch.Tensor:
    """[-1,1] images -> diffusion latents (distribution mode, scaled), one image at a time; `replicas` as in
    `decode`."""
    vae = model.vae
    scale, shift = _vae_factor(vae)
    outs = []
    for x in images:
        x = x[None].to(vae.dtype)
        if tiled:
            z = tiled_encode(vae, x, tile_size=tile_px, overlap=overlap_px, mode=tile_mode, host_budget=host_budget,
                             replicas=replicas)
        else:
            z = vae.encode(x).latent_dist.mode()
        outs.append((z - shift) * scale)
    return torch.cat(outs)


@torch.no_grad()
def preview(model, denoised: torch.Tensor) -> Image.Image:
    """A quick RGB preview of the predicted x0 of the first image: TAESD when present, else a linear map."""
    x = denoised[:1]
    if model.taesd is not None:
        return to_pil(model.taesd.decode(x.to(model.taesd.dtype), return_dict=False)[0])[0]
    rgb = torch.einsum("bchw,cr->brhw", x.float().cpu(), _APPROX_RGB)
    img = to_pil(rgb.clamp(-1, 1))[0]
    return img.resize((img.width * 8, img.height * 8), Image.Resampling.NEAREST)
