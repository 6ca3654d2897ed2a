"""The benchmark cases: each row pits an app variant against a baseline variant on the same loaded components.

A variant is a factory `make(ctx, sizes) -> run`; `run()` does the measured work once and returns its output
(kept for quality metrics). Variants shared by several rows (the app's tiled run, its tiled VAE decode) are
measured once. Baselines are plain diffusers pipelines built from `pipe.components` of the loaded model (same
weights, dtype, attention processors), with the same scheduler class/config and the same initial latents.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPanoramaPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from benchmarks.context import Context, diffusers_vae_tiling
from benchmarks.measure import Measurement, NotMeasured
from benchmarks.settings import CFG, INTERVAL_CFG, NEGATIVE, PROMPT, SAMPLER, SEED, Sizes
from benchmarks.speedups import (
    THROUGHPUT_BATCHES,
    cache_flops,
    cache_target,
    images_per_second,
    loop_cached,
    loop_plain,
    throughput_variants,
)
from pipelines.denoise.stages import PromptCache, StageSpec, build_conditioning, img2img_schedule
from pipelines.engine import Engine
from pipelines.request.cfg import parse_cfg, scales_for_steps, unet_evaluations
from pipelines.request.presets import PRESETS_DIR, load_preset
from pipelines.request.schema import TileConfig, from_flat
from pipelines.request.validation import hires_target
from pipelines.vae import io as vae_io
from pipelines.vae.tiling import tiled_decode

Run = Callable[[], Any]


@dataclass(frozen=True)
class Variant:
    """One side of a row; `key` identifies it so a variant shared by rows is measured once."""

    key: str
    label: str
    make: Callable[[Context, Sizes], Run]


@dataclass(frozen=True)
class Target:
    """A goal from the issue (for an H100); `gpu` goals are judged only on CUDA with a full-size, non-quick run."""

    text: str
    judge: Callable[[Measurement, Measurement, dict], tuple[str, bool] | None]  # (ratios text, met) or None
    gpu: bool = True
    families: tuple[str, ...] = ("sd1", "sd2", "sdxl")
    models: tuple[str, ...] = ()  # when set, judged only on these --model names (device-independent targets)


@dataclass(frozen=True)
class Row:
    case: str
    key: str
    title: str  # formatted with the Sizes fields
    app: Variant
    base: Variant
    target: Target | None = None
    extra: Callable[[Context, Measurement, Measurement, dict[str, Measurement]], dict[str, Any]] | None = None


# ---------------------------------------------------------------- the app (Engine.generate, save=False)

def _engine_run(ctx: Context, req) -> Run:
    def run():
        # A fresh engine per run (microseconds): no prompt or stage-1 cache hits from the previous run, since
        # diffusers encodes the prompts and runs the draft on every call. The model stays loaded in the manager.
        engine = Engine(ctx.manager, None, allow_paths=ctx.engine.allow_paths)
        res = engine.generate(req, save=False)
        if any("out of memory" in w for w in res.warnings):
            raise NotMeasured("out of memory: the engine fell back to tiling, so this variant did not run as asked")
        return res
    return run


def app_txt2img(ctx: Context, s: Sizes) -> Run:
    return _engine_run(ctx, ctx.request(width=s.native, height=s.native, steps=s.steps))


def app_interval(ctx: Context, s: Sizes) -> Run:
    return _engine_run(ctx, ctx.request(width=s.native, height=s.native, steps=s.steps, cfg=INTERVAL_CFG))


def app_tiled(ctx: Context, s: Sizes) -> Run:
    tiles = TileConfig(mode="on", size=s.tile, overlap=s.overlap, batch=s.tile_batch)
    return _engine_run(ctx, ctx.request(width=s.tiled, height=s.tiled, steps=s.tiled_steps, tiling=tiles))


def app_untiled(ctx: Context, s: Sizes) -> Run:
    tiles = TileConfig(mode="off")
    return _engine_run(ctx, ctx.request(width=s.tiled, height=s.tiled, steps=s.tiled_steps, tiling=tiles))


def ultra_request(ctx: Context, s: Sizes):
    """presets/ultra.json on a draft of s.ultra / hires_scale; quick runs override steps and tile size."""
    preset = load_preset(PRESETS_DIR / "ultra.json")
    draft = int(s.ultra / float(preset.values["hires_scale"])) // 8 * 8
    req = preset.apply(ctx.request(width=draft, height=draft))
    overrides = {"steps": s.ultra_steps, "hires_steps": s.ultra_hires_steps, "tile_size": s.ultra_tile,
                 "tile_overlap": s.ultra_overlap}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return from_flat(overrides, req) if overrides else req


def app_ultra(ctx: Context, s: Sizes) -> Run:
    return _engine_run(ctx, ultra_request(ctx, s))


def _vae_latents(ctx: Context, size: int) -> torch.Tensor:
    side = size // ctx.model.vae_scale
    g = torch.Generator("cpu").manual_seed(SEED)
    z = torch.randn((1, ctx.model.vae.config.latent_channels, side, side), generator=g)
    return z.to(ctx.device, ctx.model.vae.dtype)


def app_vae_tiled(ctx: Context, s: Sizes) -> Run:
    z = _vae_latents(ctx, s.vae)
    return lambda: tiled_decode(ctx.model.vae, z, tile_size=s.vae_tile, overlap=max(4, s.vae_tile // 4))


def app_vae_stream(ctx: Context, s: Sizes) -> Run:
    z = _vae_latents(ctx, s.vae)
    return lambda: tiled_decode(ctx.model.vae, z, tile_size=s.vae_tile, overlap=max(4, s.vae_tile // 4),
                                mode="stream")


def app_taesd(ctx: Context, s: Sizes) -> Run:
    if ctx.model.taesd is None:
        raise NotMeasured("no TAESD for this model")
    z = ctx.noise(s.native, s.native)
    return lambda: vae_io.decode(ctx.model, z, mode="taesd")


def _stage_spec(s: Sizes) -> StageSpec:
    return StageSpec(prompt=PROMPT, negative_prompt=NEGATIVE, width=s.native, height=s.native, steps=s.steps,
                     sampler=SAMPLER, cfg=str(CFG), seeds=[SEED])


def app_prompt_hit(ctx: Context, s: Sizes) -> Run:
    spec, cache = _stage_spec(s), PromptCache()
    build_conditioning(ctx.model, spec, cache, s.steps)(0)  # fills the cache
    return lambda: build_conditioning(ctx.model, spec, cache, s.steps)(0)


# ---------------------------------------------------------------- baselines

def diffusers_txt2img(ctx: Context, s: Sizes) -> Run:
    pipe = ctx.family_pipeline(StableDiffusionPipeline, StableDiffusionXLPipeline)
    latents = ctx.noise(s.native, s.native)
    return lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=s.native, width=s.native,
                        num_inference_steps=s.steps, guidance_scale=CFG, latents=latents.clone()).images[0]


def diffusers_panorama(ctx: Context, s: Sizes) -> Run:
    if ctx.model.spec.pooled:
        raise NotMeasured("diffusers has no SDXL panorama pipeline")
    pipe = ctx.pipeline(StableDiffusionPanoramaPipeline)
    latents = ctx.noise(s.tiled, s.tiled)
    # Its defaults: view_batch_size=1, 64-latent window, stride 8 (get_views), scheduler state copied per view.
    return lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=s.tiled, width=s.tiled,
                        num_inference_steps=s.tiled_steps, guidance_scale=CFG, view_batch_size=1,
                        latents=latents.clone()).images[0]


def diffusers_vae_tiled(ctx: Context, s: Sizes) -> Run:
    z, vae = _vae_latents(ctx, s.vae), ctx.model.vae

    def run():
        with diffusers_vae_tiling(vae, s.vae_tile):
            return vae.decode(z, return_dict=False)[0]
    return run


def full_vae_decode(ctx: Context, s: Sizes) -> Run:
    z, vae = _vae_latents(ctx, s.vae), ctx.model.vae
    return lambda: vae.decode(z, return_dict=False)[0]


def full_decode_native(ctx: Context, s: Sizes) -> Run:
    z = ctx.noise(s.native, s.native)
    return lambda: vae_io.decode(ctx.model, z, mode="full")


def prompt_encode(ctx: Context, s: Sizes) -> Run:
    spec = _stage_spec(s)
    return lambda: build_conditioning(ctx.model, spec, PromptCache(), s.steps)(0)


def _tile_controlnet(ctx: Context):
    """The tile ControlNet the engine's refine would use (same cached module), or None when it has none."""
    from pipelines.control.models import load_controlnet
    from pipelines.control.units import tile_model_name
    from pipelines.errors import ModelError, ValidationError

    try:
        spec, allow = tile_model_name(ctx.model, ctx.manager.models_dir)
        return load_controlnet(spec, device=ctx.device, dtype=ctx.model.dtype, models_dir=ctx.manager.models_dir,
                               allow_paths=allow, cache=ctx.manager.caches.controlnets)
    except (ModelError, ValidationError):
        return None


