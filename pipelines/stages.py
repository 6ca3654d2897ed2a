"""One diffusion stage (txt2img or img2img) on a loaded model: prompts -> conditioning -> loop -> latents.

Stage 1 (the draft) and stage 2 (the hires refine) are both `run_stage` calls on the same loaded weights.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.guidance import parse_cfg, scales_for_steps
from pipelines.lru import LRUCache
from pipelines.prompt_encoding import PromptEncoder
from pipelines.prompts import prompts_per_step
from pipelines.sampling import Conditioning, ControlInput, LoopInputs, LoopStats, StepInfo, TileSpec, denoise
from pipelines.schedulers import make_scheduler

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
    init_latents: torch.Tensor | None = None  # img2img when set
    strength: float = 1.0
    tiles: TileSpec | None = None
    control: Sequence[ControlInput] = ()
    preview_every: int = 0
    inpaint: Any = None  # a pipelines.inpaint.LatentMask: the mask's loop hooks (with init_latents)


@dataclass
class StageResult:
    latents: torch.Tensor
    stats: LoopStats = field(default_factory=LoopStats)


def _encoder_for(model, clip_skip: int) -> PromptEncoder:
    return PromptEncoder(model.tokenizers, model.text_encoders, sdxl=model.is_sdxl, clip_skip=clip_skip)


def build_conditioning(model, spec: StageSpec, cache: PromptCache, steps: int) -> Callable[[int], Conditioning]:
    """Per-step conditioning: prompt scheduling resolved per step, every distinct text encoded once (cached)."""
    enc = _encoder_for(model, spec.clip_skip)
    pos = prompts_per_step(spec.prompt, steps)
    neg = prompts_per_step(spec.negative_prompt, steps)
    distinct = sorted(set(pos) | set(neg))
    chunks = max(enc.chunk_count(t) for t in distinct)
    base_key = (model.name, model.loras, spec.emphasis, spec.clip_skip, chunks)

    def encode(text: str):
        return cache.get((*base_key, text), lambda: enc.encode(text, emphasis=spec.emphasis, min_chunks=chunks))

    encoded = {t: encode(t) for t in distinct}
    time_ids = None
    if model.is_sdxl:
        h, w = spec.height, spec.width
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=model.dtype, device=model.device)
    conds: dict[tuple[str, str], Conditioning] = {}

    def at(step: int) -> Conditioning:
        key = (pos[step], neg[step])
        if key not in conds:
            c, u = encoded[key[0]], encoded[key[1]]
            conds[key] = Conditioning(
                cond=c.embeds.to(model.device, model.dtype), uncond=u.embeds.to(model.device, model.dtype),
                cond_pooled=None if c.pooled is None else c.pooled.to(model.device, model.dtype),
                uncond_pooled=None if u.pooled is None else u.pooled.to(model.device, model.dtype),
                time_ids=time_ids)
        return conds[key]

    return at


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


def run_stage(model, spec: StageSpec, *, cache: PromptCache, callback: Callable[[StepInfo], None] | None = None,
              cancel=None, stats: LoopStats | None = None, unet=None) -> StageResult:
    """Run one txt2img/img2img stage and return the final latents (not decoded)."""
    stats = stats if stats is not None else LoopStats()
    device, dtype = model.device, model.dtype
    sched = make_scheduler(spec.sampler, model.pipe.scheduler.config)
    timesteps = _timesteps(sched, spec, device)
    latent_shape = (model.vae.config.latent_channels, spec.height // model.vae_scale, spec.width // model.vae_scale)
    noise, gens = initial_noise(spec.seeds, latent_shape, device, dtype)
    if spec.init_latents is None:
        latents = noise * sched.init_noise_sigma
    else:
        init = spec.init_latents.to(device, dtype).expand(len(spec.seeds), -1, -1, -1)
        if not timesteps:
            return StageResult(init.clone(), stats)
        start = init if spec.inpaint is None else spec.inpaint.start_latents(init)  # A1111's masked content
        latents = sched.add_noise(start, noise, timesteps[0].reshape(1).repeat(len(spec.seeds)))
    schedule = parse_cfg(spec.cfg)
    inp = LoopInputs(
        unet=unet or model.unet, scheduler=sched, latents=latents, timesteps=timesteps,
        conditioning=build_conditioning(model, spec, cache, len(timesteps)),
        scales=scales_for_steps(schedule, len(timesteps)), rescale=schedule.rescale, tiles=spec.tiles,
        control=spec.control, generators=gens if _step_accepts_generator(sched) else None,
        seed=int(spec.seeds[0]), callback=callback, cancel=cancel, vae_scale=model.vae_scale,
        **({} if spec.inpaint is None else spec.inpaint.hooks(sched, timesteps, init, noise)),
    )
    return StageResult(denoise(inp, stats), stats)
