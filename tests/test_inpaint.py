"""Inpainting and outpainting (diffusers' inpainting pipelines as the reference: tests/test_inpaint_reference.py):
paste-back exactness, tile skipping, soft inpainting, outpainting, only-masked geometry (A1111's), bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.denoise.loop import LoopInputs, LoopStats, TileSpec, denoise
from pipelines.denoise.schedulers import make_scheduler
from pipelines.denoise.stages import StageSpec, run_stage
from pipelines.edit.inpaint import (
    LatentMask,
    composite,
    crop_region,
    expand_crop_region,
    frozen,
    latent_mask,
    load_mask,
    prepare_mask,
)
from pipelines.errors import ValidationError
from pipelines.images import from_pil
from pipelines.request.schema import GenerationRequest, InpaintConfig, TileConfig


class PointwiseUNet:
    """Output at a pixel depends only on that pixel (4 or 9 input channels, 4 out); records every input shape."""

    def __init__(self, in_channels: int = 4):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(in_channels, 4, generator=g) * 0.1
        self.mix[:4] += torch.eye(4) * 0.5
        self.shapes: list[tuple[int, ...]] = []
        self.dtype = torch.float32

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        self.shapes.append(tuple(sample.shape))
        text = encoder_hidden_states.float().mean(dim=(1, 2))[:, None, None, None]
        a = 0.5 + 0.4 * torch.cos(torch.as_tensor(timestep, dtype=torch.float32) / 300.0)
        return (torch.einsum("bchw,cd->bdhw", sample.float(), self.mix) * a + 0.3 * text,)


class SpyUNet:
    """The real UNet, recording its inputs."""

    def __init__(self, unet):
        self.unet, self.inputs = unet, []
        self.config, self.dtype = unet.config, unet.dtype

    def __call__(self, sample, *args, **kwargs):
        self.inputs.append(sample.detach().clone())
        return self.unet(sample, *args, **kwargs)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _rect_mask(w: int, h: int, box) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def tiny(manager):
    return manager.get("tiny")


@pytest.mark.parametrize("name", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_nine_channel_model_is_detected_and_gets_mask_and_masked_latents(manager, engine, name):
    model = manager.get(name)
    spy = SpyUNet(model.unet)
    mask = _rect_mask(64, 64, (0, 0, 31, 63))
    req = GenerationRequest(model=name, prompt="x", width=64, height=64, steps=2, seed=1, init_image=_image(64, 64),
                            mask=mask, strength=0.9, inpaint=InpaintConfig(mask_blur=0))
    engine.generate(req, unet=spy, save=False)
    assert [tuple(x.shape) for x in spy.inputs] == [(2, 9, 8, 8)] * 2
    x = spy.inputs[0]
    assert torch.equal(x[:, 4], latent_mask(mask, 8)[0, 0].expand(2, -1, -1))  # the mask channel
    from pipelines.vae import io as vae_io

    pixels = from_pil(_image(64, 64), 64, 64, "cpu", torch.float32)
    pixels[..., :32] = 0  # diffusers' masked image: image * (mask < 0.5)
    torch.testing.assert_close(x[:1, 5:], vae_io.encode(model, pixels), atol=1e-5, rtol=0)


def test_four_channel_model_gets_the_blend_not_extra_channels(tiny, engine):
    spy = SpyUNet(tiny.unet)
    mask = _rect_mask(64, 64, (32, 0, 63, 63))
    lm = LatentMask(latent_mask(mask, 8))
    spec = StageSpec(prompt="x", negative_prompt="", width=64, height=64, steps=3, sampler="DPM++ 2M Karras",
                     cfg="7", seeds=[2], init_latents=torch.randn(1, 4, 8, 8), strength=0.7, inpaint=lm)
    out = run_stage(tiny, spec, cache=engine.prompt_cache, unet=spy).latents
    assert {tuple(x.shape)[1] for x in spy.inputs} == {4}
    assert torch.equal(out[..., :4], spec.init_latents[..., :4])  # unmasked half: the original latents
    assert not torch.allclose(out[..., 4:], spec.init_latents[..., 4:], atol=1e-3)


@pytest.mark.parametrize("name,channels,decode", [("tiny", 4, "full"), ("tiny-inpaint", 9, "taesd")])
def test_unmasked_pixels_identical_at_2000x1048_tiled(manager, engine, name, channels, decode):
    """Both methods, whole picture (tiled, tiles skipped) and only masked: outside the blurred mask = input, with
    the full VAE and with TAESD decoding (the 2000x1048 decode costs most of this test's time)."""
    image = _image(2000, 1048, seed=3)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((900, 400, 1180, 690), fill=255)
    outside = np.asarray(prepare_mask(mask, blur=4, invert=False, soft=False)) == 0
    base = GenerationRequest(model=name, prompt="x", width=2000, height=1048, steps=1, seed=1, init_image=image,
                             mask=mask, strength=0.8, tiling=TileConfig(mode="on", size=64, overlap=16), vae_decode=decode)
    for area in ("whole picture", "only masked"):
        fake = PointwiseUNet(channels)
        res = engine.generate(replace(base, inpaint=InpaintConfig(inpaint_area=area)), unet=fake, save=False)
        out, src = np.asarray(res.images[0]), np.asarray(image)
        assert res.images[0].size == (2000, 1048)
        assert np.array_equal(out[outside], src[outside]), area
        assert (out[~outside] != src[~outside]).mean() > 0.5, area
        assert {s[1] for s in fake.shapes} == {channels}
        if area == "whole picture":
            assert "inpainting runs 6 of 15 tiles" in res.stats["plan"]
        else:
            assert fake.shapes[0][-2:] == (8, 8)  # the crop at the tiny model's native 64 px


def _loop(latents, init, noise, strength, tiles, sampler="DPM++ 2M Karras", steps=3, unet=None):
    sched = make_scheduler(sampler, {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                     "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    sched.set_timesteps(steps)
    ts = list(sched.timesteps)
    from pipelines.denoise.loop import Conditioning

    cond = Conditioning(torch.full((1, 4, 8), 0.2), torch.full((1, 4, 8), -0.1))
    stats = LoopStats()
    hooks = LatentMask(strength).hooks(sched, ts, init, noise) if strength is not None else {}
    inp = LoopInputs(unet=unet or PointwiseUNet(), scheduler=sched, latents=latents * sched.init_noise_sigma,
                     timesteps=ts, conditioning=lambda i: cond, scales=[6.0] * steps, tiles=tiles, **hooks)
    return denoise(inp, stats), stats


def test_tiled_inpaint_skips_unmasked_tiles_and_matches_the_untiled_crop():
    """256² mask in a 2048² image (latent 256², 32² masked): at most 1/4 of img2img's UNet evaluations, and the
    masked latents equal an untiled inpaint of a crop around the mask (pointwise model: float precision)."""
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 256, 256, generator=g), torch.randn(1, 4, 256, 256, generator=g)
    strength = torch.zeros(1, 1, 256, 256)
    strength[..., 100:132, 120:152] = 1.0
    tiles = TileSpec(size=64, overlap=16, batch=4)
    full, stats = _loop(noise, init, noise, strength, tiles)
    _, img2img = _loop(noise, init, noise, None, tiles)
    assert stats.unet_evals * 4 <= img2img.unet_evals
    assert stats.tiles_per_step < img2img.tiles_per_step == 25
    ys, xs = slice(84, 148), slice(104, 168)  # the mask plus 16 latent px
    crop, _ = _loop(noise[..., ys, xs], init[..., ys, xs], noise[..., ys, xs], strength[..., ys, xs], None)
    inside = strength[..., ys, xs].bool().expand_as(crop)
    torch.testing.assert_close(full[..., ys, xs][inside], crop[inside], atol=1e-5, rtol=1e-5)
    assert torch.equal(full[(strength == 0).expand_as(full)], init[(strength == 0).expand_as(init)])


def test_soft_inpainting_white_equals_plain_and_black_returns_the_input(tiny, engine):
    image = _image(64, 64, seed=4)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(strength, soft):
        spec = StageSpec(prompt="x", negative_prompt="", width=64, height=64, steps=4, sampler="Euler", cfg="7",
                         seeds=[2], init_latents=init, strength=0.8, inpaint=LatentMask(strength, soft=soft))
        return run_stage(tiny, spec, cache=engine.prompt_cache, unet=PointwiseUNet()).latents

    white, black = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    assert torch.equal(run(white, True), run(white, False))
    assert torch.equal(run(black, True), init)
    grey = torch.full((1, 1, 8, 8), 0.5)
    half = run(grey, True)
    assert not torch.equal(half, init) and not torch.equal(half, run(white, True))
    black_px = Image.new("L", (64, 64), 0)
    assert composite(image, _image(64, 64, seed=9), black_px).tobytes() == image.tobytes()


def test_differential_diffusion_thresholds():
    """A pixel of strength s is held before step k of n while s <= 1 - k/n (Levin & Fried 2023)."""
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert frozen(s, 1, 4).tolist() == [True, True, True, False]
    assert frozen(s, 2, 4).tolist() == [True, True, True, False]
    assert frozen(s, 3, 4).tolist() == [True, True, False, False]
    assert frozen(s, 4, 4).tolist() == [True, False, False, False]


def test_soft_mask_keeps_grey_levels_through_the_engine(tiny, engine):
    grey = Image.new("L", (64, 64), 128)
    req = GenerationRequest(model="tiny", prompt="x", width=64, height=64, steps=2, seed=1, init_image=_image(64, 64),
                            mask=grey, strength=0.9, inpaint=InpaintConfig(soft_inpainting=True, mask_blur=0))
    out = np.asarray(engine.generate(req, unet=PointwiseUNet(), save=False).images[0], dtype=np.float32)
    src = np.asarray(_image(64, 64), dtype=np.float32)
    assert np.abs(out - src).mean() > 0
    with pytest.raises(ValidationError, match="all black"):
        engine.check(replace(req, mask=Image.new("L", (64, 64), 0)))


def test_outpaint_512_by_128_left_and_right(tiny, engine):
    image = _image(512, 512, seed=5)
    req = GenerationRequest(model="tiny", prompt="x", width=512, height=512, steps=1, seed=1, init_image=image,
                            strength=1.0, inpaint=InpaintConfig(outpaint_left=128, outpaint_right=128))
    res = engine.generate(req, unet=PointwiseUNet(), save=False)
    out = np.asarray(res.images[0])
    assert res.images[0].size == (768, 512)
    assert np.array_equal(out[:, 128:640], np.asarray(image))
    assert np.abs(out[:, :120].astype(int) - out[:, 120:128].mean((0, 1))).mean() > 0  # the new area was made
    from pipelines.metadata import request_from_infotext

    back = request_from_infotext(res.infotexts[0])
    assert (back.inpaint.outpaint_left, back.inpaint.outpaint_right, back.width) == (128, 128, 512)


@pytest.mark.parametrize("content", ["fill", "latent noise", "latent nothing"])
def test_masked_content_changes_only_the_start(tiny, engine, content):
    mask = _rect_mask(64, 64, (16, 16, 47, 47))
    base = GenerationRequest(model="tiny", prompt="x", width=64, height=64, steps=2, seed=1, init_image=_image(64, 64),
                             mask=mask, strength=0.5, inpaint=InpaintConfig(mask_blur=2))
    plain = np.asarray(engine.generate(base, unet=PointwiseUNet(), save=False).images[0])
    other = engine.generate(replace(base, inpaint=replace(base.inpaint, masked_content=content)),
                            unet=PointwiseUNet(), save=False)
    out = np.asarray(other.images[0])
    outside = np.asarray(prepare_mask(mask, blur=2, invert=False, soft=False)) == 0
    assert np.array_equal(out[outside], plain[outside]) and not np.array_equal(out, plain)
    lm = LatentMask(latent_mask(mask, 8), content=content, seeds=[1])
    init = torch.ones(1, 4, 8, 8)
    start = lm.start_latents(init)
    assert torch.equal(start[..., :2, :], init[..., :2, :])
    if content == "latent nothing":
        assert torch.equal(start[..., 2:6, 2:6], torch.zeros(1, 4, 4, 4))


def test_mask_mode_not_masked_repaints_the_black_part(tiny, engine):
    mask = _rect_mask(64, 64, (0, 0, 31, 63))
    req = GenerationRequest(model="tiny", prompt="x", width=64, height=64, steps=2, seed=1, init_image=_image(64, 64),
                            mask=mask, strength=0.8, inpaint=InpaintConfig(mask_blur=0, mask_mode="inpaint not masked"))
    out = np.asarray(engine.generate(req, unet=PointwiseUNet(), save=False).images[0])
    src = np.asarray(_image(64, 64))
    assert np.array_equal(out[:, :32], src[:, :32]) and not np.array_equal(out[:, 32:], src[:, 32:])


def test_a1111_crop_geometry():
    """modules/masking.py: get_crop_region pads and clamps; expand_crop_region's docstring example (a 128x32 mask
    processed at 512x512 becomes 128x128)."""
    mask = _rect_mask(512, 512, (200, 300, 327, 331))  # 128 x 32 px
    box = crop_region(mask, 0)
    assert box == (200, 300, 328, 332)
    assert expand_crop_region(box, 512, 512, 512, 512) == (200, 252, 328, 380)
    assert crop_region(mask, 32) == (168, 268, 360, 364)
    assert expand_crop_region((0, 490, 128, 512), 512, 512, 512, 512) == (0, 384, 128, 512)  # moved inside
    assert crop_region(Image.new("L", (64, 64), 0), 8) is None


def test_paste_back_is_exact_outside_and_feathered_inside():
    original, generated = _image(96, 64, 1), _image(96, 64, 2)
    blurred = prepare_mask(_rect_mask(96, 64, (30, 20, 60, 40)), blur=6, invert=False, soft=False)
    out = np.asarray(composite(original, generated, blurred)).astype(int)
    m = np.asarray(blurred)
    o, g = np.asarray(original).astype(int), np.asarray(generated).astype(int)
    assert np.array_equal(out[m == 0], o[m == 0]) and np.array_equal(out[m == 255], g[m == 255])
    part = (m > 20) & (m < 235)
    assert part.any() and (np.abs(out[part] - o[part]) <= np.abs(g[part] - o[part]) + 1).all()


@pytest.mark.parametrize("change,match", [
    ({"mask": Image.new("L", (32, 32), 255)}, "must have the image's size 64x64"),
    ({"mask": Image.new("L", (64, 64), 0)}, "all black"),
    ({"init_image": None}, "`init_image` is required to inpaint"),
    ({"init_image": None, "mask": None, "inpaint": InpaintConfig(outpaint_top=64)}, "`outpaint_top` needs an init"),
    ({"inpaint": InpaintConfig(outpaint_left=8200)}, "outpaint_left"),
    ({"inpaint": InpaintConfig(outpaint_right=4096, outpaint_left=4096)}, "over the 8192px"),
    ({"inpaint": InpaintConfig(outpaint_top=12)}, "multiple of 8"),
    ({"inpaint": InpaintConfig(masked_content="blur")}, "masked_content"),
    ({"inpaint": InpaintConfig(inpaint_area="face")}, "inpaint_area"),
    ({"inpaint": InpaintConfig(mask_blur=-1)}, "mask_blur"),
    ({"hires": replace(GenerationRequest().hires, scale=2.0, upscaler="latent")}, "must be a pixel upscaler"),
    ({"hires": replace(GenerationRequest().hires, scale=8.0), "inpaint": InpaintConfig(outpaint_left=1024)},
     "after outpainting"),
])
def test_bad_inpaint_input_gets_one_clear_message(engine, change, match):
    req = GenerationRequest(model="tiny", prompt="x", width=64, height=64, init_image=_image(64, 64),
                            mask=_rect_mask(64, 64, (8, 8, 20, 20)))
    with pytest.raises(ValidationError, match=match) as err:
        engine.check(replace(req, **change))
    assert "\n" not in str(err.value)


def test_a_mask_that_is_not_an_image_is_refused(tmp_path):
    bad = tmp_path / "mask.png"
    bad.write_text("not an image")
    with pytest.raises(ValidationError, match="`mask`"):
        load_mask(str(bad))
    assert load_mask(_rect_mask(16, 16, (0, 0, 7, 7))).mode == "L"


@pytest.mark.parametrize("config", [
    InpaintConfig(),
    InpaintConfig(mask_blur=9, masked_content="latent noise", inpaint_area="only masked", inpaint_padding=48,
                  inpaint_size=768, mask_mode="inpaint not masked", soft_inpainting=True),
    InpaintConfig(masked_content="fill", outpaint_left=64, outpaint_top=128),
    InpaintConfig(masked_content="latent nothing", mask_blur=0, outpaint_right=8, outpaint_bottom=16),
])
def test_metadata_round_trip_of_every_inpaint_option(config):
    from pipelines.a1111 import parse_infotext
    from pipelines.metadata import infotext, request_from_infotext

    req = GenerationRequest(model="tiny", prompt="fix the face", width=512, height=512, strength=0.6, seed=3,
                            mask=_rect_mask(8, 8, (0, 0, 3, 3)), inpaint=config)
    text = infotext(req, seed=3, model_hash="abc")
    params = parse_infotext(text)
    assert params["Mask blur"] == str(config.mask_blur) and params["Denoising strength"] == "0.6"
    assert params["Masked content"] == config.masked_content
    assert params["Inpaint area"] in ("Whole picture", "Only masked")
    assert ("Masked area padding" in params) == (config.inpaint_area == "only masked")
    back = request_from_infotext(text)
    assert back.inpaint == config and back.strength == 0.6 and back.mask is None


def test_a1111_inpaint_infotext_is_read():
    from pipelines.metadata import request_from_infotext

    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.75, "
            "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise, "
            "Mask mode: Inpaint not masked")
    req = request_from_infotext(text)
    assert req.inpaint == InpaintConfig(mask_blur=4, inpaint_area="only masked", inpaint_padding=32,
                                        masked_content="latent noise", mask_mode="inpaint not masked",
                                        inpaint_size=512)  # A1111's only-masked Size: the crop's processing size
    assert req.strength == 0.75


def test_controlnet_with_a_mask_gets_the_crop_for_only_masked(tiny, engine, monkeypatch):
    from pipelines.request.schema import ControlUnit

    image, mask = _image(128, 96, seed=6), _rect_mask(128, 96, (70, 40, 100, 70))
    import pipelines.job

    seen = []
    real = pipelines.job.prepare_units

    def recording(model, units, width, height, *args):
        seen.append(([u.image.size for u in units], (width, height)))
        return real(model, units, width, height, *args)

    monkeypatch.setattr(pipelines.job, "prepare_units", recording)
    req = GenerationRequest(model="tiny", prompt="x", width=128, height=96, steps=2, seed=1, init_image=image,
                            mask=mask, strength=0.8, control=(ControlUnit(image=image, type="none", scale=0.8),),
                            inpaint=InpaintConfig(inpaint_area="only masked", inpaint_padding=8))
    out = np.asarray(engine.generate(req, save=False).images[0])
    outside = np.asarray(prepare_mask(mask, blur=4, invert=False, soft=False)) == 0
    assert np.array_equal(out[outside], np.asarray(image)[outside])
    (crop_size,), processing = seen[-1]
    assert processing == (64, 64) and crop_size[0] == crop_size[1] < 128  # the square box around the mask


def test_hires_refine_repaints_under_the_scaled_mask(tiny, engine):
    """Inpaint at 64², upscale 2x (Lanczos), refine under the same mask at 128²: outside the scaled blurred mask
    the result is the Lanczos-upscaled input, inside it changed again."""
    from pipelines.request.schema import HiresConfig

    image, mask = _image(64, 64, seed=8), _rect_mask(64, 64, (16, 16, 40, 40))
    req = GenerationRequest(model="tiny", prompt="x", width=64, height=64, steps=2, seed=1, init_image=image,
                            mask=mask, strength=0.8, hires=HiresConfig(scale=2.0, upscaler="lanczos", denoise=0.5))
    res = engine.generate(req, unet=PointwiseUNet(), save=False)
    assert res.images[0].size == (128, 128)
    big_mask = prepare_mask(mask, blur=4, invert=False, soft=False).resize((128, 128), Image.BILINEAR)
    outside = np.asarray(prepare_mask(big_mask, blur=4, invert=False, soft=False)) == 0
    first = engine.generate(replace(req, hires=HiresConfig()), unet=PointwiseUNet(), save=False).images[0]
    upscaled = np.asarray(first.resize((128, 128), Image.LANCZOS))
    out = np.asarray(res.images[0])
    assert np.array_equal(out[outside], upscaled[outside]) and not np.array_equal(out[~outside], upscaled[~outside])
    assert "Hires upscale: 2" in res.infotexts[0] and "Mask blur: 4" in res.infotexts[0]
