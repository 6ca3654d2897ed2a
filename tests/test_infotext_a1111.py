"""Infotext that A1111 reads as we mean it: an inpainting run's strength, an only-masked run's Size, no VAE key
(A1111 pastes `VAE` as the VAE file to load); our own older texts are still read as they were written."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from pipelines.a1111 import HIRES_DENOISE_KEY, parse_infotext
from pipelines.denoise.loop import LoopStats
from pipelines.metadata import VERSION, infotext, request_from_infotext
from pipelines.outputs import image_notes
from pipelines.request.schema import GenerationRequest, HiresConfig, InpaintConfig, flatten
from pipelines.vae.io import DecodeReport


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w: int, h: int, box) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _same_fields(a: GenerationRequest, b: GenerationRequest) -> None:
    assert flatten(a) == flatten(b)


def test_inpaint_with_hires_writes_the_inpaint_strength_as_denoising_strength(engine):
    """A1111's img2img tab reads "Denoising strength" as the strength the image was inpainted at (0.6), never the
    hires refine's (0.3); the hires one goes under our own key, and the request reads back whole."""
    req = GenerationRequest(model="tiny", prompt="a fox", width=64, height=64, steps=1, seed=3,
                            init_image=_image(64, 64), mask=_mask(64, 64, (16, 16, 47, 47)), strength=0.6,
                            hires=HiresConfig(scale=1.5, upscaler="lanczos", denoise=0.3, steps=1))
    res = engine.generate(req, save=False)
    text = res.infotexts[0]
    params = parse_infotext(text)
    assert params["Denoising strength"] == "0.6"
    assert params[HIRES_DENOISE_KEY] == "0.3"
    assert params["Hires upscale"] == "1.5" and params["Version"] == VERSION
    assert "strength" not in params.get("Tessera", "") and "hires_denoise" not in params.get("Tessera", "")
    back = request_from_infotext(text)
    assert (back.strength, back.hires.denoise, back.hires.scale) == (0.6, 0.3, 1.5)
    _same_fields(back, replace(res.request, init_image=None, mask=None))


def test_txt2img_hires_keeps_a1111s_denoising_strength():
    req = GenerationRequest(prompt="p", hires=HiresConfig(scale=2.0, upscaler="lanczos", denoise=0.35))
    params = parse_infotext(infotext(req, seed=1, model_hash=""))
    assert params["Denoising strength"] == "0.35" and HIRES_DENOISE_KEY not in params
    assert request_from_infotext(infotext(req, seed=1, model_hash="")) == replace(req, seed=1)


def test_img2img_with_hires_is_a1111s_img2img_too():
    req = GenerationRequest(prompt="p", init_image=_image(64, 64), strength=0.5,
                            hires=HiresConfig(scale=2.0, upscaler="lanczos", denoise=0.25))
    params = parse_infotext(infotext(req, seed=1, model_hash=""))
    assert (params["Denoising strength"], params[HIRES_DENOISE_KEY]) == ("0.5", "0.25")
    back = request_from_infotext(infotext(req, seed=1, model_hash=""))
    assert (back.strength, back.hires.denoise) == (0.5, 0.25)


def test_older_tessera_text_with_hires_denoise_as_denoising_strength_still_reads():
    """tessera-0.1 wrote the hires denoise as "Denoising strength" and the strength in its JSON."""
    old = ("a fox\nSteps: 1, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 64x64, "
           "Denoising strength: 0.3, Hires upscale: 1.5, Hires steps: 1, Hires upscaler: Lanczos, Mask blur: 4, "
           "Inpaint area: Whole picture, Masked content: original, Mask mode: Inpaint masked, "
           'VAE: fp32 VAE fallback, Version: tessera-0.1, Tessera: "{\\"strength\\":0.6}"')
    back = request_from_infotext(old)
    assert (back.strength, back.hires.denoise, back.width) == (0.6, 0.3, 64)


def test_decoder_notes_are_not_a1111s_vae_key():
    report = DecodeReport(notes=["fp32 VAE fallback"])
    notes = image_notes(SimpleNamespace(tiled=False), LoopStats(), report, None)
    assert notes == {"VAE notes": "fp32 VAE fallback"}
    params = parse_infotext(infotext(GenerationRequest(prompt="p"), seed=1, model_hash="", extra=notes))
    assert "VAE" not in params and params["VAE notes"] == "fp32 VAE fallback"


def test_only_masked_size_is_the_processing_size(engine):
    """As in A1111, `Size` of an only-masked image is the size its crop was inpainted at; the output size (our
    width x height) reads back from the Tessera key."""
    req = GenerationRequest(model="tiny", prompt="a fox", width=256, height=128, steps=1, seed=3,
                            init_image=_image(256, 128), mask=_mask(256, 128, (100, 40, 139, 63)), strength=0.8,
                            inpaint=InpaintConfig(inpaint_area="only masked", inpaint_padding=8, mask_blur=0))
    res = engine.generate(req, save=False)
    assert res.images[0].size == (256, 128)
    params = parse_infotext(res.infotexts[0])
    w, h = (int(v) for v in params["Size"].split("x"))
    assert max(w, h) == 64 and (w, h) != (256, 128)  # the tiny model's native 64 px long side, the crop's aspect
    back = request_from_infotext(res.infotexts[0])
    _same_fields(back, replace(res.request, init_image=None, mask=None))
    assert (back.width, back.height, back.inpaint.inpaint_size) == (256, 128, None)


def test_a1111_only_masked_size_sets_the_processing_size_not_the_output():
    """Reading A1111's only-masked PNG: its Size is not the image's, so it must not resize (distort) the image."""
    text = ("p\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x768, "
            "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, "
            "Version: v1.10.1")
    base = GenerationRequest(width=1024, height=640)
    back = request_from_infotext(text, base)
    assert (back.width, back.height) == (1024, 640)
    assert (back.inpaint.inpaint_area, back.inpaint.inpaint_size, back.strength) == ("only masked", 768, 0.75)
    whole = request_from_infotext(text.replace("Only masked", "Whole picture"), base)
    assert (whole.width, whole.height, whole.inpaint.inpaint_size) == (512, 768, None)


def test_older_tessera_only_masked_size_is_the_output_size():
    old = ("p\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 256x128, Denoising strength: 0.8, "
           "Mask blur: 0, Inpaint area: Only masked, Masked area padding: 8, Version: tessera-0.1")
    back = request_from_infotext(old)
    assert (back.width, back.height, back.inpaint.inpaint_size) == (256, 128, None)
