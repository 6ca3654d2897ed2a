"""Feature caching (DeepCache): the split UNet against the model's own forward, closed-form cached runs, tiling,
pass counts against the schedule, and the request/metadata plumbing."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipelines.denoise.feature_cache import CacheSettings, full_steps, plan_passes
from pipelines.denoise.loop import TileSpec
from pipelines.denoise.stages import StageSpec, run_stage
from pipelines.denoise.unet_split import SplitUNet, branch_count, shallow_fraction
from pipelines.errors import ValidationError
from pipelines.request.cfg import needs_uncond, parse_cfg, scales_for_steps
from tests.conftest import stage_spec


def _tiny_unet(sdxl: bool):
    from pipelines.models.tiny import _unet

    torch.manual_seed(5)
    unet = _unet(sdxl)
    with torch.no_grad():  # diffusers zero-initialises conv_out; random weights make every output element live
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def _inputs(unet, sdxl: bool, h: int = 8, w: int = 8, n: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, h, w, generator=g)
    enc = torch.randn(n, 5, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(n, 32, generator=g), "time_ids": torch.rand(n, 6, generator=g) * 64} if sdxl else None
    return x, torch.tensor(437.0), enc, added


def _residuals(split: SplitUNet, x, t, enc, added):
    """Random ControlNet-shaped residuals: one per skip feature, and one for the mid block."""
    g = torch.Generator().manual_seed(2)
    _, emb, enc2 = split._embed(x, t, enc, added)
    h, skips = split._down_path(x, emb, enc2, len(split.down), None)
    down = [torch.randn(s.shape, generator=g) * 0.1 for s in skips]
    return down, torch.randn(h.shape, generator=g) * 0.1


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("control", [False, True], ids=["plain", "controlnet-odd-size"])
def test_split_full_pass_is_bit_identical_to_the_unet(sdxl, control):
    """Every branch's full pass == unet(...); odd latent sizes (upsample sizes forwarded) with the residuals."""
    unet = _tiny_unet(sdxl)
    x, t, enc, added = _inputs(unet, sdxl, *((9, 11) if control else (8, 8)))
    split = SplitUNet(unet, 0)
    down, mid = _residuals(split, x, t, enc, added) if control else (None, None)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0]
        for branch in range(branch_count(unet)):
            out, cached = SplitUNet(unet, branch).full(x, t, enc, added, down, mid)
            assert torch.equal(out, ref), branch
            # the shallow pass on the feature its own full pass cached recomputes the same output
            again = SplitUNet(unet, branch).shallow(x, t, enc, cached, added, down)
            assert torch.equal(again, ref), branch
    if control:  # the residuals really reach the output
        plain = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
        assert not torch.allclose(plain, ref)


def test_shallow_pass_depends_on_the_cached_feature_and_branch_bounds():
    unet = _tiny_unet(False)
    x, t, enc, _ = _inputs(unet, False)
    split = SplitUNet(unet, 0)
    with torch.no_grad():
        out, cached = split.full(x, t, enc)
        other = split.shallow(x, t, enc, cached * 0.5)
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="branch"):
        SplitUNet(unet, branch_count(unet))


def test_shallow_flops_fall_by_the_counted_fraction():
    """FLOPs (torch.utils.flop_counter) of a shallow pass are a fraction of a full one, smaller for branch 0."""
    unet = _tiny_unet(False)
    f0 = shallow_fraction(unet, 0, (2, 4, 16, 16), (2, 5, 32))
    f2 = shallow_fraction(unet, 2, (2, 4, 16, 16), (2, 5, 32))
    assert 0 < f0 < f2 < 1


