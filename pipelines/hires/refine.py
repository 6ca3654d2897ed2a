"""The refine stage of a two-stage run: its strength, its input (the draft upscaled in latent or pixel space) and
its StageSpec (stage 1's, with the hires settings over it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from PIL import Image

from pipelines.denoise.stages import StageSpec
from pipelines.images import from_pil, to_pil
from pipelines.job import CodecOptions
from pipelines.models.upscalers import upscale_image, upscale_latents
from pipelines.request.hires import hires_denoise, is_latent
from pipelines.request.schema import GenerationRequest
from pipelines.request.validation import hires_target

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Upscaled:
    """Stage 2's input: the draft upscaled to the target size."""

    latents: torch.Tensor | None
    """The refine's init latents; None when `refine` is False."""
    pixels: list[Image.Image] | None
    """The pixel upscaler's images; None for a latent upscaler."""
    refine: bool
    """False when there is nothing to refine (a pixel upscaler at denoise 0): `pixels` are the result."""


def upscale_latents_or_pixels(model, latents: torch.Tensor, req: GenerationRequest, *, models_dir,
                              codec: CodecOptions, cache=None) -> Upscaled:
    """Stage-2 input: the latents upscaled, or the decoded drafts upscaled in pixels and encoded again; `cache`
    (the manager's `caches.upscalers`) keeps the upscaler model."""
    tw, th = hires_target(req.width, req.height, req.hires.scale)
    if is_latent(req.hires.upscaler):
        size = (th // model.vae_scale, tw // model.vae_scale)
        return Upscaled(upscale_latents(latents.float(), size, req.hires.upscaler).to(latents.dtype), None, True)
    drafts = to_pil(codec.decode(model, latents))
    big = [upscale_image(im, req.hires.upscaler, size=(tw, th), models_dir=models_dir, device=model.device,
                         dtype=model.dtype, cache=cache) for im in drafts]
    if hires_denoise(req) == 0:
        return Upscaled(None, big, False)  # nothing to refine: the pixels are the result (no VAE round trip)
    pixels = torch.cat([from_pil(im, tw, th, model.device, model.dtype) for im in big])
    return Upscaled(codec.encode(model, pixels), big, True)


def refine_spec(req: GenerationRequest, stage1: StageSpec, init_latents: torch.Tensor, **overrides) -> StageSpec:
    """The refine pass: its own steps/sampler/prompt/cfg when given, else stage 1's; strength = hires denoise.

    Its prompts are scheduled in A1111's hires form (`first_pass_steps` = stage 1's steps): with the default
    timeline `[a:b:1.5]` switches half-way through the refine's steps (`pipelines.prompts.parser.prompts_per_step`)."""
    h = req.hires
    tw, th = hires_target(req.width, req.height, h.scale)
    return replace(
        stage1, width=tw, height=th, init_latents=init_latents, strength=hires_denoise(req),
        steps=h.steps or stage1.steps, sampler=h.sampler or stage1.sampler,
        prompt=stage1.prompt if h.prompt is None else h.prompt,
        negative_prompt=stage1.negative_prompt if h.negative_prompt is None else h.negative_prompt,
        cfg=h.cfg or stage1.cfg, first_pass_steps=stage1.steps, **overrides,
    )
