"""A txt2img or img2img run: the draft, then with hires on the upscale and the refine, then outputs.

    draft     StageSpec from the request (img2img: the init image encoded); its latents cached by content
              (`pipelines.stage_cache`) when hires is on, so changing only stage-2 settings skips it
    upscale   latent or pixel (`refine.upscale_latents_or_pixels`) to the hires target, planned anew at that size
    refine    img2img at the hires denoise on the same weights, the ControlNet units and the tile ControlNet
              (fed each image's upscaled draft) when asked
    outputs   decode, seam score, infotext, save (`pipelines.outputs`)

`Engine._generate` hands every request without a mask or outpainting to `generate`, as a `pipelines.job.Job`, and
hands the `Outcome` to the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from pipelines.denoise.feature_cache import cache_settings
from pipelines.denoise.loop import ControlInput
from pipelines.denoise.stages import StageSpec
from pipelines.errors import ValidationError
from pipelines.hires.refine import refine_spec, upscale_latents_or_pixels
from pipelines.images import from_pil, to_pil
from pipelines.job import CodecOptions, Job, loop_finished, tile_spec
from pipelines.outputs import Outcome
from pipelines.planner import Plan
from pipelines.prompts.encoding import ti_hashes
from pipelines.request.hires import hires_warning
from pipelines.request.validation import hires_target
from pipelines.stage_cache import stage1_key


@dataclass(frozen=True)
class Stage2:
    """What the hires stage made: its plan and VAE settings, and the refined latents or the finished pixels."""

    plan: Plan
    codec: CodecOptions
    latents: torch.Tensor | None
    """The refined latents; None when `images` are the result."""
    images: list[Image.Image] | None
    """The upscaled drafts when there was nothing to refine (denoise 0)."""
    note: str | None = None
    """Why the tile ControlNet was left out, for the result's warnings."""


def generate(job: Job) -> Outcome:
    """Run `job` (no mask, no outpainting): its final latents (or pixels) and how they were made."""
    model, req = job.model, job.req
    plan = job.plan()
    codec = CodecOptions.for_plan(plan, job.low_memory, model.device, job.executor)
    spec = draft_spec(job, plan)
    if req.init_image is not None:
        pixels = from_pil(req.init_image, req.width, req.height, model.device, model.dtype)
        spec.init_latents = codec.encode(model, pixels)
    drafted = draft(job, spec)
    latents: torch.Tensor | None = drafted
    images, warnings = None, []
    if req.hires.enabled:
        stage2 = refine(job, spec, drafted)
        plan, codec, latents, images = stage2.plan, stage2.codec, stage2.latents, stage2.images
        warnings = [stage2.note] if stage2.note else []
    loop_finished(job.cancel)  # from here on the images are finished work: a cancel no longer discards them
    extra = ti_hashes(model.tokenizers[0], req, spec.embeddings)
    if (w := hires_warning(req)) is not None:
        warnings.append(w)
    return Outcome(job, plan, codec, latents=latents, images=images, extra=extra, warnings=warnings)


def draft_spec(job: Job, plan: Plan) -> StageSpec:
    """Stage 1 of the request at its own size: prompts, sampling, the plan's tiles, ControlNet units, regions."""
    req = job.req
    return StageSpec(
        prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
        steps=req.steps, sampler=req.sampler, cfg=req.cfg, seeds=job.seeds, emphasis=req.emphasis,
        clip_skip=req.clip_skip, strength=req.strength, tiles=tile_spec(plan, req.tiling, job.low_memory),
        control=job.control(req, req.width, req.height),
        prompt_timeline=req.prompt_timeline, embeddings=job.embeddings,
        feature_cache=cache_settings(req),
        regions=req.regions, region_base=req.region_base, region_canvas=(req.width, req.height),
    )


def draft(job: Job, spec: StageSpec) -> torch.Tensor:
    """Stage-1 latents, from the stage-1 cache when only stage-2 settings changed (hires on, the model's
    own UNet)."""
    req, model = job.req, job.model
    key = None
    if req.hires.enabled and job.unet is None:
        emb = spec.embeddings.identity(spec.embeddings.files) if spec.embeddings is not None else ()
        key = stage1_key(req, model, job.seeds, emb)
    return job.stage1_cache.latents(key, lambda: job.run_stage(spec), model.device)


def refine(job: Job, spec: StageSpec, latents: torch.Tensor) -> Stage2:
    """The hires stage: plan at the target size, upscale the draft, refine it (unless there is nothing to refine)."""
    model, req = job.model, job.req
    tw, th = hires_target(req.width, req.height, req.hires.scale)
    plan = job.plan(width=tw, height=th)
    codec = CodecOptions.for_plan(plan, job.low_memory, model.device, job.executor)
    up = upscale_latents_or_pixels(model, latents, req, models_dir=job.manager.models_dir, codec=codec,
                                   cache=job.manager.caches.upscalers)
    if not up.refine:
        return Stage2(plan, codec, None, up.pixels)
    assert up.latents is not None  # an upscale to refine has its latents
    control = job.control(req, tw, th)
    tile_unit, note = tile_control(job, latents, up.pixels, codec)
    spec2 = refine_spec(req, spec, up.latents, tiles=tile_spec(plan, req.tiling, job.low_memory),
                        control=(*control, *tile_unit))
    return Stage2(plan, codec, job.run_stage(spec2), None, note)


def tile_control(job: Job, latents: torch.Tensor, big: list[Image.Image] | None,
                 codec: CodecOptions) -> tuple[tuple, str | None]:
    """A tile ControlNet unit for the refine, fed each image's upscaled draft; ((), why) if unavailable."""
    model, req = job.model, job.req
    if not req.hires.control_tile:
        return (), None
    from pipelines.control.models import load_controlnet
    from pipelines.control.units import tile_model_name
    from pipelines.errors import ModelError

    models_dir = job.manager.models_dir
    try:
        name, allow = tile_model_name(model, models_dir)
        cn = load_controlnet(name, device=model.device, dtype=model.dtype, models_dir=models_dir, allow_paths=allow,
                             cache=job.manager.caches.controlnets)
    except (ModelError, ValidationError) as exc:
        return (), f"no tile ControlNet available ({exc}); the refine ran without it"
    width, height = hires_target(req.width, req.height, req.hires.scale)
    if big is None:  # latent upscaler: the draft's pixels, resized
        drafts = to_pil(codec.decode(model, latents))
        big = [d.resize((width, height), Image.Resampling.LANCZOS) for d in drafts]
    maps = torch.cat([from_pil(b, width, height, model.device, model.dtype) for b in big])
    return (ControlInput(cn, (maps + 1) / 2, req.hires.control_tile),), None