def diffusers_ultra(ctx: Context, s: Sizes) -> Run:
    """Plain diffusers two-stage: txt2img draft, Lanczos upscale, img2img at full size (untiled UNet; with the
    tile ControlNet when the app has one) and the VAE's own tiling (without it a 4096² decode does not fit).
    Constant CFG at the app's ramp mean, and the same CFG rescale where the pipeline has it."""
    req = ultra_request(ctx, s)
    schedule = parse_cfg(req.cfg)
    cfg = statistics.fmean(scales_for_steps(schedule, req.steps))
    t2i = ctx.family_pipeline(StableDiffusionPipeline, StableDiffusionXLPipeline, req.sampler)
    sampler2 = req.hires.sampler or req.sampler
    cn = _tile_controlnet(ctx) if req.hires.control_tile else None
    if cn is None:
        i2i = ctx.family_pipeline(StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, sampler2)
        control = {}
    else:
        i2i = ctx.pipeline(StableDiffusionXLControlNetImg2ImgPipeline if ctx.model.spec.pooled
                           else StableDiffusionControlNetImg2ImgPipeline, sampler2, controlnet=cn)
        control = {"controlnet_conditioning_scale": req.hires.control_tile}
    total, _ = img2img_schedule(req.hires.steps or req.steps, req.hires.denoise)
    tw, th = hires_target(req.width, req.height, req.hires.scale)
    latents = ctx.noise(req.width, req.height)
    common = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, guidance_scale=cfg)
    rescale = {"guidance_rescale": schedule.rescale} if schedule.rescale else {}
    rescale2 = rescale if "guidance_rescale" in inspect.signature(i2i.__call__).parameters else {}

    def run():
        draft = t2i(height=req.height, width=req.width, num_inference_steps=req.steps, latents=latents.clone(),
                    **common, **rescale).images[0]
        big = draft.resize((tw, th), Image.LANCZOS)
        refine = {**control, "control_image": big} if control else {}
        with diffusers_vae_tiling(ctx.model.vae, 64):
            return i2i(image=big, strength=req.hires.denoise, num_inference_steps=total,
                       generator=torch.Generator("cpu").manual_seed(SEED), **common, **refine, **rescale2).images[0]
    return run


