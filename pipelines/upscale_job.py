"""The upscale job: an `UpscaleRequest` -> a pixel upscaler, then (denoise > 0) an img2img refine by the engine.

`Engine.upscale` delegates here; the engine keeps the GPU lock, the fallbacks and `generate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.errors import ValidationError
from pipelines.metadata import upscale_infotext
from pipelines.request.schema import GenerationRequest, UpscaleRequest
from pipelines.request.validation import upscale_target, validate_upscale
from pipelines.saving import save_png

if TYPE_CHECKING:
    from pipelines.engine import Callback, Engine
    from pipelines.outputs import GenerationResult


def run_upscale(engine: Engine, req: UpscaleRequest, *, callback: Callback | None = None, cancel: Any = None,
                save: bool = True) -> GenerationResult:
    """Upscale `req.image` with a pixel upscaler, then (denoise > 0) refine it with `engine.generate`."""
    from pipelines.job import loop_finished
    from pipelines.models.upscalers import concrete_upscaler, is_latent, resolve_upscaler, upscale_image
    from pipelines.outputs import GenerationResult

    req = validate_upscale(req, engine.limits)
    models_dir = engine.manager.models_dir
    if is_latent(req.upscaler):
        raise ValidationError("upscaler", req.upscaler, "must be a pixel upscaler (lanczos or a model file) for images")
    resolve_upscaler(req.upscaler, models_dir)
    upscaler = concrete_upscaler(req.upscaler, models_dir, req.scale)
    tw, th = upscale_target(req.image.width, req.image.height, req.scale)
    device, dtype = engine.manager.device_dtype
    if not req.denoise:
        loop_finished(cancel)  # no denoising loop: the upscale is not interrupted, so it is delivered
    with engine.gpu_lock:
        big = upscale_image(req.image.convert("RGB"), upscaler, size=(tw, th), models_dir=models_dir, device=device,
                            dtype=dtype, cache=engine.manager.caches.upscalers)
    if req.denoise:
        refine = GenerationRequest(prompt=req.prompt, negative_prompt=req.negative_prompt,
                                   model=req.model or engine.default_model, width=tw, height=th, steps=req.steps,
                                   cfg=req.cfg, sampler=req.sampler, seed=req.seed, init_image=big,
                                   strength=req.denoise)
        return engine.generate(refine, callback=callback, cancel=cancel, save=save)
    text = upscale_infotext(req, (tw, th), upscaler)
    result = GenerationResult(GenerationRequest(width=tw, height=th, prompt=req.prompt), [big], [0], [text])
    if save and engine.outputs_dir is not None:
        result.paths.append(save_png(big, text, engine.outputs_dir, 0))
    return result
