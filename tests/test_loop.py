"""The shared denoising loop with spy and closed-form models: guidance schedules, tiling, ControlNet windows."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipelines.denoise.loop import ControlInput, TileSpec
from pipelines.denoise.schedulers import sampler_names
from pipelines.denoise.stages import StageSpec, run_stage
from pipelines.request.cfg import parse_cfg, scales_for_steps
from tests.conftest import stage_spec


class PointwiseUNet:
    """Closed-form stand-in with the UNet call signature: output at a pixel depends only on that pixel.

    out = a(t) * x + b * mean(text embedding) (+ control residual mean), so CFG and prompts matter, but
    tiled and untiled runs must agree to float precision.
    """

    def __init__(self, in_channels: int = 4):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(in_channels, in_channels, generator=g) * 0.1 + torch.eye(in_channels) * 0.5
        self.calls: list[dict] = []
        self.dtype = torch.float32

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        self.calls.append({"batch": sample.shape[0], "t": timestep, "enc": encoder_hidden_states.clone(),
                           "down": down_block_additional_residuals, "shape": tuple(sample.shape)})
        text = encoder_hidden_states.float().mean(dim=(1, 2))[:, None, None, None]
        a = 0.5 + 0.4 * torch.cos(torch.as_tensor(timestep, dtype=torch.float32) / 300.0)
        out = torch.einsum("bchw,cd->bdhw", sample.float(), self.mix) * a + 0.3 * text
        if down_block_additional_residuals is not None:
            out = out + down_block_additional_residuals[0].float().mean(dim=1, keepdim=True)[..., :1, :1]
        return (out.to(sample.dtype),)


_spec = partial(stage_spec, steps=6)


def test_schedule_followed_and_scale_one_steps_make_one_pass(tiny, engine):
    spy = PointwiseUNet()
    spec = _spec(steps=10, cfg="interval(7,0.3,0.6)")
    res = run_stage(tiny, spec, cache=engine.prompt_cache, unet=spy)
    expected = scales_for_steps(parse_cfg(spec.cfg), 10)
    assert res.stats.scales == expected
    batches = [c["batch"] for c in spy.calls]
    assert batches == [2 if s != 1.0 else 1 for s in expected]
    assert res.stats.evals_saved == sum(1 for s in expected if s == 1.0) > 0
    assert res.stats.unet_evals == sum(batches)


@pytest.mark.parametrize("cfg", ["linear(3,9)", "cosine(9,4)", "step(9,5,0.5)"])
def test_scales_per_step_match_schedule(tiny, engine, cfg):
    res = run_stage(tiny, _spec(cfg=cfg, steps=7), cache=engine.prompt_cache, unet=PointwiseUNet())
    assert res.stats.scales == pytest.approx(scales_for_steps(parse_cfg(cfg), 7), abs=0)


def test_rescale_zero_equals_plain_cfg_and_constant_equals_flat_schedule(tiny, engine):
    plain = run_stage(tiny, _spec(cfg="7"), cache=engine.prompt_cache).latents
    phi0 = run_stage(tiny, _spec(cfg="7, rescale=0"), cache=engine.prompt_cache).latents
    flat = run_stage(tiny, _spec(cfg="linear(7,7)"), cache=engine.prompt_cache).latents
    assert torch.equal(plain, phi0) and torch.equal(plain, flat)
    resc = run_stage(tiny, _spec(cfg="7, rescale=0.7"), cache=engine.prompt_cache).latents
    assert not torch.equal(plain, resc)


def test_constant_cfg_equals_diffusers_pipeline_bit_for_bit(tiny, engine):
    """Our loop with a constant schedule == diffusers' StableDiffusionPipeline from the same components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines.denoise.stages import initial_noise

    spec = _spec(steps=5, cfg="7.5")
    ours = run_stage(tiny, spec, cache=engine.prompt_cache).latents
    pipe = StableDiffusionPipeline(**{k: v for k, v in tiny.pipe.components.items()})
    pipe.scheduler = DDIMScheduler.from_config(tiny.pipe.scheduler.config, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    noise, _ = initial_noise([3], (4, 8, 8), "cpu", torch.float32)
    theirs = pipe("a fox", negative_prompt="blur", num_inference_steps=5, guidance_scale=7.5, latents=noise,
                  output_type="latent", height=64, width=64).images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.mark.parametrize("sampler", sampler_names())
@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_tiled_equals_untiled_for_pointwise_model(tiny, engine, sampler, blend):
    """MultiDiffusion blending of a pointwise model is exact; odd 2000x1048 canvas, grid shifting on."""
    spec = _spec(width=2000, height=1048, steps=4, sampler=sampler, cfg="6, rescale=0.5", seeds=[11])
    untiled = run_stage(tiny, spec, cache=engine.prompt_cache, unet=PointwiseUNet()).latents
    tiles = TileSpec(size=64, overlap=16, blend=blend, batch=3, shift=True)
    spy = PointwiseUNet()
    tiled = run_stage(tiny, StageSpec(**{**spec.__dict__, "tiles": tiles}), cache=engine.prompt_cache, unet=spy)
    assert tiled.stats.tiles_per_step > 1
    assert max(c["shape"][-1] for c in spy.calls) == 64  # really tiled
    torch.testing.assert_close(tiled.latents, untiled, atol=2e-5, rtol=1e-5)


def test_one_tile_covering_canvas_is_bit_identical_with_real_unet(tiny, engine):
    spec = _spec(width=96, height=64, steps=3, sampler="Euler a")
    untiled = run_stage(tiny, spec, cache=engine.prompt_cache).latents
    tiled = run_stage(tiny, StageSpec(**{**spec.__dict__, "tiles": TileSpec(size=16, overlap=4, batch=2)}),
                      cache=engine.prompt_cache).latents
    assert torch.equal(untiled, tiled)


class SpyControlNet:
    """ControlNet stand-in: records each call's control crop and returns constant residuals."""

    dtype = torch.float32

    def __init__(self):
        self.crops: list[torch.Tensor] = []
        self.steps_called: list = []

    def __call__(self, sample, t, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                 guess_mode=False, added_cond_kwargs=None, return_dict=False):
        self.crops.append(controlnet_cond.clone())
        self.steps_called.append(t)
        res = torch.full_like(sample, 0.05 * conditioning_scale)
        return [res], res


def test_control_window_and_scale_zero(tiny, engine):
    img = torch.rand(1, 3, 64, 64)
    base = run_stage(tiny, _spec(steps=8), cache=engine.prompt_cache, unet=PointwiseUNet()).latents
    zero = SpyControlNet()
    out0 = run_stage(tiny, _spec(steps=8, control=[ControlInput(zero, img, scale=0.0)]), cache=engine.prompt_cache,
                     unet=PointwiseUNet()).latents
    assert torch.equal(out0, base) and zero.crops == []
    empty = SpyControlNet()
    out_e = run_stage(tiny, _spec(steps=8, control=[ControlInput(empty, img, scale=1.0, start=0.5, end=0.5)]),
                      cache=engine.prompt_cache, unet=PointwiseUNet()).latents
    assert torch.equal(out_e, base) and empty.crops == []
    window = SpyControlNet()
    unet = PointwiseUNet()
    out_w = run_stage(tiny, _spec(steps=8, control=[ControlInput(window, img, scale=1.0, start=0.25, end=0.75)]),
                      cache=engine.prompt_cache, unet=unet).latents
    assert not torch.equal(out_w, base)
    applied = [i for i, c in enumerate(unet.calls) if c["down"] is not None]
    assert applied == [2, 3, 4, 5]  # steps i with 0.25 <= i/8 < 0.75
    assert len(window.crops) == 4


def test_tiled_control_crops_match_the_map_under_each_tile(tiny, engine):
    h, w = 96, 160
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / h
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / w
    coord = torch.stack([ys, xs, torch.zeros(h, w)])[None]  # pixels encode their own coordinates
    spy = SpyControlNet()
    tiles = TileSpec(size=8, overlap=2, blend="gaussian", batch=1)
    run_stage(tiny, _spec(width=w, height=h, steps=1, tiles=tiles, control=[ControlInput(spy, coord)]),
              cache=engine.prompt_cache, unet=PointwiseUNet())
    from pipelines.tiling import plan_tiles

    plan = plan_tiles(h // 8, w // 8, 8, 2)
    assert len(spy.crops) == len(plan)
    for crop, t in zip(spy.crops, plan):
        expect = coord[..., t.y * 8:(t.y + t.h) * 8, t.x * 8:(t.x + t.w) * 8]
        assert crop.shape[-2:] == (64, 64)
        assert torch.equal(crop[:1], expect), f"tile {t} got the wrong control region"


def test_guess_mode_controls_only_the_conditional_half(tiny, engine):
    spy = SpyControlNet()
    unet = PointwiseUNet()
    run_stage(tiny, _spec(steps=2, control=[ControlInput(spy, torch.rand(1, 3, 64, 64), guess_mode=True)]),
              cache=engine.prompt_cache, unet=unet)
    down = unet.calls[0]["down"][0]
    assert down.shape[0] == 2 and torch.all(down[0] == 0) and torch.all(down[1] != 0)