# ---------------------------------------------------------------- quality metrics and targets

def _image(out) -> np.ndarray:
    img = out.images[0] if hasattr(out, "images") else out
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def image_difference(ctx, app: Measurement, base: Measurement, _all) -> dict[str, Any]:
    """How far the app's image is from diffusers' (same latents, scheduler and weights): a sanity check."""
    a, b = _image(app.output), _image(base.output)
    diff = np.abs(a - b)
    return {"max_abs_pixel_diff": int(diff.max()), "mean_abs_pixel_diff": round(float(diff.mean()), 3)}


def _mae(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).abs().mean())


def _full_decode_output(ctx: Context, measured: dict[str, Measurement]) -> torch.Tensor:
    """The full decode of the VAE cases' latents: the `vae-full` measurement's output, or decoded now."""
    full = measured.get("vae-full")
    if full is not None and full.output is not None:
        return full.output
    with torch.no_grad():
        return full_vae_decode(ctx, ctx.sizes)()


def vae_errors(ctx: Context, app: Measurement, base: Measurement, measured: dict[str, Measurement]) -> dict:
    """Mean absolute error of both tiled decodes against the full decode of the same latents."""
    ref = _full_decode_output(ctx, measured)
    mae_app, mae_base = _mae(app.output, ref), _mae(base.output, ref)
    return {"mae_app": mae_app, "mae_diffusers": mae_base,
            "mae_ratio": mae_app / mae_base if mae_base > 0 else None}


