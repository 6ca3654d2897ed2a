"""The upscale job's parts: an `UpscaleRequest` -> a pixel upscaler to its target size, then (denoise > 0) the
img2img request that refines it, else the upscaled image as the result.

`Engine.upscale` runs them in order under its GPU lock; the refine is an ordinary `Engine.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.errors import ValidationError
from pipelines.metadata import upscale_infotext
from pipelines.models.upscalers import concrete_upscaler, resolve_upscaler, upscale_image
from pipelines.outputs import GenerationResult
from pipelines.request.hires import is_latent
from pipelines.request.schema import GenerationRequest, UpscaleRequest
from pipelines.request.validation import upscale_target
from pipelines.saving import save_png


def check_upscaler(req: UpscaleRequest, models_dir: Path) -> str:
    """The request's upscaler as a concrete name (a model file for `auto`); latent upscalers are refused."""
    if is_latent(req.upscaler):
        raise ValidationError("upscaler", req.upscaler, "must be a pixel upscaler (lanczos or a model file) for images")
    resolve_upscaler(req.upscaler, models_dir)
    return concrete_upscaler(req.upscaler, models_dir, req.scale)


def upscale_pixels(req: UpscaleRequest, upscaler: str, models_dir: Path, device: Any, dtype: Any,
                   cache: Any = None) -> Image.Image:
    """`req.image` upscaled with `upscaler` to the request's target size."""
    size = upscale_target(req.image.width, req.image.height, req.scale)
    return upscale_image(req.image.convert("RGB"), upscaler, size=size, models_dir=models_dir, device=device,
                         dtype=dtype, cache=cache)


def refine_request(req: UpscaleRequest, big: Image.Image, default_model: str) -> GenerationRequest:
    """The img2img refine of the upscaled image at the request's denoise."""
    return GenerationRequest(prompt=req.prompt, negative_prompt=req.negative_prompt,
                             model=req.model or default_model, width=big.width, height=big.height, steps=req.steps,
                             cfg=req.cfg, sampler=req.sampler, seed=req.seed, init_image=big, strength=req.denoise)


def upscaled_result(req: UpscaleRequest, big: Image.Image, upscaler: str, outputs_dir: Path | None,
                    save: bool) -> GenerationResult:
    """The upscaled image as the job's result (denoise 0), with its infotext, saved when asked."""
    text = upscale_infotext(req, big.size, upscaler)
    result = GenerationResult(GenerationRequest(width=big.width, height=big.height, prompt=req.prompt), [big], [0],
                              [text])
    if save and outputs_dir is not None:
        result.paths.append(save_png(big, text, outputs_dir, 0))
    return result
