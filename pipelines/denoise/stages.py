"""One diffusion stage (txt2img or img2img) on a loaded model: prompts -> conditioning -> loop -> latents.

Stage 1 (the draft) and stage 2 (the hires refine) are both `run_stage` calls on the same loaded weights.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from pipelines.denoise.executor import SERIAL, TileExecutor
from pipelines.denoise.feature_cache import CacheSettings, make_feature_cache
from pipelines.denoise.loop import Conditioning, ControlInput, LoopInputs, LoopStats, StepInfo, TileSpec, denoise
from pipelines.denoise.regions import RegionView, paste_region_noise, region_masks
from pipelines.denoise.schedulers import make_scheduler
from pipelines.lru import LRUCache
from pipelines.prompts.composable import split_and
from pipelines.prompts.encoding import Emphasis, EncodedPrompt, PromptEncoder
from pipelines.prompts.parser import prompts_per_step
from pipelines.request.cfg import parse_cfg, scales_for_steps

log = logging.getLogger(__name__)


class PromptCache(LRUCache):
    """The one cache of encoded prompts, keyed by model, LoRAs, text and encoding options."""

    def __init__(self, size: int = 64):
        super().__init__(size)


@dataclass
class StageSpec:
    """What one stage runs; sizes in pixels."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    sampler: str
    cfg: str
    seeds: Sequence[int]
    emphasis: str = "a1111"
    clip_skip: int = 1
    prompt_timeline: str = "a1111"  # how [a:b:N] maps N to steps (`pipelines.prompts.parser.prompts_per_step`)
    first_pass_steps: int | None = None  # set on a two-stage run's refine: A1111's hires form of the timeline
    embeddings: Any = None  # `pipelines.prompts.embeddings.Embeddings`: textual inversions the prompts may name
    init_latents: torch.Tensor | None = None  # img2img when set
    strength: float = 1.0
    tiles: TileSpec | None = None
    control: Sequence[ControlInput] = ()
    feature_cache: CacheSettings | None = None  # DeepCache settings; None = off
    regions: Sequence = ()  # `pipelines.request.regions.Region`s: regional prompts
    region_base: str = "rest"  # rest | background: where the base prompt acts (`pipelines.denoise.regions`)
    region_canvas: tuple[int, int] | None = None  # stage-1 (width, height) the regions refer to; None = this size
    inpaint: Any = None  # a pipelines.edit.inpaint.LatentMask: the mask's loop hooks (with init_latents)


@dataclass
class StageResult:
    latents: torch.Tensor
    stats: LoopStats = field(default_factory=LoopStats)


def _encoder_for(model, clip_skip: int, embeddings=None) -> PromptEncoder:
    return PromptEncoder(model.tokenizers, model.text_encoders, pooled=model.spec.pooled, clip_skip=clip_skip,
                         embeddings=embeddings)


def stage_prompts(spec: StageSpec, steps: int) -> tuple[list[str], list[str]]:
    """The stage's prompt and negative prompt at each of `steps` steps (its timeline, hires form on a refine)."""
    kw = _timeline_options(spec)
    return prompts_per_step(spec.prompt, steps, **kw), prompts_per_step(spec.negative_prompt, steps, **kw)


def _timeline_options(spec: StageSpec) -> dict[str, Any]:
    """How `prompts_per_step` reads [a:b:N] in this stage: the timeline rule and, on a refine, stage 1's steps."""
    return {"timeline": spec.prompt_timeline, "first_pass_steps": spec.first_pass_steps}


