"""Regional prompts (MultiDiffusion region control): masks, the loop's views with a closed-form fake UNet (inside a
region its prompt, outside the base prompt; tiled = untiled), cost per tile and the planner, SDXL pooled per
region, seeds per region, the hires scale, and bad-input messages."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipelines.denoise.loop import TileSpec
from pipelines.denoise.regions import latent_box, paste_region_noise, region_masks, views_per_step
from pipelines.denoise.stages import run_stage
from pipelines.errors import ValidationError
from pipelines.request.regions import (
    Region,
    parse_region_cli,
    preview_regions,
    regions_from_json,
    regions_from_rows,
    regions_to_json,
    rows_from_regions,
    validate_regions,
)
from pipelines.tiling import plan_tiles
from tests.conftest import stage_spec


def text_term(enc: torch.Tensor, channels: int) -> torch.Tensor:
    """10 x the mean over tokens of the first `channels` features, one value per row and channel."""
    return 10 * enc.float().mean(dim=1)[:, :channels, None, None]


class TextUNet:
    """out = 0.5 x + mean(the row's text embedding) (+ mean of its pooled embedding): pointwise in x."""

    dtype = torch.float32

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        self.calls.append({"shape": tuple(sample.shape), "enc": encoder_hidden_states.clone(),
                           "added": None if added_cond_kwargs is None else dict(added_cond_kwargs)})
        out = 0.5 * sample.float() + text_term(encoder_hidden_states, sample.shape[1])
        if added_cond_kwargs is not None:
            out = out + added_cond_kwargs["text_embeds"].float().mean(dim=1)[:, None, None, None]
        if down_block_additional_residuals is not None:
            out = out + down_block_additional_residuals[0].float()
        return (out.to(sample.dtype),)


_spec = partial(stage_spec, prompt="a meadow", width=256, height=192, steps=3, cfg="6", seeds=[5])


def _run(model, engine, **kw):
    return run_stage(model, _spec(**kw), cache=engine.prompt_cache, unet=TextUNet())


DOG = Region(0.25, 0.25, 0.5, 0.5, "a dog", feather=16)


def test_inside_a_region_its_prompt_outside_the_base_prompt(tiny, engine):
    """Away from its feather a region's latents equal a plain run of its prompt; outside, the base prompt's."""
    regional = _run(tiny, engine, regions=(DOG,)).latents
    base = _run(tiny, engine).latents
    dog = _run(tiny, engine, prompt="a dog").latents
    y0, x0, y1, x1 = latent_box(DOG, 256, 192, (256, 192))
    f = 2 + 1  # 16 px feather = 2 latent px; one more to be clear of it
    inside = (..., slice(y0 + f, y1 - f), slice(x0 + f, x1 - f))
    torch.testing.assert_close(regional[inside], dog[inside], atol=1e-5, rtol=1e-5)
    outside = torch.ones(regional.shape[-2:], dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    torch.testing.assert_close(regional[..., outside], base[..., outside], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(regional[inside], base[inside])  # the prompts differ there
    ring = regional[..., y0, x0 + 4]  # in the feather: between the two
    lo, hi = torch.minimum(base[..., y0, x0 + 4], dog[..., y0, x0 + 4]), torch.maximum(base[..., y0, x0 + 4],
                                                                                         dog[..., y0, x0 + 4])
    assert torch.all(ring >= lo - 1e-5) and torch.all(ring <= hi + 1e-5)


def test_background_mode_blends_the_base_prompt_everywhere(tiny, engine):
    hard = Region(0, 0, 0.5, 1, "a dog", weight=3.0)  # touches the canvas edges: no feather needed there
    regional = _run(tiny, engine, regions=(hard,), region_base="background", steps=1).latents
    base = _run(tiny, engine, steps=1).latents
    dog = _run(tiny, engine, prompt="a dog", steps=1).latents
    # one DDIM step is affine in the model output, so the latents blend as the outputs do: (base + 3 dog) / 4
    torch.testing.assert_close(regional[..., :16], (base[..., :16] + 3 * dog[..., :16]) / 4, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regional[..., 16:], base[..., 16:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blend", ["average", "gaussian"])
@pytest.mark.parametrize("base", ["rest", "background"])
def test_tiled_equals_untiled_with_regions_for_a_pointwise_model(tiny, engine, blend, base):
    regions = (DOG, Region(0.6, 0.1, 0.4, 0.5, "a cat AND a hat :0.6", "dark", weight=0.7, feather=24, seed=9),
               Region(8, 96, 120, 64, "grass"))
    kw = dict(width=400, height=264, regions=regions, region_base=base, sampler="Euler a", cfg="6, rescale=0.5")
    untiled = _run(tiny, engine, **kw).latents
    spy = TextUNet()
    tiles = TileSpec(size=16, overlap=4, blend=blend, batch=2, shift=True)
    tiled = run_stage(tiny, _spec(**kw, tiles=tiles), cache=engine.prompt_cache, unet=spy)
    assert max(c["shape"][-1] for c in spy.calls) == 16  # really tiled
    scale = float(untiled.abs().max())  # latents of tens here (the fake's text term): compare relative to that
    torch.testing.assert_close(tiled.latents / scale, untiled / scale, atol=2e-6, rtol=1e-5)


def test_regions_cost_nothing_on_tiles_they_miss_and_the_planner_counts_views(tiny, engine):
    from pipelines.planner import PlanInput, RegionLayout, TilingAsk, plan_generation

    corner = Region(0, 0, 0.2, 0.2, "a sun")
    tiles = TileSpec(size=16, overlap=4, blend="average", batch=1)
    plain = run_stage(tiny, _spec(width=512, height=512, steps=2, tiles=tiles), cache=engine.prompt_cache,
                      unet=TextUNet())
    spy = TextUNet()
    res = run_stage(tiny, _spec(width=512, height=512, steps=2, tiles=tiles, regions=(corner,),
                                region_base="background"), cache=engine.prompt_cache, unet=spy)
    grid = plan_tiles(64, 64, 16, 4)
    touched = [t for t in grid if t.y < 13 and t.x < 13]  # the region covers latent rows/cols 0..12
    assert res.stats.unet_calls == 2 * (len(grid) + len(touched)) == plain.stats.unet_calls + 2 * len(touched)
    plan = plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1",
                                     tiling=TilingAsk(force="on", tile_size=16, overlap=4, tile_batch=1),
                                     regions=RegionLayout((corner,), base="background")))
    assert plan.unet_evals_per_step == res.stats.unet_calls // 2
    assert views_per_step((corner,), grid, 512, 512, "background", 1) == len(grid) + len(touched)
    untiled = plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1",
                                        regions=RegionLayout((corner, DOG))))
    assert untiled.unet_evals_per_step == 3 and "3 UNet calls/step" in untiled.describe()


def test_region_views_get_the_control_map_under_their_tiles(tiny, engine):
    from pipelines.denoise.loop import ControlInput

    class Spy:
        dtype = torch.float32

        def __init__(self):
            self.crops = []

        def __call__(self, sample, t, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                     guess_mode=False, added_cond_kwargs=None, return_dict=False):
            self.crops.append(controlnet_cond.shape)
            return [torch.zeros_like(sample)], torch.zeros_like(sample)

    spy = Spy()
    run_stage(tiny, _spec(steps=1, regions=(DOG,), control=[ControlInput(spy, torch.rand(1, 3, 192, 256))]),
              cache=engine.prompt_cache, unet=TextUNet())
    assert len(spy.crops) == 2 and all(s == (2, 3, 192, 256) for s in spy.crops)  # base and region, CFG rows


def test_sdxl_region_gets_its_own_pooled_embedding(manager, engine):
    from pipelines.prompts.encoding import PromptEncoder

    sdxl = manager.get("tiny-sdxl")
    spy = TextUNet()
    run_stage(sdxl, _spec(width=128, height=128, steps=1, regions=(Region(0, 0, 0.5, 0.5, "a blue dog", "ugly"),)),
              cache=engine.prompt_cache, unet=spy)
    enc = PromptEncoder(sdxl.tokenizers, sdxl.text_encoders, pooled=True)
    base_call, region_call = spy.calls
    for call, (neg, pos) in ((base_call, ("blur", "a meadow")), (region_call, ("ugly", "a blue dog"))):
        pooled = call["added"]["text_embeds"]
        torch.testing.assert_close(pooled[:1], enc.encode(neg).pooled)
        torch.testing.assert_close(pooled[1:], enc.encode(pos).pooled)
        assert call["added"]["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    assert not torch.equal(base_call["added"]["text_embeds"], region_call["added"]["text_embeds"])


def test_seed_per_region_replaces_the_noise_in_its_box():
    noise = torch.randn(2, 4, 24, 32)
    r = Region(0.5, 0, 0.5, 0.5, "x", seed=77)
    out = paste_region_noise(noise, [r], [5, 6], (256, 192))
    y0, x0, y1, x1 = latent_box(r, 256, 192, (256, 192))
    for i in range(2):
        local = torch.randn((4, y1 - y0, x1 - x0), generator=torch.Generator().manual_seed(77 + i))
        assert torch.equal(out[i, :, y0:y1, x0:x1], local)
    keep = torch.ones(24, 32, dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    assert torch.equal(out[..., keep], noise[..., keep])
    assert paste_region_noise(noise, [Region(0, 0, 1, 1, "x")], [5], (256, 192)) is noise


def test_regions_scale_with_the_image_in_the_hires_refine():
    pixels = Region(64, 32, 128, 64, "x", feather=16)
    _, (small,) = region_masks([pixels], 256, 192, (256, 192))
    _, (big,) = region_masks([pixels], 512, 384, (256, 192))
    assert latent_box(pixels, 512, 384, (256, 192)) == tuple(2 * v for v in latent_box(pixels, 256, 192, (256, 192)))
    torch.testing.assert_close(big[::2, ::2].sum() / 4, small.sum() / 4, atol=0.6, rtol=0.05)
    assert big.sum() > 3.5 * small.sum()


def test_masks_feather_inside_the_box_and_the_rest_mask_fills_the_gaps():
    r = Region(0.25, 0.25, 0.5, 0.5, "x", weight=2.0, feather=16)
    base, (m,) = region_masks([r], 256, 256, (256, 256))
    assert m.max() == 2.0 and m[16, 16] == 2.0 and m[8, 16] == pytest.approx(2 / 3)  # ramp of 2 latent px + 1
    assert torch.all(m[:8] == 0) and torch.all(base[:8] == 1) and base[16, 16] == 0
    assert torch.all(base + m / 2 == 1)  # coverage plus rest is 1 everywhere


def test_json_cli_and_table_forms_round_trip():
    regions = validate_regions([{"x": 0, "y": 0, "w": 0.5, "h": 1, "prompt": "a cat"},
                                {"x": 64, "y": 0, "w": 64, "h": 64, "prompt": "a: dog, (red:1.2)",
                                 "negative_prompt": "blur", "weight": 1.5, "feather": 8, "seed": 3}], 128, 128)
    assert regions[0] == Region(0.0, 0.0, 0.5, 1.0, "a cat")
    assert validate_regions(regions_to_json(regions), 128, 128) == regions
    assert regions_from_json('{"x":0,"y":0,"w":1,"h":1}') == [{"x": 0, "y": 0, "w": 1, "h": 1}]
    assert validate_regions(regions_from_rows(rows_from_regions(regions) + [[None] * 9]), 128, 128) == regions
    assert parse_region_cli("0,0,0.5,1:a cat, (red:1.2):1.5") == {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0,
                                                                 "prompt": "a cat, (red:1.2)", "weight": 1.5}
    assert parse_region_cli("64,0,64,64:a [b:c:0.5] d")["prompt"] == "a [b:c:0.5] d"
    img = preview_regions(regions, 128, 128)
    assert img.size == (384, 384) and img.getpixel((1, 200)) != img.getpixel((200, 200))


BAD = [
    ([{"x": 0.8, "y": 0, "w": 0.5, "h": 1}], r"`regions\[0\]\.w` takes the region outside the canvas"),
    ([{"x": -1, "y": 0, "w": 10, "h": 10}], r"`regions\[0\]\.x` must be >= 0"),
    ([{"x": 0, "y": 0, "w": 0, "h": 0.5}], r"`regions\[0\]\.w` must be > 0 \(a region of zero size\)"),
    ([{"x": 0, "y": 0, "w": 0.01, "h": 0.5}], r"`regions\[0\]\.w` is 1.28 px of the width: zero size"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1}, {"x": 0, "y": 0, "w": 1, "h": 1, "weight": 0}],
     r"`regions\[1\]\.weight` must be > 0"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1, "feather": -2}], r"`regions\[0\]\.feather` must be between 0"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1, "weight": "heavy"}], r"`regions\[0\]\.weight` must be a number"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1, "colour": "red"}], r"`regions\[0\]` has a key that is not a region key.*got 'colour'"),
    ([{"x": 0, "y": 0, "w": 1}], r"`regions\[0\]\.h` is required"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1, "seed": 1.5}], r"`regions\[0\]\.seed` must be a whole number"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1}] * 17, r"`regions` may hold at most 16 regions"),
    ("[{", r"`regions` must be JSON"),
    ([{"x": 0, "y": 0, "w": 1, "h": 1, "prompt": " AND ".join("abcdefghij")}],
     r"`regions\[0\]\.prompt` may have at most 8 parts"),
]