def test_full_step_schedules():
    assert full_steps(10, 3) == {0, 3, 6, 9}
    assert full_steps(10, 1) == set(range(10))
    non = sorted(full_steps(20, 4, "nonuniform"))
    assert len(non) == len(full_steps(20, 4)) == 5 and non[0] == 0 and non[-1] < 20
    gaps = [b - a for a, b in zip(non, non[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1]  # denser early
    # a cond-only full step caches no uncond half: the first CFG step after it must run full
    assert plan_passes(frozenset({0, 3}), [False, False, True, True, True, True]) == [
        "full", "shallow", "full", "full", "shallow", "shallow"]


class ClosedFormParts:
    """A fake UNet whose deep and shallow parts are closed-form and pointwise.

    deep(x, enc) = D x + mean(enc), shallow(x) = S x; full = deep + shallow; a cached step uses the deep part of
    the last full pass of its key: out = cached + S x.
    """

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.D = torch.randn(4, 4, generator=g) * 0.2 + torch.eye(4) * 0.4
        self.S = torch.randn(4, 4, generator=g) * 0.1 + torch.eye(4) * 0.2
        self.dtype = torch.float32
        self.calls: list[str] = []

    def deep(self, x, enc):
        return torch.einsum("bchw,cd->bdhw", x, self.D) + enc.mean(dim=(1, 2))[:, None, None, None]

    def shallow_part(self, x):
        return torch.einsum("bchw,cd->bdhw", x, self.S)

    def full(self, x, t, enc, added=None, down=None, mid=None):
        self.calls.append("full")
        d = self.deep(x, enc)
        return d + self.shallow_part(x), d

    def shallow(self, x, t, enc, cached, added=None, down=None):
        self.calls.append("shallow")
        return cached + self.shallow_part(x)

    def __call__(self, x, t, encoder_hidden_states=None, **kw):
        return (self.full(x, t, encoder_hidden_states)[0],)


_spec = partial(stage_spec, steps=7)


def test_cached_run_equals_the_formula(tiny, engine):
    """The loop with caching = a hand-written DDIM loop that reuses each half's deep part between full steps."""
    from pipelines.denoise.schedulers import make_scheduler
    from pipelines.denoise.stages import build_conditioning, initial_noise

    cfg, steps = "interval(6,0.3,1)", 7
    spec = _spec(steps=steps, cfg=cfg, feature_cache=CacheSettings(interval=3))
    got = run_stage(tiny, spec, cache=engine.prompt_cache, unet=ClosedFormParts()).latents

    fake = ClosedFormParts()
    sched = make_scheduler("DDIM", tiny.pipe.scheduler.config)
    sched.set_timesteps(steps)
    noise, _ = initial_noise([3], (4, 8, 8), "cpu", torch.float32)
    x = noise * sched.init_noise_sigma
    cond_at = build_conditioning(tiny, spec, engine.prompt_cache, steps)
    scales = scales_for_steps(parse_cfg(cfg), steps)
    deep: dict[str, torch.Tensor] = {}
    for i, t in enumerate(sched.timesteps):
        x_in, c = sched.scale_model_input(x, t), cond_at(i)
        halves = {"cond": c.cond} | ({"uncond": c.uncond} if needs_uncond(scales[i]) else {})
        full = i % 3 == 0 or any(h not in deep for h in halves)
        out = {}
        for name, enc in halves.items():
            if full:
                deep[name] = fake.deep(x_in, enc)
            out[name] = deep[name] + fake.shallow_part(x_in)
        eps = out["cond"] if len(halves) == 1 else out["uncond"] + scales[i] * (out["cond"] - out["uncond"])
        x = sched.step(eps, t, x, return_dict=False)[0]
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)
    uncached = run_stage(tiny, _spec(steps=steps, cfg=cfg), cache=engine.prompt_cache, unet=ClosedFormParts()).latents
    assert not torch.allclose(uncached, got, atol=1e-4)  # the cached steps really used stale features


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_interval_one_is_bit_identical_to_uncached(tiny, engine, sampler):
    spec = _spec(steps=4, sampler=sampler, cfg="interval(7,0.25,0.75)")
    plain = run_stage(tiny, spec, cache=engine.prompt_cache).latents
    cached = run_stage(tiny, _spec(steps=4, sampler=sampler, cfg="interval(7,0.25,0.75)",
                                   feature_cache=CacheSettings(interval=1)), cache=engine.prompt_cache)
    assert torch.equal(plain, cached.latents)
    assert cached.stats.cache_full == 4 and cached.stats.cache_shallow == 0


def test_tiled_with_caching_equals_untiled_with_caching_for_a_pointwise_model(tiny, engine):
    spec = _spec(width=400, height=264, steps=6, sampler="DPM++ 2M Karras", cfg="interval(6,0.2,0.8)",
                 feature_cache=CacheSettings(interval=3))
    untiled = run_stage(tiny, spec, cache=engine.prompt_cache, unet=ClosedFormParts())
    tiles = TileSpec(size=16, overlap=6, blend="gaussian", batch=3)
    tiled = run_stage(tiny, StageSpec(**{**spec.__dict__, "tiles": tiles}), cache=engine.prompt_cache,
                      unet=ClosedFormParts())
    assert tiled.stats.tiles_per_step > 1 and tiled.stats.cache_shallow > 0
    torch.testing.assert_close(tiled.latents, untiled.latents, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["uniform", "nonuniform"])
def test_counted_passes_equal_the_schedule(tiny, engine, schedule):
    steps, cfg, interval = 9, "interval(6,0.3,0.8)", 3
    tiles = TileSpec(size=8, overlap=2, batch=2)
    fake = ClosedFormParts()
    spec = _spec(width=160, height=96, steps=steps, cfg=cfg, tiles=tiles,
                 feature_cache=CacheSettings(interval=interval, schedule=schedule))
    res = run_stage(tiny, spec, cache=engine.prompt_cache, unet=fake)
    kinds = plan_passes(full_steps(steps, interval, schedule), [needs_uncond(s) for s in res.stats.scales])
    calls = -(-res.stats.tiles_per_step // tiles.batch)
    assert res.stats.cache_full == kinds.count("full") * calls == fake.calls.count("full")
    assert res.stats.cache_shallow == kinds.count("shallow") * calls == fake.calls.count("shallow") > 0


def test_real_unet_cached_run_with_controlnet_and_tiles(tiny, engine):
    """A cached run on the real tiny UNet with a ControlNet and tiles: runs, differs from uncached, counts add up."""
    from diffusers import ControlNetModel

    from pipelines.denoise.loop import ControlInput

    torch.manual_seed(3)
    cn = ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    image = torch.rand(1, 3, 64, 96)
    kw = dict(width=96, height=64, steps=4, tiles=TileSpec(size=8, overlap=2, batch=4),
              control=(ControlInput(cn, image, 1.0),))
    plain = run_stage(tiny, _spec(**kw), cache=engine.prompt_cache)
    cached = run_stage(tiny, _spec(**kw, feature_cache=CacheSettings(interval=2)), cache=engine.prompt_cache)
    assert cached.stats.cache_full == 2 * -(-cached.stats.tiles_per_step // 4) and cached.stats.cache_shallow > 0
    assert not torch.equal(plain.latents, cached.latents)
    assert torch.isfinite(cached.latents).all()


def test_request_fields_validated_and_round_trip_through_metadata(req_factory):
    from pipelines.metadata import infotext, request_from_infotext
    from pipelines.request.validation import validate

    req = validate(req_factory(feature_cache="on", feature_cache_interval="4", feature_cache_branch=1,
                               feature_cache_schedule="nonuniform"))
    assert req.feature_cache_interval == 4
    back = request_from_infotext(infotext(req, seed=42, model_hash="abc"))
    assert (back.feature_cache, back.feature_cache_interval, back.feature_cache_branch,
            back.feature_cache_schedule) == ("on", 4, 1, "nonuniform")
    # an infotext of Tessera 0.1 (branch k then = DeepCache's k+1) reads as the branch that ran
    old = infotext(req, seed=42, model_hash="abc").replace("Version: tessera-0.2", "Version: tessera-0.1")
    assert "tessera-0.1" in old and request_from_infotext(old).feature_cache_branch == 2
    default = infotext(validate(req_factory(feature_cache="on")), seed=1, model_hash="abc")
    assert "feature_cache_branch" not in default and request_from_infotext(default).feature_cache_branch == 0
    assert request_from_infotext(default.replace("tessera-0.2", "tessera-0.1")).feature_cache_branch == 1
    off = infotext(validate(req_factory(feature_cache_branch=3)), seed=1, model_hash="abc")
    assert request_from_infotext(off.replace("tessera-0.2", "tessera-0.1")).feature_cache_branch == 3  # never ran
    for bad in (dict(feature_cache="yes"), dict(feature_cache_interval=0), dict(feature_cache_branch=-1),
                dict(feature_cache_schedule="random")):
        with pytest.raises(ValidationError):
            validate(req_factory(**bad))
    from dataclasses import replace

    with pytest.raises(ValidationError, match="tile_shift"):
        r = req_factory(feature_cache="on")
        validate(replace(r, tiling=replace(r.tiling, shift=True)))


def test_engine_interval_one_same_image_and_branch_checked_against_model(engine, req_factory):
    import numpy as np

    off = engine.generate(req_factory(seed=5), save=False)
    on1 = engine.generate(req_factory(seed=5, feature_cache="on", feature_cache_interval=1), save=False)
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(on1.images[0]))
    on3 = engine.generate(req_factory(seed=5, steps=4, feature_cache="on", feature_cache_interval=3), save=False)
    assert on3.images
    with pytest.raises(ValidationError, match="feature_cache_branch"):
        engine.generate(req_factory(feature_cache="on", feature_cache_branch=9), save=False)


def test_settings_reach_cli_api_ui_and_the_draft_preset(tmp_path):
    import gradio as gr

    import cli
    from pipelines.request.presets import load_presets
    from ui.advanced import build_advanced
    from ui.api import GENERATE_PARAMS
    from ui.components import Form

    names = ("feature_cache", "feature_cache_interval", "feature_cache_branch", "feature_cache_schedule")
    args = cli.build_parser().parse_args(["generate", "--feature-cache", "on", "--feature-cache-interval", "4",
                                          "--feature-cache-branch", "2", "--feature-cache-schedule", "nonuniform"])
    assert {cli._FIELDS[k]: getattr(args, k) for k in names} == dict(zip(names, ("on", 4, 2, "nonuniform"),
                                                                         strict=True))
    assert all(n in GENERATE_PARAMS for n in names)
    from pipelines.request.schema import GenerationRequest, flatten

    form = Form()
    with gr.Blocks():
        build_advanced(form, {"samplers": ["DPM++ 2M Karras"], "upscalers": ["lanczos"], "latent_min_denoise": 0.5},
                       flatten(GenerationRequest()))
    assert all(n in form for n in names)
    draft = load_presets()["draft"].apply()
    assert draft.feature_cache == "on" and draft.feature_cache_interval == 3


def test_hires_refine_gets_a_fresh_cache_per_stage(engine, req_factory):
    import numpy as np

    from pipelines.request.schema import HiresConfig

    kw = dict(seed=9, steps=2, hires=HiresConfig(scale=1.5, steps=2, denoise=0.5))
    off = engine.generate(req_factory(**kw), save=False)
    on1 = engine.generate(req_factory(**kw, feature_cache="on", feature_cache_interval=1), save=False)
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(on1.images[0]))
    on2 = engine.generate(req_factory(**kw, feature_cache="on", feature_cache_interval=2), save=False)
    # each stage's schedule starts at its own step 0: full, then shallow (the refine's canvas is 1.5x larger)
    assert (on2.stats["unet_full_calls"], on2.stats["unet_shallow_calls"]) == (2, 2)
    assert on2.images[0].size == (96, 96)


def _record_unet_calls(monkeypatch):
    """Every UNet call the feature cache makes during a run: (inputs, output, step, whether it ran shallow)."""
    from pipelines.denoise import feature_cache

    calls: list[dict] = []
    original = feature_cache._BoundCall.__call__

    def spy(self, sample, timestep, **kw):
        shallow = self.step not in self.cache.full and all(k in self.cache.entries for k in self._keys())
        out = original(self, sample, timestep, **kw)
        calls.append(dict(sample=sample.clone(), t=timestep, enc=kw["encoder_hidden_states"].clone(),
                          added=kw.get("added_cond_kwargs"), out=out[0].clone(), step=self.step, shallow=shallow))
        return out

    monkeypatch.setattr(feature_cache._BoundCall, "__call__", spy)
    return calls


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_every_branch_equals_deepcache_helper_bit_for_bit(engine, req_factory, monkeypatch, model):
    """Engine.generate with feature caching at branch k == DeepCache 0.1.1's DeepCacheSDHelper at cache_branch_id k
    on the same UNet: each of the run's UNet calls, replayed through the helper-wrapped UNet in step order, gives
    the same tensor bit for bit, for every branch the model has."""
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    from pipelines.denoise.unet_split import branch_count

    unet = engine.manager.get(model).pipe.unet
    steps, interval = 7, 3
    count = branch_count(unet)
    assert count == 5  # tiny: 2 blocks, 1 resnet (+ a downsampler in block 0) each: ids 0..4, 4 = mid block only
    shallow_outputs = {}
    for branch in range(count):
        calls = _record_unet_calls(monkeypatch)
        engine.generate(req_factory(model=model, seed=3, steps=steps, sampler="DDIM", cfg="6", feature_cache="on",
                                    feature_cache_interval=interval, feature_cache_branch=branch), save=False)
        monkeypatch.undo()
        assert [c["step"] for c in calls] == list(range(steps))
        assert [c["shallow"] for c in calls] == [i % interval != 0 for i in range(steps)]
        pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=torch.stack([c["t"] for c in calls])))
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            with torch.no_grad():
                theirs = [unet(c["sample"], c["t"], encoder_hidden_states=c["enc"], added_cond_kwargs=c["added"],
                               return_dict=False)[0] for c in calls]
        finally:
            helper.disable()
        for c, out in zip(calls, theirs, strict=True):
            assert torch.equal(c["out"], out), (branch, c["step"], (c["out"] - out).abs().max())
        with torch.no_grad():  # the shallow calls really used stale features: the plain UNet gives another tensor
            plain = unet(calls[1]["sample"], calls[1]["t"], encoder_hidden_states=calls[1]["enc"],
                         added_cond_kwargs=calls[1]["added"], return_dict=False)[0]
        assert not torch.equal(plain, calls[1]["out"]), branch
        shallow_outputs[branch] = calls[1]["out"]
    # the branches differ (1 and 2 cache the same feature here: block 0's downsampler output feeds no up op run)
    distinct = [shallow_outputs[b] for b in (0, 1, 3, 4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:])
    assert torch.equal(shallow_outputs[1], shallow_outputs[2])
