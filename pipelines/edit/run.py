"""An inpainting or outpainting run on the engine: prepare the pixels and masks, run one stage, paste back.

    image, mask --(resize to width x height, invert, outpaint pre-fill, blur, masked content)--> work image
    whole picture: encode the work image, run the stage with its LatentMask, decode
    only masked:   crop the mask's box + padding (A1111's geometry), scale it to the processing size, run, scale back
    paste-back:    original * (1 - blurred mask) + result * blurred mask, exact where the blurred mask is 0

`Engine._generate` hands every request with a mask or an outpaint side to `run_inpaint`, as a `pipelines.job.Job`,
and hands the `Outcome` to the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageChops

from pipelines.denoise.feature_cache import cache_settings
from pipelines.denoise.loop import LoopStats
from pipelines.denoise.stages import StageSpec
from pipelines.edit.inpaint import (
    LatentMask,
    composite,
    crop_region,
    expand_crop_region,
    fill,
    is_inpainting_unet,
    latent_mask,
    outpaint,
    prepare_mask,
    processing_size,
)
from pipelines.images import from_pil, to_pil
from pipelines.job import CodecOptions, Job, tile_spec
from pipelines.outputs import Outcome
from pipelines.request.schema import GenerationRequest
from pipelines.tiling import plan_tiles


@dataclass
class InpaintWork:
    """The pixels of one inpainting run, at the output size, and where it is processed."""

    original: Image.Image  # what the paste-back keeps (outpaint: with the pre-filled new area)
    start: Image.Image  # what is encoded (masked content "fill" applied)
    repaint: Image.Image  # the blurred mask the latents are repainted under (255 = repaint)
    paste: Image.Image  # the blurred mask of the paste-back
    box: tuple[int, int, int, int] | None = None  # only masked: the crop in output pixels
    size: tuple[int, int] = (0, 0)  # processing (width, height)


def prepare_work(req: GenerationRequest, native: int) -> InpaintWork:
    """Resize, invert, outpaint, blur and fill as A1111 does; pick the crop and processing size."""
    c = req.inpaint
    size = (req.width, req.height)
    image = req.init_image.convert("RGB")
    image = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    mask = None
    if req.mask is not None:
        mask = req.mask.convert("L")
        mask = mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)
        if c.mask_mode == "inpaint not masked":
            mask = Image.eval(mask, lambda v: 255 - v)
    limit = None
    if any(c.outpaint):
        image, mask, limit = outpaint(image, mask, c.outpaint, seed=req.seed)
    assert mask is not None  # a mask or an outpaint side (which makes one): the only requests sent here
    repaint = prepare_mask(mask, blur=c.mask_blur, invert=False, soft=c.soft_inpainting)
    paste = repaint if limit is None else ImageChops.multiply(repaint, limit)
    start = fill(image, repaint) if c.masked_content == "fill" else image
    work = InpaintWork(original=image, start=start, repaint=repaint, paste=paste, size=image.size)
    if c.inpaint_area == "only masked":
        box = crop_region(repaint, c.inpaint_padding)
        if box is not None:
            pw, ph = processing_size(box, c.inpaint_size or native)
            work.box = expand_crop_region(box, pw, ph, image.width, image.height)
            work.size = (pw, ph)
    return work


def _crop(image: Image.Image, work: InpaintWork, resample: int) -> Image.Image:
    """The processed part of `image` (already at the output size) at the processing size."""
    if work.box is not None:
        image = image.crop(work.box)
    return image if image.size == work.size else image.resize(work.size, resample)


def _latent_mask(job: Job, work: InpaintWork, codec: CodecOptions) -> LatentMask:
    """The processing-size mask in latent space; the masked image's latents for a 9-channel UNet."""
    model, req, unet = job.model, job.req, job.unet
    mask = _crop(work.repaint, work, Image.Resampling.BILINEAR)
    masked = None
    if is_inpainting_unet(unet if unet is not None and hasattr(unet, "config") else model.unet):
        keep = torch.from_numpy(np.asarray(mask, dtype=np.float32) < 127.5)  # diffusers: image * (mask < 0.5)
        pixels = from_pil(_crop(work.start, work, Image.Resampling.LANCZOS), *work.size, model.device, model.dtype)
        masked = codec.encode(model, pixels * keep.to(pixels.device, pixels.dtype))
    return LatentMask(latent_mask(mask, model.vae_scale, req.inpaint.soft_inpainting), masked,
                      content=req.inpaint.masked_content, soft=req.inpaint.soft_inpainting,
                      seeds=[req.seed + i for i in range(req.batch_size)])


def _control(req: GenerationRequest, work: InpaintWork) -> GenerationRequest:
    """ControlNet images cropped like the image for only masked (each first resized to the output size)."""
    if work.box is None or not req.control:
        return req
    full = work.original.size
    units = tuple(replace(u, image=u.image.convert("RGB").resize(full, Image.Resampling.LANCZOS).crop(work.box))
                  for u in req.control)
    return replace(req, control=units)