def build_conditioning(model, spec: StageSpec, cache: LRUCache, steps: int) -> Callable[[int], Conditioning]:
    """Per-step conditioning: prompt scheduling resolved per step, every distinct text encoded once (cached)."""
    enc = _encoder_for(model, spec.clip_skip, spec.embeddings)
    pos, neg = stage_prompts(spec, steps)
    parts = split_and(spec.prompt)  # AND (composable diffusion): one schedule per part
    weights = tuple(w for _, w in parts)
    if len(parts) == 1 and parts[0][0] == spec.prompt:
        pos_parts = [pos]
    else:
        pos_parts = [prompts_per_step(text, steps, **_timeline_options(spec)) for text, _ in parts]
    distinct = sorted(set().union(*pos_parts) | set(neg))
    chunks = max(enc.chunk_count(t) for t in distinct)
    base_key = (model.name, model.loras, spec.emphasis, spec.clip_skip, chunks)

    def encode(text: str):
        key = (*base_key, text, enc.embedding_key(text))  # a replaced embedding file re-encodes
        emphasis = cast(Emphasis, spec.emphasis)  # validated: "a1111" or "none"
        return cache.get(key, lambda: enc.encode(text, emphasis=emphasis, min_chunks=chunks))

    encoded = {t: encode(t) for t in distinct}
    uncond = _negative_encodings(model, spec, encoded, lambda: cache.get((*base_key, "", "zeros"), lambda: _zeros(
        encoded[""])))
    time_ids = None
    if (added := model.spec.added_conditioning(spec.width, spec.height)) is not None:
        time_ids = torch.tensor([added], dtype=model.dtype, device=model.device)
    conds: dict[tuple, Conditioning] = {}

    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(model.device, model.dtype)

    def at(step: int) -> Conditioning:
        key = (tuple(p[step] for p in pos_parts), neg[step])
        if key not in conds:
            (c, *extra), u = [encoded[t] for t in key[0]], uncond[key[1]]
            conds[key] = Conditioning(
                cond=c.embeds.to(model.device, model.dtype), uncond=u.embeds.to(model.device, model.dtype),
                cond_pooled=on_device(c.pooled), uncond_pooled=on_device(u.pooled), time_ids=time_ids,
                extra=tuple(e.embeds.to(model.device, model.dtype) for e in extra),
                extra_pooled=tuple(e.pooled.to(model.device, model.dtype) for e in extra if e.pooled is not None), weights=weights)
        return conds[key]

    return at


def zeros_for_empty_negative(model, negative_prompt: str) -> bool:
    """Whether the unconditional pass gets zero embeddings (and a zero pooled embedding) instead of the encoded ""
    (the family's rule: SDXL base, as diffusers and A1111 do)."""
    config = getattr(model.pipe, "config", {}) or {}
    return model.spec.zeros_for_empty_negative(config, negative_prompt)


def _zeros(encoded: EncodedPrompt) -> EncodedPrompt:
    """Zeros shaped like `encoded` (diffusers `torch.zeros_like(prompt_embeds)` and of the pooled embedding)."""
    return EncodedPrompt(torch.zeros_like(encoded.embeds),
                         None if encoded.pooled is None else torch.zeros_like(encoded.pooled))


def _negative_encodings(model, spec: StageSpec, encoded: dict, zeros: Callable[[], EncodedPrompt]) -> dict:
    """Negative text -> encoding: the text's own encoding, or zeros for an empty SDXL negative (see above)."""
    if zeros_for_empty_negative(model, spec.negative_prompt):
        return {"": zeros()}
    return encoded
