"""SDXL's empty negative prompt: zero embeddings exactly where diffusers' default call uses them.

diffusers' `StableDiffusionXLPipeline.encode_prompt` zeroes the negative embeddings and the negative pooled
embedding when `negative_prompt is None` and the pipeline config sets `force_zeros_for_empty_prompt` (SDXL base
does); a given negative text, even "", is encoded. The app's empty negative is diffusers' default call (no
negative), so it must give diffusers' `negative_prompt=None` image; a real negative must give the image of that
negative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.denoise.schedulers import make_scheduler
from pipelines.denoise.stages import PromptCache, StageSpec, build_conditioning, initial_noise, zeros_for_empty_negative

SAMPLER = "DPM++ 2M"


@pytest.fixture(scope="module")
def sdxl(manager):
    return manager.get("tiny-sdxl")


def _diffusers(model, prompt: str, negative: str | None, *, seed: int, size: int, steps: int, cfg: float):
    """diffusers' own SDXL call on the app's components, scheduler config and initial noise."""
    from diffusers import StableDiffusionXLPipeline

    parts = {k: v for k, v in model.pipe.components.items() if k != "scheduler"}
    pipe = StableDiffusionXLPipeline(**parts, scheduler=make_scheduler(SAMPLER, model.pipe.scheduler.config),
                                     force_zeros_for_empty_prompt=model.pipe.config.force_zeros_for_empty_prompt,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    shape = (model.unet.config.in_channels, size // model.vae_scale, size // model.vae_scale)
    latents = initial_noise([seed], shape, model.device, model.dtype)[0]
    out = pipe(prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
               guidance_scale=cfg, latents=latents)
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


def _app(engine, req_factory, negative: str, *, seed: int, size: int, steps: int, cfg: float):
    req = req_factory(model="tiny-sdxl", prompt="a lighthouse at dusk", negative_prompt=negative, width=size,
                      height=size, steps=steps, cfg=str(cfg), sampler=SAMPLER, seed=seed)
    return np.asarray(engine.generate(req, save=False).images[0].convert("RGB"), dtype=np.int16)


def test_tiny_sdxl_config_forces_zeros_like_sdxl_base(sdxl):
    assert sdxl.pipe.config.force_zeros_for_empty_prompt is True


@pytest.mark.parametrize(("negative", "theirs"), [("", None), ("blurry, low quality", "blurry, low quality")])
def test_engine_equals_diffusers_sdxl_pipeline(engine, req_factory, sdxl, negative, theirs):
    """Same components, sampler, CFG and noise: the app's image is diffusers' (float rounding at most)."""
    kw = dict(seed=5, size=64, steps=4, cfg=7.0)
    ours = _app(engine, req_factory, negative, **kw)
    ref = _diffusers(sdxl, "a lighthouse at dusk", theirs, **kw)
    assert np.abs(ours - ref).max() <= 1
    # diffusers' image for the *encoded* "" is a different image: the comparison can tell the two apart
    if negative == "":
        encoded_empty = _diffusers(sdxl, "a lighthouse at dusk", "", **kw)
        assert np.abs(ours - encoded_empty).max() > 8


def test_empty_sdxl_negative_is_zeros_and_cached_apart(sdxl):
    cache = PromptCache()
    spec = StageSpec(prompt="a fox", negative_prompt="", width=64, height=64, steps=2, sampler=SAMPLER, cfg="7",
                     seeds=[1])
    cond = build_conditioning(sdxl, spec, cache, 2)(0)
    assert torch.count_nonzero(cond.uncond) == 0 and torch.count_nonzero(cond.uncond_pooled) == 0
    assert cond.uncond.shape == cond.cond.shape and cond.uncond_pooled.shape == cond.cond_pooled.shape
    # the text "" as a positive prompt is still encoded (and its cache entry is not the zeros)
    both_empty = build_conditioning(sdxl, StageSpec(**{**spec.__dict__, "prompt": ""}), cache, 2)(0)
    assert torch.count_nonzero(both_empty.cond) > 0 and torch.count_nonzero(both_empty.uncond) == 0
    real = build_conditioning(sdxl, StageSpec(**{**spec.__dict__, "negative_prompt": " "}), cache, 2)(0)
    assert torch.count_nonzero(real.uncond) > 0


def test_zeros_only_for_sdxl_with_the_flag(manager, sdxl):
    assert zeros_for_empty_negative(sdxl, "") and not zeros_for_empty_negative(sdxl, "x")
    assert not zeros_for_empty_negative(manager.get("tiny"), "")  # SD 1.x encodes "" (diffusers and A1111)
