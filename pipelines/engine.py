"""Request -> result: validation, the GPU lock, the out-of-memory retry and the entry points.

The work itself lives with its job: a txt2img/img2img run and its two stages in `pipelines.hires.flow`, inpainting
in `pipelines.edit.run`, decoding and saving in `pipelines.outputs`, each stage's settings in `pipelines.job`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.denoise.executor import SERIAL, TileExecutor
from pipelines.denoise.loop import StepInfo
from pipelines.denoise.schedulers import check_sampler
from pipelines.denoise.stages import PromptCache
from pipelines.edit.inpaint import check_mask
from pipelines.edit.run import run_inpaint
from pipelines.errors import OutOfMemoryError, ValidationError
from pipelines.hires.flow import generate
from pipelines.job import Job, loop_finished
from pipelines.lru import LRUCache
from pipelines.models.manager import LoadedModel, ModelManager
from pipelines.models.upscalers import concrete_upscaler, resolve_upscaler
from pipelines.outputs import GenerationResult, Outcome, Saved, finish
from pipelines.planner import Plan
from pipelines.process import prepare_process
from pipelines.prompts.embeddings import EmbeddingLibrary
from pipelines.request.hires import is_latent
from pipelines.request.limits import Limits
from pipelines.request.schema import DEFAULT_MODEL, GenerationRequest, UpscaleRequest
from pipelines.request.validation import is_checked, mark_checked, resolve_seed, validate, validate_upscale
from pipelines.request_plan import plan_request
from pipelines.stage_cache import Stage1Cache
from pipelines.upscale_job import check_upscaler, refine_request, upscale_pixels, upscaled_result

log = logging.getLogger(__name__)

Callback = Callable[[StepInfo], None]



def _check_control_names(unit, i: int, models_dir: Path) -> None:
    """A unit's preprocessor and ControlNet names, refused before any model loads (no paths outside models/)."""
    from pipelines.control.models import resolve_controlnet
    from pipelines.control.preprocessors import PREPROCESSORS
    from pipelines.control.units import TINY_CONTROLNET

    if unit.type not in PREPROCESSORS:
        raise ValidationError(f"control[{i}].type", unit.type, f"must be one of {', '.join(PREPROCESSORS)}")
    if unit.model is not None and unit.model != TINY_CONTROLNET:
        resolve_controlnet(unit.model, models_dir)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Engine:
    """Owns the GPU lock, the prompt and stage-1 caches, and the outputs folder."""

    def __init__(self, manager: ModelManager, outputs_dir: Path | str | None = "outputs", *,
                 limits: Limits | None = None, allow_paths: bool = False):
        prepare_process()  # the libraries' lazy classes imported, the heap tuned (`pipelines.process`)
        self.manager = manager
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None
        self.limits = limits or Limits()
        self.allow_paths = allow_paths  # only the CLI may name model files by path
        self.default_model = DEFAULT_MODEL
        self.gpu_lock = threading.Lock()
        self.prompt_cache: LRUCache = PromptCache()  # or a SharedPromptCache (pipelines.serving.workers)
        self.embeddings = EmbeddingLibrary(self.manager.models_dir / "embeddings")  # textual inversions
        self.stage1_cache = Stage1Cache(2)  # stage-1 latents (on CPU) of the last two two-stage requests
        self._saved: list[Saved] = []  # the images this run saved so far: a retry keeps them

    @property
    def stage1_runs(self) -> int:
        """Stage-1 runs so far (a cached draft is not run again)."""
        return self.stage1_cache.runs

    # ---------------------------------------------------------------- checks
    def check(self, req: GenerationRequest) -> GenerationRequest:
        """Validate a request completely without loading anything: its fields (`validate`, once), then what needs
        pixels or the model files (the mask against the image, the upscaler kind, names of sampler/model/upscaler).
        A request this check returned is returned as it is: each request is validated once on its way from the UI,
        the API or the CLI to the loop, whichever layers it passes."""
        under = (self.limits, self.allow_paths, str(self.manager.models_dir))
        if is_checked(req, under):
            return req
        req = validate(req, self.limits)
        if req.mask is not None:
            check_mask(req.mask, req.init_image, req.inpaint.soft_inpainting)
        if (req.mask is not None or any(req.inpaint.outpaint)) and req.hires.enabled and is_latent(req.hires.upscaler):
            raise ValidationError("hires_upscaler", req.hires.upscaler, "must be a pixel upscaler (lanczos or a "
                                                                        "model file) when inpainting")
        req = replace(req, sampler=check_sampler(req.sampler))
        if req.hires.sampler is not None:
            req = replace(req, hires=replace(req.hires, sampler=check_sampler(req.hires.sampler, "hires_sampler")))
        self.manager.resolve(req.model, allow_paths=self.allow_paths)
        if req.hires.enabled:
            resolve_upscaler(req.hires.upscaler, self.manager.models_dir)
            upscaler = concrete_upscaler(req.hires.upscaler, self.manager.models_dir, req.hires.scale)
            req = replace(req, hires=replace(req.hires, upscaler=upscaler))
        for i, unit in enumerate(req.control):
            _check_control_names(unit, i, self.manager.models_dir)
        return mark_checked(req, under)

    def plan(self, req: GenerationRequest, model: LoadedModel | None = None, *, width: int | None = None,
             height: int | None = None) -> Plan:
        """The planner's tiling decision and memory estimate for this request (stage-2 size when given)."""
        return plan_request(self.manager, req, model, width=width, height=height, allow_paths=self.allow_paths)

    # ---------------------------------------------------------------- public entry points
    def generate(self, req: GenerationRequest, *, callback: Callback | None = None, cancel=None,
                 save: bool = True, unet=None, executor: TileExecutor = SERIAL) -> GenerationResult:
        """Generate (txt2img, img2img, two-stage), save each image as soon as it is decoded, return the result."""
        req = self.check(req)
        req = replace(req, seed=resolve_seed(req.seed))
        attempt = partial(self._generate, req, callback=callback, cancel=cancel, save=save, unet=unet,
                          executor=executor)
        with self.gpu_lock:  # released on success, error and cancel alike
            try:
                return self._with_fallback(attempt)
            except BaseException:
                # a stopped or failed run hands its cached GPU blocks back (a full gc per run would cost ~0.2 s)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise

    def _with_fallback(self, attempt: Callable[..., GenerationResult]) -> GenerationResult:
        """`attempt()`, and on out of memory `attempt(low_memory=True)` once (the images saved so far kept)."""
        self._saved = []  # saved so far in this run; a retry never saves them twice
        try:
            return attempt(low_memory=False)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            log.warning("out of memory (%s); retrying with tiling, tile batch 1 and tiled VAE", exc)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            result = attempt(low_memory=True)
        except Exception as exc:
            if _is_oom(exc):
                raise OutOfMemoryError(
                    "out of memory even with tiling, tile batch 1 and tiled VAE: lower width/height, "
                    "batch_size or hires_scale, or set tile_size smaller") from exc
            raise
        result.warnings.append("ran out of memory; retried with tiling, tile batch 1 and tiled VAE")
        return result

    # ---------------------------------------------------------------- internals
    def _generate(self, req: GenerationRequest, *, callback, cancel, save: bool, unet, executor, low_memory: bool
                  ) -> GenerationResult:
        """One attempt: load the model, then the run for the request's kind (inpainting, or txt2img/img2img with
        an optional hires stage)."""
        started = time.perf_counter()
        model = self.manager.get(req.model, loras=req.loras, allow_paths=self.allow_paths)
        job = Job(model, req, [req.seed + i for i in range(req.batch_size)], manager=self.manager,
                  prompt_cache=self.prompt_cache, stage1_cache=self.stage1_cache,
                  embeddings=self.embeddings.snapshot(), planner=self.plan, callback=callback,
                  cancel=cancel, unet=unet, executor=executor, low_memory=low_memory, save=save, started=started)
        # a mask or outpainting: prepared, run and pasted back by `pipelines.edit.run`; else the two-stage flow
        outcome = run_inpaint(job) if req.inpainting else generate(job)
        result = self._finish(outcome)
        result.warnings.extend(outcome.warnings)
        result.stats["seconds"] = round(time.perf_counter() - started, 3)
        result.stats["plan"] = outcome.plan.describe() + outcome.plan_note
        return result

    def _finish(self, outcome: Outcome) -> GenerationResult:
        """Decode, score, describe and save the run's images (`pipelines.outputs.finish`); this run's earlier
        attempts' saved images are kept."""
        return finish(outcome, self._saved, self.outputs_dir)

    def upscale(self, image: Image.Image | UpscaleRequest, *, callback: Callback | None = None, cancel=None,
                save: bool = True, **fields: Any) -> GenerationResult:
        """Upscale an image with a pixel upscaler, then (denoise > 0) refine it with img2img (`pipelines.upscale_job`).

        `image` is an `UpscaleRequest`, or an image with the request's fields as keywords (upscaler=, scale=, ...)."""
        req = image if isinstance(image, UpscaleRequest) else UpscaleRequest(image=image, **fields)
        req = validate_upscale(req, self.limits)
        upscaler = check_upscaler(req, self.manager.models_dir)
        if not req.denoise:
            loop_finished(cancel)  # no denoising loop: the upscale is not interrupted, so it is delivered
        device, dtype = self.manager.device_dtype
        with self.gpu_lock:
            big = upscale_pixels(req, upscaler, self.manager.models_dir, device, dtype, self.manager.caches.upscalers)
        if req.denoise:
            return self.generate(refine_request(req, big, self.default_model), callback=callback, cancel=cancel,
                                 save=save)
        return upscaled_result(req, big, upscaler, self.outputs_dir, save)

    # ---------------------------------------------------------------- small services for the UI
    def count_tokens(self, model_name: str, text: str) -> str:
        """"83/150 tokens, 2 chunks" for the UI's token counter (loads only the tokenizer, never weights)."""
        from pipelines.prompts.encoding import count_tokens_with

        tokenizer = self.manager.tokenizer(model_name)
        counts = self.embeddings.counts()
        return "" if tokenizer is None else str(count_tokens_with(tokenizer, text, embeddings=counts))
