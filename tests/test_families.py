"""The model-family seam (`pipelines.families`): a family is one module, and a new one works through the whole
engine with no edit elsewhere.

The test family below is an SD 1.x variant that differs where a real new family would: how it is recognised
(`matches_pipeline`), the planner's constants (`costs`: a 16 latent-px default tile), and its conditioning rule (an
empty negative is zero embeddings, as SDXL base does). `Engine.generate` on a folder model it recognises must show
all three, and the image must equal diffusers' own pipeline given those zero negative embeddings.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipelines.denoise.schedulers import make_scheduler
from pipelines.denoise.stages import initial_noise
from pipelines.engine import Engine
from pipelines.families import registry, sd1, sdxl
from pipelines.families.base import Costs
from pipelines.models.manager import ModelManager
from pipelines.request.schema import TileConfig

SAMPLER = "Euler"


class EchoFamily(sd1.SD1):
    """A test family: SD 1.x components, its own id, planner constants and empty-negative rule."""

    name = "echo"
    label = "Echo (test)"
    costs = Costs((0.86e9, 84e6, 123e6), 80e3, 16)

    def matches_pipeline(self, pipe) -> bool:
        return "echo-family" in str(getattr(pipe, "name_or_path", ""))

    def zeros_for_empty_negative(self, pipe_config, negative_prompt: str) -> bool:
        return negative_prompt == ""


@pytest.fixture
def echo_engine(monkeypatch, tiny_dir, tmp_path):
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))  # registered for this test only
    registry.register(EchoFamily())
    models = tmp_path / "models"
    shutil.copytree(tiny_dir, models / "echo-family")
    return Engine(ModelManager(models, device="cpu", dtype="fp32"), None)


def _diffusers_with_zero_negative(model, prompt: str, *, seed: int, size: int, steps: int, cfg: float):
    from diffusers import StableDiffusionPipeline

    parts = {k: v for k, v in model.pipe.components.items() if k != "scheduler"}
    pipe = StableDiffusionPipeline(**parts, scheduler=make_scheduler(SAMPLER, model.pipe.scheduler.config),
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(prompt, model.device, 1, False)
    shape = (model.unet.config.in_channels, size // model.vae_scale, size // model.vae_scale)
    latents = initial_noise([seed], shape, model.device, model.dtype)[0]
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), height=size, width=size,
               num_inference_steps=steps, guidance_scale=cfg, latents=latents)
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


def test_a_family_added_through_the_registry_runs_through_engine_generate(echo_engine, req_factory):
    base = dict(model="echo-family", prompt="a lighthouse at dusk", negative_prompt="", width=64, height=64, steps=3,
                cfg="7", sampler=SAMPLER, seed=11)
    tiled = echo_engine.generate(req_factory(**base, tiling=TileConfig(mode="on")), save=False)
    model = echo_engine.manager.current
    assert model.family == "echo" and model.spec.label == "Echo (test)"  # recognised by its own rule
    assert "tiles of 16² latent" in tiled.stats["plan"]  # the planner read the family's constants
    ours = np.asarray(echo_engine.generate(req_factory(**base), save=False).images[0].convert("RGB"), dtype=np.int16)
    ref = _diffusers_with_zero_negative(model, "a lighthouse at dusk", seed=11, size=64, steps=3, cfg=7.0)
    assert np.abs(ours - ref).max() <= 1  # its empty-negative rule reached the conditioning ...
    sd1_engine = Engine(ModelManager(echo_engine.manager.models_dir, device="cpu", dtype="fp32"), None)
    registry.FAMILIES.pop("echo")
    as_sd1 = np.asarray(sd1_engine.generate(req_factory(**base), save=False).images[0].convert("RGB"), np.int16)
    assert sd1_engine.manager.current.family == "sd1"
    assert np.abs(as_sd1 - ref).max() > 8  # ... and SD 1.x's rule (the encoded "") gives another image


def test_the_built_in_families_are_recognised_from_checkpoint_names_and_pipelines():
    assert registry.family_of_checkpoint(["conditioner.embedders.1.model.x", "model.diffusion_model.y"], "f").name \
        == "sdxl"
    assert registry.family_of_checkpoint(["cond_stage_model.model.x", "model.diffusion_model.y"], "f").name == "sd2"
    assert registry.family_of_checkpoint(["model.diffusion_model.y"], "f").name == "sd1"
    assert sdxl.FAMILY.added_conditioning(640, 512) == [512, 640, 0, 0, 512, 640]  # diffusers' add_time_ids order
    assert sd1.FAMILY.added_conditioning(640, 512) is None
