"""Variants of the feature-cache and throughput cases (rows in `benchmarks/cases.py`).

feature-cache: the denoising loop alone (`run_stage`: the UNet passes, CFG and the scheduler; no text encoding
or VAE), with DeepCache at interval 3 against the same loop without it, so the row's time ratio is the UNet-time
ratio. Its notes give the FLOPs of one full and one shallow pass counted with torch.utils.flop_counter, the pass
counts of the cached run and the FLOP ratio they predict.

throughput: images per second at batch 1, 4 and 8, `Engine.generate` against diffusers' pipeline with
`num_images_per_prompt` on the same components and the same per-image initial noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from benchmarks.context import Context
from benchmarks.measure import Measurement
from benchmarks.settings import CFG, NEGATIVE, PROMPT, SAMPLER, SEED, Sizes
from pipelines.denoise.feature_cache import CacheSettings, full_steps, plan_passes
from pipelines.denoise.stages import PromptCache, StageSpec, build_conditioning, initial_noise, run_stage
from pipelines.denoise.unet_split import shallow_fraction
from pipelines.engine import Engine
from pipelines.request.cfg import needs_uncond

CACHE_INTERVAL = 3
THROUGHPUT_BATCHES = (1, 4, 8)
Run = Callable[[], Any]


def _loop_spec(s: Sizes, cache: CacheSettings | None) -> StageSpec:
    return StageSpec(prompt=PROMPT, negative_prompt=NEGATIVE, width=s.native, height=s.native, steps=s.steps,
                     sampler=SAMPLER, cfg=str(CFG), seeds=[SEED], feature_cache=cache)


def _loop(ctx: Context, s: Sizes, cache: CacheSettings | None) -> Run:
    spec, prompts = _loop_spec(s, cache), PromptCache()
    build_conditioning(ctx.model, spec, prompts, s.steps)(0)  # prompts encoded before the timed runs

    def run():
        cpu0 = time.process_time()
        res = run_stage(ctx.model, spec, cache=prompts, unet=ctx.eager_unet)
        # not `.stats`: the runner reads dicts there. CPU time: on a shared CPU the wall time depends on other jobs.
        return SimpleNamespace(latents=res.latents, loop_stats=res.stats, cpu_s=time.process_time() - cpu0)
    return run


def loop_cached(ctx: Context, s: Sizes) -> Run:
    return _loop(ctx, s, CacheSettings(interval=CACHE_INTERVAL))


def loop_plain(ctx: Context, s: Sizes) -> Run:
    return _loop(ctx, s, None)


def cache_flops(ctx: Context, app: Measurement, base: Measurement, _all) -> dict[str, Any]:
    """Counted FLOPs of a full and a shallow pass (CFG batch), the cached run's pass counts, the predicted ratio."""
    s = ctx.sizes
    side = s.native // ctx.model.vae_scale
    unet, added = ctx.eager_unet, None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(2, pooled, device=ctx.device, dtype=unet.dtype),
                 "time_ids": torch.zeros(2, 6, device=ctx.device, dtype=unet.dtype)}
    frac = shallow_fraction(unet, 0, (2, unet.config.in_channels, side, side),
                            (2, 77, unet.config.cross_attention_dim), added)
    stats = app.output.loop_stats if app.output is not None else None
    if stats is not None:  # the counter's forward hooks do not see the split passes; the loop counts them
        app.unet_evals, app.unet_calls = stats.unet_evals, stats.unet_calls
    full_n, shallow_n = (stats.cache_full, stats.cache_shallow) if stats else (None, None)
    kinds = plan_passes(full_steps(s.steps, CACHE_INTERVAL), [needs_uncond(CFG)] * s.steps)
    predicted = (kinds.count("full") + frac * kinds.count("shallow")) / s.steps
    counted = None if full_n is None else (full_n + frac * shallow_n) / s.steps
    time_ratio = base.median_s / app.median_s if app.median_s and base.median_s else None
    cpu_ratio = base.output.cpu_s / app.output.cpu_s if app.output is not None and base.output is not None else None
    return {"shallow_flops_fraction": frac, "full_passes": full_n, "shallow_passes": shallow_n,
            "predicted_full_passes": kinds.count("full"), "predicted_shallow_passes": kinds.count("shallow"),
            "flops_per_step_ratio_counted": counted, "flops_per_step_ratio_predicted": predicted,
            "unet_time_ratio": time_ratio, "unet_cpu_time_ratio": cpu_ratio,
            "time_basis": "process CPU time" if ctx.device.type == "cpu" else "wall time"}


def cache_target(app: Measurement, base: Measurement, extra: dict) -> tuple[str, bool] | None:
    """≥ 1.8× less UNet (loop) time at interval 3, and pass counts equal to the schedule's prediction. On a CPU the
    ratio is of process CPU time (the work done), since other jobs on a shared machine inflate wall time unevenly."""
    cpu = extra.get("time_basis") == "process CPU time"
    ratio = extra.get("unet_cpu_time_ratio" if cpu else "unet_time_ratio")
    if ratio is None:
        return None
    counts_ok = (extra.get("full_passes"), extra.get("shallow_passes")) == (
        extra.get("predicted_full_passes"), extra.get("predicted_shallow_passes"))
    basis = "CPU time" if cpu else "time"
    return f"{ratio:.2f}× less UNet {basis} (≥ 1.8×); passes as predicted: {counts_ok}", ratio >= 1.8 and counts_ok


# ---------------------------------------------------------------- throughput

def _app_batch(n: int) -> Callable[[Context, Sizes], Run]:
    def make(ctx: Context, s: Sizes) -> Run:
        req = ctx.request(width=s.native, height=s.native, steps=s.steps, batch_size=n)

        def run():
            return Engine(ctx.manager, None, allow_paths=ctx.engine.allow_paths).generate(req, save=False)
        return run
    return make


def _diffusers_batch(n: int) -> Callable[[Context, Sizes], Run]:
    def make(ctx: Context, s: Sizes) -> Run:
        pipe = ctx.family_pipeline(StableDiffusionPipeline, StableDiffusionXLPipeline)
        m = ctx.model
        shape = (m.unet.config.in_channels, s.native // m.vae_scale, s.native // m.vae_scale)
        latents = initial_noise([SEED + i for i in range(n)], shape, ctx.device, m.dtype)[0]  # the app's noise
        return lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=s.native, width=s.native,
                            num_inference_steps=s.steps, guidance_scale=CFG, num_images_per_prompt=n,
                            latents=latents.clone()).images
    return make


def images_per_second(n: int):
    def extra(ctx: Context, app: Measurement, base: Measurement, _all) -> dict[str, Any]:
        return {"batch": n, "app_images_per_s": n / app.median_s, "diffusers_images_per_s": n / base.median_s}
    return extra


def throughput_variants(variant: type) -> dict[str, Any]:
    """{key: Variant} for every batch size, app and diffusers (`variant` is cases.Variant)."""
    out = {}
    for n in THROUGHPUT_BATCHES:
        out[f"app-batch{n}"] = variant(f"app-batch{n}", f"Engine.generate batch {n}", _app_batch(n))
        out[f"diffusers-batch{n}"] = variant(f"diffusers-batch{n}", f"diffusers num_images_per_prompt={n}",
                                             _diffusers_batch(n))
    return out