@pytest.mark.parametrize(("value", "message"), BAD)
def test_bad_regions_get_a_clear_message(value, message):
    with pytest.raises(ValidationError, match=message):
        validate_regions(value, 128, 128)


def test_request_validates_regions_and_base():
    from pipelines.request.schema import GenerationRequest
    from pipelines.request.validation import validate

    req = validate(GenerationRequest(regions='[{"x":0,"y":0,"w":0.5,"h":1,"prompt":"a cat"}]'))
    assert req.regions == (Region(0.0, 0.0, 0.5, 1.0, "a cat"),)
    with pytest.raises(ValidationError, match="`region_base` must be one of rest, background"):
        validate(GenerationRequest(region_base="foreground"))
    with pytest.raises(ValidationError, match="outside the canvas"):
        validate(GenerationRequest(width=512, regions=({"x": 256, "y": 0, "w": 512, "h": 64},)))


def test_infotext_records_regions_and_reads_them_back():
    from pipelines.a1111 import parse_infotext
    from pipelines.metadata import infotext, request_from_infotext
    from pipelines.request.schema import GenerationRequest
    from pipelines.request.validation import validate

    req = validate(GenerationRequest(prompt="a park", width=512, height=384, region_base="background", regions=(
        {"x": 0, "y": 0, "w": 0.5, "h": 1, "prompt": "a cat, (red:1.2)", "negative_prompt": "dog", "feather": 12},
        {"x": 256, "y": 0, "w": 256, "h": 128, "prompt": 'a "sun"', "weight": 0.5, "seed": 4})))
    text = infotext(req, seed=3, model_hash="abc")
    assert validate_regions(parse_infotext(text)["Regions"], 512, 384) == req.regions
    assert request_from_infotext(text) == validate(GenerationRequest(**{**req.__dict__, "seed": 3}))