def stream_errors(ctx: Context, app: Measurement, base: Measurement, measured: dict[str, Measurement]) -> dict:
    """Mean absolute error of the streamed and the layer-wise tiled decodes against the full decode."""
    ref = _full_decode_output(ctx, measured)
    return {"mae_stream": _mae(app.output, ref), "mae_layerwise": _mae(base.output, ref)}


def predicted_evals(ctx: Context, app: Measurement, base: Measurement, _all) -> dict[str, Any]:
    steps = ctx.sizes.steps
    pred_app = unet_evaluations(parse_cfg(INTERVAL_CFG), steps)
    pred_base = unet_evaluations(parse_cfg(str(CFG)), steps)
    fewer = 1 - app.unet_evals / base.unet_evals if app.unet_evals and base.unet_evals else None
    return {"predicted_evals_app": pred_app, "predicted_evals_baseline": pred_base, "fewer_evals": fewer}


def _speedup(app: Measurement, base: Measurement) -> float | None:
    return base.median_s / app.median_s if app.median_s and base.median_s else None


def _time_and_speedup(limit_s: float, min_speedup: float):
    def judge(app, base, _extra):
        sp = _speedup(app, base)
        if app.median_s is None or sp is None:
            return None
        text = (f"time {app.median_s / limit_s:.2f}× of {limit_s * 1000:g} ms; "
                f"speedup {sp / min_speedup:.2f}× of {min_speedup:g}×")
        return text, app.median_s <= limit_s and sp >= min_speedup
    return judge


def _peak_under(limit_gb: float):
    def judge(app, _base, _extra):
        if app.memory is None:
            return None
        gb = app.memory.peak_mb * 1024 * 1024 / 1e9
        return f"peak {gb / limit_gb:.2f}× of {limit_gb:g} GB", gb <= limit_gb
    return judge


def _mae_half(app, base, extra):
    ratio = extra.get("mae_ratio")
    return None if ratio is None else (f"MAE ratio {ratio:.3g} (≤ 0.5)", ratio <= 0.5)


def _evals_fewer(app, base, extra):
    fewer = extra.get("fewer_evals")
    return None if fewer is None else (f"{fewer:.0%} fewer evals (≥ 30%)", fewer >= 0.30)


# ---------------------------------------------------------------- the table