def _paste(work: InpaintWork, generated: Image.Image) -> Image.Image:
    """Scale an only-masked result back into its box, then the feathered paste-back over the original."""
    if work.box is not None:
        x1, y1, x2, y2 = work.box
        canvas = work.original.copy()
        canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        generated = canvas
    return composite(work.original, generated, work.paste)


def tiles_note(plan, stats: LoopStats) -> str:
    """"; inpainting runs 4 of 25 tiles" for a tiled run (the tiles with a masked latent pixel, last step)."""
    if not plan.tiled:
        return ""
    total = len(plan_tiles(plan.height // 8, plan.width // 8, plan.tile_size, plan.overlap))
    return f"; inpainting runs {stats.tiles_per_step} of {total} tiles"


def _inpaint_pass(job: Job) -> tuple[list[Image.Image], Any, CodecOptions, InpaintWork]:
    """One prepared, run and pasted inpainting stage of `job.req`: (images, plan, VAE settings, the work it did)."""
    model, req = job.model, job.req
    work = prepare_work(req, model.native_size)
    pw, ph = work.size
    plan = job.plan(width=pw, height=ph)
    codec = CodecOptions.for_plan(plan, job.low_memory, model.device, job.executor)
    pixels = from_pil(_crop(work.start, work, Image.Resampling.LANCZOS), pw, ph, model.device, model.dtype)
    spec = StageSpec(
        prompt=req.prompt, negative_prompt=req.negative_prompt, width=pw, height=ph, steps=req.steps,
        sampler=req.sampler, cfg=req.cfg, seeds=job.seeds, emphasis=req.emphasis, clip_skip=req.clip_skip,
        init_latents=codec.encode(model, pixels), strength=req.strength,
        tiles=tile_spec(plan, req.tiling, job.low_memory),
        control=job.control(_control(req, work), pw, ph),
        inpaint=_latent_mask(job, work, codec),
        prompt_timeline=req.prompt_timeline, embeddings=job.embeddings,
        feature_cache=cache_settings(req), regions=req.regions, region_base=req.region_base,
        region_canvas=(req.width, req.height),
    )
    latents = job.run_stage(spec)
    images = []
    for i in range(len(job.seeds)):
        decoded = codec.decode(model, latents[i:i + 1], mode=req.vae_decode, report=job.report)
        images.append(_paste(work, to_pil(decoded)[0]))
    return images, plan, codec, work


def hires_request(req: GenerationRequest, image: Image.Image, work: InpaintWork) -> GenerationRequest:
    """The refine of an inpainted image: its pixels upscaled (`image`), the same mask scaled with them (already
    inverted and outpainted), the hires settings as the stage's own, no second hires or outpaint."""
    from pipelines.request.hires import hires_denoise
    from pipelines.request.schema import HiresConfig
    from pipelines.request.validation import hires_target

    h = req.hires
    tw, th = hires_target(*work.original.size, h.scale)
    mask = work.repaint.resize((tw, th), Image.Resampling.BILINEAR)
    config = replace(req.inpaint, mask_mode="inpaint masked", outpaint_left=0, outpaint_right=0, outpaint_top=0,
                     outpaint_bottom=0)
    return replace(req, init_image=image, mask=mask, width=tw, height=th, strength=hires_denoise(req),
                   steps=h.steps or req.steps, sampler=h.sampler or req.sampler,
                   prompt=req.prompt if h.prompt is None else h.prompt,
                   negative_prompt=req.negative_prompt if h.negative_prompt is None else h.negative_prompt,
                   cfg=h.cfg or req.cfg, hires=HiresConfig(), inpaint=config)


def _hires(job: Job, images: list[Image.Image], work: InpaintWork
           ) -> tuple[list[Image.Image], Any, CodecOptions]:
    """Upscale each inpainted image with the hires upscaler, then inpaint it again under the scaled mask."""
    from pipelines.models.upscalers import upscale_image
    from pipelines.request.validation import hires_target

    req, model = job.req, job.model
    size = hires_target(*work.original.size, req.hires.scale)
    out, plan, codec = [], None, CodecOptions()
    for image, seed in zip(images, job.seeds, strict=True):
        big = upscale_image(image, req.hires.upscaler, size=size, models_dir=job.manager.models_dir,
                            device=model.device, dtype=model.dtype, cache=job.manager.caches.upscalers)
        sub = replace(hires_request(req, big, work), seed=seed, batch_size=1)
        done, plan, codec, _ = _inpaint_pass(replace(job, req=sub, seeds=[seed]))
        out += done
    return out, plan, codec


def run_inpaint(job: Job) -> Outcome:
    """Inpaint/outpaint `job.req` on its loaded model (then the hires refine under the same mask, when on): the
    pasted-back images and how they were made."""
    images, plan, codec, work = _inpaint_pass(job)
    if job.req.hires.enabled:
        images, plan, codec = _hires(job, images, work)
    size = work.size if work.box is not None else None  # only masked: A1111's Size is the processing size
    return Outcome(job, plan, codec, images=images, size=size, plan_note=tiles_note(plan, job.stats))