def test_cli_region_option(tmp_path):
    import cli

    args = cli.build_parser().parse_args(["generate", "--prompt", "a park", "--region", "0,0,0.5,1:a cat:1.5",
                                          "--region", "256,0,256,256:a [b:c:0.5] dog", "--region-base",
                                          "background"])
    req = cli._request(args)
    from pipelines.request.validation import validate

    assert validate(req).regions == (Region(0.0, 0.0, 0.5, 1.0, "a cat", weight=1.5),
                                     Region(256.0, 0.0, 256.0, 256.0, "a [b:c:0.5] dog"))
    assert req.region_base == "background"
    code = cli.main(["generate", "--model", "tiny", "--out", str(tmp_path), "--region", "0,0,2,1:x"])
    assert code == 2
    with pytest.raises(ValidationError, match="--region"):
        parse_region_cli("0,0,1:x")


def test_engine_runs_regions_in_both_stages_and_records_them(engine, req_factory):
    """Two-stage run on the tiny model: each stage runs the base view and the region view every step (so
    4 + 4 UNet calls for 2 + 2 steps), and the PNG's parameters carry the regions back."""
    from pipelines.image_info import read_parameters
    from pipelines.metadata import request_from_infotext
    from pipelines.request.schema import HiresConfig

    req = req_factory(steps=2, hires=HiresConfig(scale=2.0, steps=2, upscaler="latent", denoise=0.6),
                      regions=({"x": 0, "y": 0, "w": 32, "h": 64, "prompt": "a cat", "seed": 5},))
    result = engine.generate(req)
    assert result.stats["unet_calls"] == 8 and result.images[0].size == (128, 128)
    back = request_from_infotext(read_parameters(result.paths[0]))
    assert back.regions == (Region(0.0, 0.0, 32.0, 64.0, "a cat", seed=5),)


def test_api_values_take_the_json_text_form(engine):
    from pipelines.serving.service import Backend

    backend = Backend(engine)
    engine.default_model = "tiny"
    values = {"prompt": "a park", "width": 512, "height": 256, "region_base": "background",
              "regions": '[{"x":0,"y":0,"w":0.5,"h":1,"prompt":"a cat","feather":16}]'}
    req = backend.request(values)
    assert req.regions == (Region(0.0, 0.0, 0.5, 1.0, "a cat", feather=16.0),) and req.region_base == "background"
    assert "2 UNet calls/step" in backend.describe(values)
    with pytest.raises(ValidationError, match=r"`regions\[0\]\.h` is required"):
        backend.request({**values, "regions": '[{"x":0,"y":0,"w":0.5}]'})