V = {
    "app-txt2img": Variant("app-txt2img", "Engine.generate", app_txt2img),
    "diffusers-txt2img": Variant("diffusers-txt2img", "diffusers StableDiffusion(XL)Pipeline", diffusers_txt2img),
    "app-tiled": Variant("app-tiled", "Engine tiled", app_tiled),
    "diffusers-panorama": Variant("diffusers-panorama", "diffusers StableDiffusionPanoramaPipeline",
                                  diffusers_panorama),
    "app-untiled": Variant("app-untiled", "Engine untiled", app_untiled),
    "app-vae-tiled": Variant("app-vae-tiled", "vae_tiling.tiled_decode", app_vae_tiled),
    "diffusers-vae-tiled": Variant("diffusers-vae-tiled", "diffusers vae.enable_tiling()", diffusers_vae_tiled),
    "vae-full": Variant("vae-full", "full vae.decode", full_vae_decode),
    "app-vae-stream": Variant("app-vae-stream", "tiled_decode(mode='stream')", app_vae_stream),
    "app-taesd": Variant("app-taesd", "TAESD decode", app_taesd),
    "full-decode-native": Variant("full-decode-native", "full VAE decode", full_decode_native),
    "prompt-hit": Variant("prompt-hit", "PromptCache hit", app_prompt_hit),
    "prompt-encode": Variant("prompt-encode", "PromptEncoder.encode", prompt_encode),
    "app-interval": Variant("app-interval", f"Engine cfg {INTERVAL_CFG}", app_interval),
    "app-ultra": Variant("app-ultra", "Engine, presets/ultra.json", app_ultra),
    "diffusers-ultra": Variant("diffusers-ultra", "diffusers txt2img + (ControlNet) img2img, VAE tiling",
                               diffusers_ultra),
    "loop-cached": Variant("loop-cached", "denoising loop, feature cache interval 3", loop_cached),
    "loop-plain": Variant("loop-plain", "denoising loop, no cache", loop_plain),
    **throughput_variants(Variant),
}

ROWS: tuple[Row, ...] = (
    Row("txt2img", "txt2img", "txt2img {native}², {steps} steps", V["app-txt2img"], V["diffusers-txt2img"],
        Target("≤ 150 ms and ≥ 1.5× diffusers (SD1.5 512², 20 steps)", _time_and_speedup(0.150, 1.5),
               families=("sd1",)), image_difference),
    Row("tiled", "tiled-panorama", "tiled {tiled}², {tiled_steps} steps", V["app-tiled"],
        V["diffusers-panorama"],
        Target("≤ 2.5 s and ≥ 5× panorama (SD1.5 2048²)", _time_and_speedup(2.5, 5.0), families=("sd1",))),
    Row("tiled", "tiled-untiled", "tiled vs untiled {tiled}²", V["app-tiled"], V["app-untiled"]),
    Row("vae", "vae-tiling", "tiled VAE decode {vae}², tile {vae_tile}", V["app-vae-tiled"],
        V["diffusers-vae-tiled"], Target("MAE ≤ ½ of diffusers' tiling", _mae_half, gpu=False), vae_errors),
    Row("vae", "vae-full", "tiled vs full VAE decode {vae}²", V["app-vae-tiled"], V["vae-full"]),
    Row("vae", "vae-stream", "streamed vs layer-wise tiled VAE {vae}², tile {vae_tile}", V["app-vae-stream"],
        V["app-vae-tiled"], extra=stream_errors),
    Row("taesd", "taesd", "TAESD vs full VAE decode {native}²", V["app-taesd"], V["full-decode-native"]),
    Row("prompt-cache", "prompt-cache", "prompt cache hit vs encode", V["prompt-hit"], V["prompt-encode"]),
    Row("guidance", "guidance-interval", "guidance interval vs constant CFG {native}², {steps} steps",
        V["app-interval"], V["app-txt2img"], Target("≥ 30% fewer UNet evals", _evals_fewer, gpu=False),
        predicted_evals),
    Row("ultra", "ultra", "ultra two-stage {ultra}²", V["app-ultra"], V["diffusers-ultra"],
        Target("peak ≤ 6 GB (4096²)", _peak_under(6.0))),
    Row("feature-cache", "feature-cache", "feature caching (DeepCache) {native}², {steps} steps, CFG",
        V["loop-cached"], V["loop-plain"],
        Target("≥ 1.8× less UNet time at interval 3 (sd15-random 256²)", cache_target, gpu=False,
               models=("sd15-random",)), cache_flops),
    *(Row("throughput", f"throughput-b{n}", f"throughput batch {n}, {{native}}², {{steps}} steps", V[f"app-batch{n}"],
          V[f"diffusers-batch{n}"], extra=images_per_second(n)) for n in THROUGHPUT_BATCHES),
)
