"""Request -> result: validation, the GPU lock, OOM/NaN fallbacks, two-stage runs, saving with metadata."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.denoise.feature_cache import cache_settings
from pipelines.denoise.loop import ControlInput, LoopStats, StepInfo, TileSpec
from pipelines.denoise.schedulers import check_sampler
from pipelines.denoise.stages import PromptCache, StageSpec, run_stage
from pipelines.errors import OutOfMemoryError, ValidationError
from pipelines.heap import tune_heap
from pipelines.hires import hires_denoise, hires_warning, refine_spec, upscale_latents_or_pixels
from pipelines.lru import LRUCache
from pipelines.metadata import infotext
from pipelines.models.manager import LoadedModel, ModelManager
from pipelines.models.sizes import known_sizes
from pipelines.models.upscalers import concrete_upscaler, resolve_upscaler
from pipelines.planner import Plan, available_ram, free_device_memory, plan_generation
from pipelines.prompts.embeddings import EmbeddingLibrary, ti_hashes
from pipelines.request import (
    DEFAULT_MODEL,
    GenerationRequest,
    Limits,
    UpscaleRequest,
    hires_target,
    resolve_seed,
    validate,
)
from pipelines.saving import save_png
from pipelines.tiling import plan_tiles, seam_score, tile_boundaries
from pipelines.vae import io as vae_io
from pipelines.vae.tiling import decode_splits

log = logging.getLogger(__name__)

Callback = Callable[[StepInfo], None]


@dataclass
class GenerationResult:
    """Finished images (already saved when `paths` is filled), their metadata and run statistics."""

    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _recorded(req: GenerationRequest, seed: int) -> GenerationRequest:
    """The request as written into an image's metadata: its own seed, the effective hires denoise, ControlNet
    units' settings without their images."""
    if req.hires.enabled and req.hires.denoise is None:
        req = replace(req, hires=replace(req.hires, denoise=hires_denoise(req)))
    control = tuple(replace(u, image=None) for u in req.control)
    return replace(req, seed=seed, init_image=None, control=control)


def _model_sizes(model: LoadedModel) -> dict[str, Any]:
    """The loaded model's real weight bytes, and its width relative to the real architecture (320 channels)."""
    modules = [model.unet, model.vae, *model.text_encoders]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return {"weights": int(weights), "activation_scale": model.unet.config.block_out_channels[0] / 320}