def region_views(model, spec: StageSpec, cache: LRUCache, steps: int) -> tuple[torch.Tensor | None, list]:
    """(base mask, RegionViews) of the stage's regional prompts at its size; (None, []) without regions."""
    if not spec.regions:
        return None, []
    canvas = spec.region_canvas or (spec.width, spec.height)
    base_mask, masks = region_masks(spec.regions, spec.width, spec.height, canvas, spec.region_base,
                                    model.vae_scale, model.device)
    views = []
    for region, mask in zip(spec.regions, masks, strict=True):
        negative = spec.negative_prompt if region.negative_prompt is None else region.negative_prompt
        sub = replace(spec, prompt=region.prompt, negative_prompt=negative, regions=())
        views.append(RegionView(build_conditioning(model, sub, cache, steps), mask))
    return base_mask, views


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, list]:
    """Per-image noise from CPU generators seeded seed+i, so each image is reproducible alone on any device."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype), gens


def img2img_schedule(steps: int, strength: float, max_total: int = 1000) -> tuple[int, int]:
    """(total steps of the longer schedule, steps actually run): strength is its tail (ComfyUI set_steps)."""
    if strength >= 1.0:
        return steps, steps
    if strength <= 0.0:
        return 0, 0
    total = min(max_total, max(steps, math.ceil(steps / strength)))
    run = min(steps, max(1, round(total * strength)))
    return total, run


def _timesteps(sched, spec: StageSpec, device):
    if spec.init_latents is None or spec.strength >= 1.0:
        sched.set_timesteps(spec.steps, device=device)
        return list(sched.timesteps)
    total, run = img2img_schedule(spec.steps, spec.strength)
    if run == 0:
        return []  # strength 0: nothing to denoise, the init latents are the result
    sched.set_timesteps(total, device=device)
    start = (total - run) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return list(sched.timesteps[start:])


def _step_accepts_generator(sched) -> bool:
    return "generator" in inspect.signature(sched.step).parameters


def run_stage(model, spec: StageSpec, *, cache: LRUCache, callback: Callable[[StepInfo], None] | None = None,
              cancel=None, stats: LoopStats | None = None, unet=None, executor: TileExecutor = SERIAL
              ) -> StageResult:
    """Run one txt2img/img2img stage and return the final latents (not decoded). `unet`: a stand-in for the
    model's (tests' fakes); `executor`: where the batches of tiles run (a split image's devices)."""
    stats = stats if stats is not None else LoopStats()
    device, dtype = model.device, model.dtype
    sched = make_scheduler(spec.sampler, model.pipe.scheduler.config)
    timesteps = _timesteps(sched, spec, device)
    latent_shape = (model.vae.config.latent_channels, spec.height // model.vae_scale, spec.width // model.vae_scale)
    noise, gens = initial_noise(spec.seeds, latent_shape, device, dtype)
    noise = paste_region_noise(noise, spec.regions, spec.seeds, spec.region_canvas or (spec.width, spec.height),
                               model.vae_scale)
    if spec.init_latents is None:
        latents = noise * sched.init_noise_sigma
    else:
        init = spec.init_latents.to(device, dtype).expand(len(spec.seeds), -1, -1, -1)
        if not timesteps:
            return StageResult(init.clone(), stats)
        if spec.inpaint is not None and spec.strength >= 1.0:
            latents = noise * sched.init_noise_sigma  # diffusers' inpainting at strength 1 (`is_strength_max`)
        else:
            start = init if spec.inpaint is None else spec.inpaint.start_latents(init)  # A1111's masked content
            latents = sched.add_noise(start, noise, timesteps[0].reshape(1).repeat(len(spec.seeds)))
    schedule = parse_cfg(spec.cfg)
    base_mask, views = region_views(model, spec, cache, len(timesteps))
    inp = LoopInputs(
        unet=unet or model.unet, scheduler=sched, latents=latents, timesteps=timesteps,
        conditioning=build_conditioning(model, spec, cache, len(timesteps)),
        scales=scales_for_steps(schedule, len(timesteps)), rescale=schedule.rescale, tiles=spec.tiles,
        control=spec.control, generators=gens if _step_accepts_generator(sched) else None,
        seed=int(spec.seeds[0]), callback=callback, cancel=cancel, vae_scale=model.vae_scale,
        feature_cache=make_feature_cache(unet or model.unet, len(timesteps), spec.feature_cache, executor.unets),
        executor=executor,
        regions=views, base_mask=base_mask,
        **({} if spec.inpaint is None else spec.inpaint.hooks(sched, timesteps, init, noise)),
    )
    return StageResult(denoise(inp, stats), stats)
