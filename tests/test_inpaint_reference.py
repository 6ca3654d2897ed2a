"""Inpainting through `Engine.generate` against diffusers' own inpainting pipelines on the same components.

The reference is `StableDiffusionInpaintPipeline` (`StableDiffusionXLInpaintPipeline` for SDXL): with a 9-channel
inpainting UNet it feeds `[latents, mask, masked-image latents]`; with a regular 4-channel UNet the same pipeline
blends the original latents, noised to the next timestep, outside the mask after every step. At strength 1.0 it
starts from pure noise (`is_strength_max`), below 1.0 from the image's latents noised to the first timestep.

Both sides get the same image, mask (8 px aligned: diffusers' latent mask is a nearest resize, ours a max-pool,
equal only there), DDIM scheduler config and seed. diffusers samples the VAE's latent distribution when it
encodes and draws its noise after that from the same generator; the app encodes with the distribution's mode, so
the reference's `retrieve_latents` is set to the mode too, and its noise is then the app's noise (one CPU
generator seeded `seed`). Steps: the app's `steps` at strength s run `steps` steps of a longer schedule (A1111's
and ComfyUI's meaning); diffusers runs `int(n * s)` steps of an `n`-step schedule, so `n` is that longer
schedule's length (`img2img_schedule`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.denoise.schedulers import make_scheduler
from pipelines.denoise.stages import img2img_schedule
from pipelines.request.schema import GenerationRequest, InpaintConfig
from pipelines.vae import io as vae_io

SEED, STEPS, SAMPLER = 5, 4, "DDIM"
MASK_BOX = (16, 8, 47, 39)  # inclusive: pixels 16..47 x 8..39, whole 8 px latent cells
MODELS = ["tiny", "tiny-inpaint", "tiny-sdxl", "tiny-sdxl-inpaint"]


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 64, dtype=np.float32)[None, :, None].repeat(64, 0).repeat(3, 2)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8))


def _mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle(MASK_BOX, fill=255)
    return mask


@pytest.fixture
def mode_encoding(monkeypatch):
    """diffusers' inpainting pipelines encode with the latent distribution's mode, like the app."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as sd
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as sdxl

    for module in (sd, sdxl):
        original = module.retrieve_latents
        monkeypatch.setattr(module, "retrieve_latents",
                            lambda out, generator=None, sample_mode="sample", f=original: f(out, generator, "argmax"))


def _reference(model, image: Image.Image, strength: float) -> torch.Tensor:
    """diffusers' final latents (scaled, before decoding)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    parts = {k: v for k, v in model.pipe.components.items() if k != "scheduler"}
    scheduler = make_scheduler(SAMPLER, model.pipe.scheduler.config)
    if "text_encoder_2" in parts:
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        pipe = StableDiffusionXLInpaintPipeline(**parts, scheduler=scheduler, requires_aesthetics_score=False,
                                                force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionInpaintPipeline(**parts, scheduler=scheduler, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    total, run = img2img_schedule(STEPS, strength)
    assert int(total * strength) == run  # the same steps of the same schedule
    out = pipe("a fox", negative_prompt="blur", image=image, mask_image=_mask(), height=64, width=64,
               num_inference_steps=total, strength=strength, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent")
    return out.images


def _app(engine, model, monkeypatch, name: str, image: Image.Image, strength: float
         ) -> tuple[torch.Tensor, Image.Image]:
    """The app's final latents (what it hands the VAE decoder, scaled back) and its saved image."""
    seen: list[torch.Tensor] = []
    decode = vae_io.decode

    def spy(m, latents, **kw):
        seen.append(latents.detach().clone())
        return decode(m, latents, **kw)

    monkeypatch.setattr(vae_io, "decode", spy)
    req = GenerationRequest(model=name, prompt="a fox", negative_prompt="blur", width=64, height=64, steps=STEPS,
                            sampler=SAMPLER, cfg="7.5", seed=SEED, init_image=image, mask=_mask(),
                            strength=strength, inpaint=InpaintConfig(mask_blur=0))
    res = engine.generate(req, save=False)
    monkeypatch.setattr(vae_io, "decode", decode)
    assert len(seen) == 1
    return seen[0], res.images[0]


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("name", MODELS)
def test_engine_inpaint_equals_diffusers_inpaint_pipeline(engine, manager, monkeypatch, mode_encoding, name,
                                                          strength):
    model = manager.get(name)
    assert model.unet.config.in_channels == (9 if name.endswith("inpaint") else 4)
    image = _image()
    ours, picture = _app(engine, model, monkeypatch, name, image, strength)
    theirs = _reference(model, image, strength)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # outside the mask the 4-channel blend ends on the original latents; the app's picture is the original there
    src, out = np.asarray(image), np.asarray(picture)
    keep = np.asarray(_mask()) == 0
    assert np.array_equal(out[keep], src[keep])
    assert (out[~keep] != src[~keep]).mean() > 0.5


@pytest.mark.parametrize("name", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_tiny_inpainting_models_use_the_masked_image(engine, manager, monkeypatch, name):
    """The comparison above can fail: the tiny 9-channel UNets' mask and masked-image channels change the result,
    so another image (same mask) gives other latents inside the mask, at strength 1.0 too."""
    model = manager.get(name)
    a, _ = _app(engine, model, monkeypatch, name, _image(0), 1.0)
    b, _ = _app(engine, model, monkeypatch, name, _image(1), 1.0)
    inside = (a - b)[..., 1:5, 2:6].abs().mean().item()
    assert inside > 0.01, inside  # float rounding alone: ~1e-6
    w = model.unet.conv_in.weight
    assert w[:, 4:].abs().mean() > 0.3 * w[:, :4].abs().mean()