def _vae_store(model: LoadedModel | None, width: int, height: int, budget: int | None) -> dict[str, int | None]:
    """The tiled VAE's canvas bytes at this size (per hand-over between its layer-wise and streamed runners), and
    the host memory they may take: on a CPU the planner's budget less the weights (the same RAM), on an
    accelerator half the available RAM."""
    if model is None:
        return {}
    store = decode_splits(model.vae, height // 8, width // 8)
    if model.device.type == "cpu":
        host = None if budget is None else max(budget - _model_sizes(model)["weights"], 0)
    else:
        ram = available_ram()
        host = None if ram is None else ram // 2
    return {"vae_splits": store, "host_budget_bytes": host}


def _check_control_names(unit, i: int, models_dir: Path) -> None:
    """A unit's preprocessor and ControlNet names, refused before any model loads (no paths outside models/)."""
    from pipelines.control import PREPROCESSORS, resolve_controlnet
    from pipelines.control.units import TINY_CONTROLNET

    if unit.type not in PREPROCESSORS:
        raise ValidationError(f"control[{i}].type", unit.type, f"must be one of {', '.join(PREPROCESSORS)}")
    if unit.model is not None and unit.model != TINY_CONTROLNET:
        resolve_controlnet(unit.model, models_dir)


def loop_finished(cancel: Any) -> None:
    """Tell a run's cancel token that the last denoising step is done (`pipelines.serving.service.RunToken`).

    The loop checks the token before each step and each tile batch, never after the last one, so from here the
    decode and the saving run to the end whatever the token says; the token passes this on to the stream, which
    then delivers the images even to a caller that cancelled (README: "Stopping a run")."""
    finished = getattr(cancel, "loop_finished", None)
    if finished is not None:
        finished()
def max_and_parts(req: GenerationRequest) -> int:
    """The most AND parts of any prompt the run encodes (main, hires, regions): UNet rows besides uncond."""
    from pipelines.prompts.composable import split_and

    texts = [req.prompt, req.hires.prompt or "", *(r.prompt for r in req.regions)]
    return max(len(split_and(t)) if isinstance(t, str) else 1 for t in texts)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def preload_libraries() -> None:
    """Import diffusers' and transformers' lazily-loaded classes once, up front.

    Their lazy modules are not thread-safe: a first import racing in two threads (a generation worker and a UI
    callback) can fail with "cannot import name 'DiffusionPipeline'". No weights, no device probing.
    """
    import diffusers
    import transformers

    from pipelines.denoise.schedulers import SAMPLERS

    names = ["DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "AutoencoderKL",
             "AutoencoderTiny", "ControlNetModel", "UNet2DConditionModel", *{c for c, _ in SAMPLERS.values()}]
    for name in names:
        getattr(diffusers, name)
    for name in ("CLIPTokenizer", "CLIPTextModel", "CLIPTextModelWithProjection"):
        getattr(transformers, name)


class Engine:
    """Owns the GPU lock, the prompt and stage-1 caches, and the outputs folder."""

    def __init__(self, manager: ModelManager, outputs_dir: Path | str | None = "outputs", *,
                 limits: Limits | None = None, allow_paths: bool = False):
        preload_libraries()
        tune_heap()  # large CPU tensors: glibc's default thresholds fragment the heap (`pipelines.heap`)
        self.manager = manager
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None
        self.limits = limits or Limits()
        self.allow_paths = allow_paths  # only the CLI may name model files by path
        self.default_model = DEFAULT_MODEL
        self.gpu_lock = threading.Lock()
        self.prompt_cache = PromptCache()
        self.embeddings = EmbeddingLibrary(self.manager.models_dir / "embeddings")  # textual inversions
        self._stage1_cache = LRUCache(2)  # stage-1 latents (on CPU) of the last two two-stage requests
        self.stage1_runs = 0
        self._saved: list[tuple[Image.Image, str, Path]] = []
        self._run_extra: dict[str, Any] = {}  # infotext keys of the current run (TI hashes)

    # ---------------------------------------------------------------- checks
    def check(self, req: GenerationRequest) -> GenerationRequest:
        """Validate a request completely (fields, names of sampler/model/upscaler) without loading anything."""
        req = validate(req, self.limits)
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
        return req

    def plan(self, req: GenerationRequest, model: LoadedModel | None = None, *, width=None, height=None) -> Plan:
        """The planner's tiling decision and memory estimate for this request (stage-2 size when given)."""
        source = None if model else self.manager.resolve(req.model, allow_paths=self.allow_paths)
        family = model.family if model else source.family
        t = req.tiling
        budget = int(t.memory_budget_gb * 1e9) if t.memory_budget_gb else None
        if budget is None and model is not None:
            budget = free_device_memory(model.device)
        if model is not None:
            dtype_bytes = 4 if model.dtype == torch.float32 else 2
            sizes = _model_sizes(model)
            sizes["weights"] += self.manager.auxiliary_bytes()  # the cached ControlNets, upscalers, annotators
        else:  # before loading: the chosen model's own size in the dtype it will be loaded in
            dtype_bytes = 4 if self.manager.device_dtype[1] == torch.float32 else 2
            sizes = known_sizes(source, dtype_bytes)
        width, height = width or req.width, height or req.height
        return plan_generation(width, height, batch=req.batch_size, budget_bytes=budget,
                               family="sdxl" if family == "sdxl" else "sd1", dtype_bytes=dtype_bytes,
                               tile_size=t.size, overlap=t.overlap, tile_batch=t.batch, force=t.mode,
                               vae_tiling=t.vae_tiling, vae_tile_size=t.vae_tile_size, vae_mode=t.vae_tile_mode,
                               regions=req.regions, region_base=req.region_base, region_canvas=(req.width, req.height),
                               cond_rows=1 + max_and_parts(req),
                               **_vae_store(model, width, height, budget), **sizes)

    # ---------------------------------------------------------------- public entry points
    def generate(self, req: GenerationRequest, *, callback: Callback | None = None, cancel=None,
                 save: bool = True, unet=None) -> GenerationResult:
        """Generate (txt2img, img2img, two-stage), save each image as soon as it is decoded, return the result."""
        req = self.check(req)
        req = replace(req, seed=resolve_seed(req.seed))
        with self.gpu_lock:  # released on success, error and cancel alike
            try:
                return self._generate_with_fallback(req, callback, cancel, save, unet)
            except BaseException:
                # a stopped or failed run hands its cached GPU blocks back (a full gc per run would cost ~0.2 s)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise

    def _generate_with_fallback(self, req, callback, cancel, save, unet) -> GenerationResult:
        self._saved = []  # (image, infotext, path) saved so far in this run; a retry never saves them twice
        try:
            return self._generate(req, callback, cancel, save, unet, low_memory=False)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            log.warning("out of memory (%s); retrying with tiling, tile batch 1 and tiled VAE", exc)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            result = self._generate(req, callback, cancel, save, unet, low_memory=True)
        except Exception as exc:
            if _is_oom(exc):
                raise OutOfMemoryError(
                    "out of memory even with tiling, tile batch 1 and tiled VAE: lower width/height, "
                    "batch_size or hires_scale, or set tile_size smaller") from exc
            raise
        result.warnings.append("ran out of memory; retried with tiling, tile batch 1 and tiled VAE")
        return result

    # ---------------------------------------------------------------- internals
    def _tile_spec(self, plan: Plan, req: GenerationRequest, low_memory: bool) -> TileSpec | None:
        if low_memory:
            size = min(plan.tile_size, 64)
            return TileSpec(size, min(plan.overlap, size // 4), req.tiling.blend, 1, req.tiling.shift)
        if not plan.tiled:
            return None
        return TileSpec(plan.tile_size, plan.overlap, req.tiling.blend, plan.tile_batch, req.tiling.shift)

    def _codec_opts(self, plan: Plan, low_memory: bool, device: torch.device) -> tuple[dict, dict]:
        tiled = plan.vae_tiled or low_memory
        # the low-memory retry tiles the VAE even when the plan did not (vae_tile_size is 0 then)
        tile = min(plan.vae_tile_size or 32, 32) if low_memory else plan.vae_tile_size
        # out of memory on a CPU means out of host RAM, where the layer-wise canvases live: stream every stage then
        retry_stream = low_memory and device.type == "cpu"
        mode = "stream" if retry_stream else plan.vae_mode or "exact"
        host = None if retry_stream else plan.vae_host_budget
        dec = {"tiled": tiled, "tile": tile, "overlap": max(4, tile // 4), "tile_mode": mode, "host_budget": host}
        enc = {"tiled": tiled, "tile_px": tile * 8, "overlap_px": max(32, tile * 2), "tile_mode": mode,
               "host_budget": host}
        return dec, enc

    def _stage1_key(self, req: GenerationRequest, model: LoadedModel, seeds, embeddings: tuple = ()) -> tuple:
        init = None if req.init_image is None else hash(req.init_image.tobytes())
        ctrl = tuple((u.type, u.model, u.scale, u.start, u.end, u.low, u.high, u.guess_mode,
                      hash(u.image.tobytes()) if hasattr(u.image, "tobytes") else id(u.image)) for u in req.control)
        return (model.name, model.loras, req.prompt, req.negative_prompt, req.width, req.height, req.steps, req.cfg,
                req.sampler, tuple(seeds), req.emphasis, req.clip_skip, req.strength, init, ctrl, req.tiling,
                req.prompt_timeline, embeddings, cache_settings(req), req.regions, req.region_base)

    def _generate(self, req, callback, cancel, save, unet, low_memory) -> GenerationResult:
        t0 = time.perf_counter()
        model = self.manager.get(req.model, loras=req.loras, allow_paths=self.allow_paths)
        seeds = [req.seed + i for i in range(req.batch_size)]
        if req.inpainting:  # a mask or outpainting: prepared, run and pasted back by `pipelines.edit.run`
            from pipelines.edit.run import run_inpaint

            return run_inpaint(self, model, req, seeds, callback, cancel, save, unet, low_memory)
        plan = self.plan(req, model)
        dec, enc = vae_io.with_replicas(self._codec_opts(plan, low_memory, model.device), unet)
        stats = LoopStats()
        report = vae_io.DecodeReport()
        spec = StageSpec(
            prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
            steps=req.steps, sampler=req.sampler, cfg=req.cfg, seeds=seeds, emphasis=req.emphasis,
            clip_skip=req.clip_skip, strength=req.strength, tiles=self._tile_spec(plan, req, low_memory),
            control=self._control_inputs(model, req, req.width, req.height),
            prompt_timeline=req.prompt_timeline, embeddings=self.embeddings.snapshot(),
            feature_cache=cache_settings(req),
            regions=req.regions, region_base=req.region_base, region_canvas=(req.width, req.height),
        )
        if req.init_image is not None:
            pixels = vae_io.from_pil(req.init_image, req.width, req.height, model.device, model.dtype)
            spec.init_latents = vae_io.encode(model, pixels, **enc)
        latents = self._stage1(model, req, spec, seeds, callback, cancel, stats, unet)
        final_plan, pixels_done, warnings = plan, None, []
        if req.hires.enabled:
            tw, th = hires_target(req.width, req.height, req.hires.scale)
            final_plan = self.plan(req, model, width=tw, height=th)
            dec, enc = vae_io.with_replicas(self._codec_opts(final_plan, low_memory, model.device), unet)
            init, big = upscale_latents_or_pixels(model, latents, req, models_dir=self.manager.models_dir,
                                                  decode_opts=dec, encode_opts=enc, cache=self.manager.caches.upscalers)
            if big is not None and init is latents:
                pixels_done = big
            else:
                control = self._control_inputs(model, req, tw, th)
                tile_unit, note = self._tile_control(model, req, latents, big, tw, th, dec)
                warnings = [note] if note else []
                spec2 = refine_spec(req, spec, init, tiles=self._tile_spec(final_plan, req, low_memory),
                                    control=(*control, *tile_unit))
                latents = run_stage(model, spec2, cache=self.prompt_cache, callback=callback, cancel=cancel,
                                    stats=stats, unet=unet).latents
        loop_finished(cancel)  # from here on the images are finished work: a cancel no longer discards them
        self._run_extra = ti_hashes(model.tokenizers[0], req, spec.embeddings)
        result = self._finish(model, req, seeds, latents, pixels_done, final_plan, dec, report, stats, save)
        result.warnings.extend(warnings)
        result.stats["seconds"] = round(time.perf_counter() - t0, 3)
        result.stats["plan"] = final_plan.describe()
        if (w := hires_warning(req)) is not None:
            result.warnings.append(w)
        return result

    def _stage1(self, model, req, spec, seeds, callback, cancel, stats, unet) -> torch.Tensor:
        """Stage-1 latents, from the cache when only stage-2 settings changed."""
        emb = spec.embeddings.identity(spec.embeddings.files) if spec.embeddings is not None else ()
        key = self._stage1_key(req, model, seeds, emb) if req.hires.enabled and unet is None else None
        def run() -> torch.Tensor:
            self.stage1_runs += 1
            return run_stage(model, spec, cache=self.prompt_cache, callback=callback, cancel=cancel,
                             stats=stats, unet=unet).latents

        if key is None:
            return run()
        return self._stage1_cache.get(key, lambda: run().detach().to("cpu")).to(model.device)

    def _tile_control(self, model, req, latents, big, width, height, dec) -> tuple[tuple, str | None]:
        """A tile ControlNet unit for the refine, fed each image's upscaled draft; (() , why) if unavailable."""
        if not req.hires.control_tile:
            return (), None
        from pipelines.control import load_controlnet
        from pipelines.control.units import tile_model_name
        from pipelines.errors import ModelError

        try:
            spec, allow = tile_model_name(model, self.manager.models_dir)
            cn = load_controlnet(spec, device=model.device, dtype=model.dtype, models_dir=self.manager.models_dir,
                                 allow_paths=allow, cache=self.manager.caches.controlnets)
        except (ModelError, ValidationError) as exc:
            return (), f"no tile ControlNet available ({exc}); the refine ran without it"
        if big is None:  # latent upscaler: the draft's pixels, resized
            drafts = vae_io.to_pil(vae_io.decode(model, latents, **dec))
            big = [d.resize((width, height), Image.LANCZOS) for d in drafts]
        maps = torch.cat([vae_io.from_pil(b, width, height, model.device, model.dtype) for b in big])
        return (ControlInput(cn, (maps + 1) / 2, req.hires.control_tile),), None

    def _control_inputs(self, model, req, width, height):
        if not req.control:
            return ()
        from pipelines.control.units import prepare_units

        return prepare_units(model, req.control, width, height, self.manager.models_dir, self.manager.caches)

    def _finish(self, model, req, seeds, latents, pixels_done, plan, dec, report, stats, save) -> GenerationResult:
        images: list[Image.Image] = []
        result = GenerationResult(request=req, images=images, seeds=seeds, infotexts=[])
        seams = None
        for i, seed in enumerate(seeds):
            if i < len(self._saved):  # finished and saved by an attempt that then ran out of memory: keep it
                img, text, path = self._saved[i]
                images.append(img)
                result.infotexts.append(text)
                result.paths.append(path)
                continue
            if pixels_done is not None:
                img = pixels_done[i]
            else:
                img = vae_io.to_pil(vae_io.decode(model, latents[i:i + 1], mode=req.vae_decode, report=report, **dec))[0]
            if plan.tiled and seams is None and req.vae_decode == "full":
                seams = self._seam_score(img, plan)
            extra = {**self._extra(req, plan, stats, report, seams), **self._run_extra}
            text = infotext(_recorded(req, seed), seed=seed, model_hash=model.short_hash, extra=extra)
            images.append(img)
            result.infotexts.append(text)
            if save and self.outputs_dir is not None:
                result.paths.append(save_png(img, text, self.outputs_dir, seed))  # saved now: a later crash keeps it
                self._saved.append((img, text, result.paths[-1]))
        result.stats.update({"unet_evals": stats.unet_evals, "unet_calls": stats.unet_calls,
                             "evals_saved": stats.evals_saved, "tiles_per_step": stats.tiles_per_step,
                             "seam_score": seams, "notes": list(report.notes)})
        if stats.cache_full or stats.cache_shallow:  # feature caching: UNet calls run full / shallow
            result.stats.update(unet_full_calls=stats.cache_full, unet_shallow_calls=stats.cache_shallow)
        return result

    @staticmethod
    def _seam_score(img: Image.Image, plan: Plan) -> float:
        tiles = plan_tiles(img.height // 8, img.width // 8, plan.tile_size, plan.overlap)
        xs, ys = tile_boundaries(tiles, scale=8)
        return round(float(seam_score(img, xs, ys)), 4)

    @staticmethod
    def _extra(req, plan, stats, report, seams) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if plan.tiled:
            extra["Tile plan"] = plan.describe()
        if seams is not None:
            extra["Seam score"] = seams
        if stats.evals_saved:
            extra["UNet evals saved"] = stats.evals_saved
        if report.notes:
            extra["VAE"] = "; ".join(report.notes)
        return extra

    def upscale(self, image: Image.Image | UpscaleRequest, *, callback: Callback | None = None, cancel=None,
                save: bool = True, **fields: Any) -> GenerationResult:
        """Upscale an image with a pixel upscaler, then (denoise > 0) refine it with img2img (`pipelines.upscale_job`).

        `image` is an `UpscaleRequest`, or an image with the request's fields as keywords (upscaler=, scale=, ...)."""
        from pipelines.upscale_job import run_upscale

        req = image if isinstance(image, UpscaleRequest) else UpscaleRequest(image=image, **fields)
        return run_upscale(self, req, callback=callback, cancel=cancel, save=save)

    # ---------------------------------------------------------------- small services for the UI
    def count_tokens(self, model_name: str, text: str) -> str:
        """"83/150 tokens, 2 chunks" for the UI's token counter (loads only the tokenizer, never weights)."""
        from pipelines.prompts.encoding import count_tokens_with

        tokenizer = self.manager.tokenizer(model_name)
        counts = self.embeddings.counts()
        return "" if tokenizer is None else str(count_tokens_with(tokenizer, text, embeddings=counts))
