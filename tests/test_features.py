"""Feature tests through the engine on the tiny models: long/scheduled prompts, metadata reproduction, tiling,
two-stage generation and ControlNet."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import TesseraError, ValidationError
from pipelines.image_info import read_parameters
from pipelines.metadata import request_from_infotext
from pipelines.request.schema import ControlUnit, HiresConfig, TileConfig


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# ---------------------------------------------------------------- prompts (issue 4)
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_300_token_prompt_last_chunk_matters(engine, manager, req_factory, model):
    from pipelines.prompts.encoding import PromptEncoder

    head = "lorem " * 60  # 300 character tokens: chunk 5 starts after them
    a, b = head + "tail words here", head + "other birds there"
    loaded = manager.get(model)
    enc = PromptEncoder(loaded.tokenizers, loaded.text_encoders, pooled=loaded.spec.pooled)
    assert enc.chunk_count(a) == 5
    img_a = engine.generate(req_factory(model=model, prompt=a), save=False).images[0]
    img_b = engine.generate(req_factory(model=model, prompt=b), save=False).images[0]
    assert np.abs(_arr(img_a) - _arr(img_b)).mean() > 0.5, "words in the 5th chunk were ignored (truncated?)"


def test_prompt_scheduling_reaches_the_loop(manager, engine):
    from pipelines.denoise.stages import StageSpec, run_stage
    from pipelines.prompts.encoding import PromptEncoder
    from tests.test_loop import PointwiseUNet

    model = manager.get("tiny")
    enc = PromptEncoder(model.tokenizers, model.text_encoders, pooled=False)
    spy = PointwiseUNet()
    spec = StageSpec(prompt="[cat:dog:0.5] and [red|blue]", negative_prompt="", width=64, height=64, steps=4,
                     sampler="Euler", cfg="5", seeds=[1])
    run_stage(model, spec, cache=engine.prompt_cache, unet=spy)
    expected = ["cat and red", "cat and blue", "dog and red", "dog and blue"]
    for call, text in zip(spy.calls, expected, strict=True):
        want = enc.encode(text).embeds
        assert torch.allclose(call["enc"][1:2], want), f"step got the wrong conditioning, expected {text!r}"


# ---------------------------------------------------------------- metadata reproduces the image (issue 5)
def test_png_parameters_regenerate_the_identical_image(engine, req_factory):
    req = req_factory(prompt="a (castle:1.2) [day:night:0.5]", negative_prompt="fog, [rain]", sampler="Euler a",
                      cfg="cosine(9,4), rescale=0.7", steps=4, seed=1234)
    first = engine.generate(req)
    again_req = request_from_infotext(read_parameters(first.paths[0]))
    again = engine.generate(again_req)
    assert first.paths[0].read_bytes() != b"" and again.paths[0] != first.paths[0]
    assert np.array_equal(_arr(Image.open(first.paths[0])), _arr(Image.open(again.paths[0])))


def test_guidance_interval_saves_unet_evaluations(engine, req_factory):
    full = engine.generate(req_factory(steps=10, cfg="7"), save=False)
    interval = engine.generate(req_factory(steps=10, cfg="interval(7,0.3,0.6)"), save=False)
    assert full.stats["unet_evals"] == 20
    assert interval.stats["unet_evals"] == 20 - interval.stats["evals_saved"]
    assert interval.stats["evals_saved"] / full.stats["unet_evals"] >= 0.3
    assert "UNet evals saved: " in interval.infotexts[0]


# ---------------------------------------------------------------- tiling (issue 6)
def test_tiled_run_reports_plan_and_seam_score(engine, req_factory):
    res = engine.generate(req_factory(width=256, height=192, tiling=TileConfig(mode="on", size=16, overlap=8)))
    assert res.stats["tiles_per_step"] > 1
    assert res.stats["seam_score"] is not None and np.isfinite(res.stats["seam_score"])
    text = read_parameters(res.paths[0])
    assert "Seam score: " in text and "Tile plan: " in text
    assert request_from_infotext(text).tiling == res.request.tiling


class TileEdgeUNet:
    """A stand-in whose output depends on the position inside its own input (a ramp across the tile), the kind
    of tile-relative effect (padding, borders) that shows as seams unless overlapping tiles are blended."""

    def __call__(self, sample, timestep, encoder_hidden_states=None, **_):
        ramp = torch.linspace(-1, 1, sample.shape[-1]).expand_as(sample)
        return (0.6 * sample + 0.4 * ramp,)


def test_gaussian_overlap_blending_has_lower_seam_score_than_no_overlap(engine, manager):
    from pipelines.denoise.loop import TileSpec
    from pipelines.denoise.stages import StageSpec, run_stage
    from pipelines.tiling import plan_tiles, seam_score, tile_boundaries

    model = manager.get("tiny")

    def run(overlap, blend):
        spec = StageSpec(prompt="x", negative_prompt="", width=768, height=512, steps=4, sampler="DDIM", cfg="3",
                         seeds=[1], tiles=TileSpec(size=16, overlap=overlap, blend=blend, batch=8))
        z = run_stage(model, spec, cache=engine.prompt_cache, unet=TileEdgeUNet()).latents
        return z[0].permute(1, 2, 0).numpy()

    hard, soft, plain = run(0, "average"), run(8, "gaussian"), run(8, "average")
    xs, ys = tile_boundaries(plan_tiles(64, 96, 16, 0), scale=1)  # the hard grid's seams, measured on all
    s_hard, s_soft, s_avg = (seam_score(z, xs, ys, distance=2) for z in (hard, soft, plain))
    # measured: hard 1.34, average 1.09, gaussian 1.02 (1 = boundaries look like the interior)
    assert s_hard > 1.2, s_hard  # the unblended grid shows
    assert s_soft < s_avg < s_hard, (s_soft, s_avg, s_hard)


def test_auto_tiling_switches_on_over_the_memory_budget(engine, req_factory):
    small = engine.generate(req_factory(width=128, height=128), save=False)
    assert small.stats["tiles_per_step"] == 1
    tight = engine.generate(req_factory(width=512, height=512, steps=1, vae_decode="taesd",
                                        tiling=TileConfig(memory_budget_gb=0.1, size=32, overlap=8)), save=False)
    assert tight.stats["tiles_per_step"] > 1 and "tiles of 32" in tight.stats["plan"]


def test_streamed_and_exact_tiled_vae_give_the_same_image(engine, req_factory):
    # img2img encodes and the final decode both go through the tiled VAE
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8))
    base = req_factory(width=256, height=192, steps=2, init_image=init, strength=0.5)
    runs = {mode: engine.generate(replace(base, tiling=TileConfig(vae_tiling="on", vae_tile_size=16,
                                                                  vae_tile_mode=mode)), save=False)
            for mode in ("exact", "stream")}
    assert "(exact" in runs["exact"].stats["plan"] and "(stream" in runs["stream"].stats["plan"]
    a, b = (_arr(r.images[0]) for r in runs.values())
    assert np.abs(a - b).max() <= 1  # both equal the full decode up to float rounding
    # auto: layer-wise while its canvases (~134 MB for the tiny VAE at 1024²) fit a CPU budget, else streamed
    model = engine.manager.get("tiny")
    big = replace(base, width=1024, height=1024, init_image=None)
    modes = [engine.plan(replace(big, tiling=TileConfig(vae_tiling="on", memory_budget_gb=gb)), model).vae_mode
             for gb in (1.0, 0.1)]
    assert modes == ["exact", "stream"]


def test_auto_streams_only_the_stages_whose_canvases_do_not_fit(engine, req_factory, monkeypatch):
    from pipelines import request_plan
    from pipelines.vae import io as vae_io
    from pipelines.vae.tiling import decode_splits

    model = engine.manager.get("tiny")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8))
    base = req_factory(width=256, height=192, steps=2, init_image=init, strength=0.5)
    options = decode_splits(model.vae, 24, 32)
    middle = next(s for s in options if 0 < s.at < s.stages and s.host_bytes < options[-1].host_bytes)
    real_store = request_plan.vae_store
    # host RAM this small is below any memory_budget_gb a request may give: set the host budget itself
    monkeypatch.setattr(request_plan, "vae_store",
                        lambda *a: {**real_store(*a), "host_budget_bytes": middle.host_bytes})
    req = replace(base, tiling=TileConfig(vae_tiling="on", vae_tile_size=16))
    plan = engine.plan(req, model)
    assert (plan.vae_mode, plan.vae_split) == ("stream", middle)
    assert f"{middle.streamed} of {middle.stages} stages tile by tile" in plan.describe()
    seen = []
    for name in ("tiled_decode", "tiled_encode"):
        real = getattr(vae_io, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs["mode"], kwargs["host_budget"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(vae_io, name, spy)
    hybrid = engine.generate(req, save=False)
    assert ("tiled_encode", "stream", plan.vae_host_budget) in seen
    assert ("tiled_decode", "stream", plan.vae_host_budget) in seen
    exact = engine.generate(replace(req, tiling=replace(req.tiling, vae_tile_mode="exact")), save=False)
    assert np.abs(_arr(hybrid.images[0]) - _arr(exact.images[0])).max() <= 1


# ---------------------------------------------------------------- two-stage (issue 7)
def test_hires_doubles_the_size_and_reuses_stage1(engine, req_factory):
    req = req_factory(hires=HiresConfig(scale=2, upscaler="lanczos", denoise=0.5, steps=2))
    first = engine.generate(req, save=False)
    assert first.images[0].size == (128, 128)
    runs = engine.stage1_runs
    changed = engine.generate(replace(req, hires=replace(req.hires, denoise=0.3, upscaler="latent-bicubic")), save=False)
    assert engine.stage1_runs == runs, "stage 1 ran again although only stage-2 settings changed"
    assert changed.images[0].size == (128, 128)
    engine.generate(replace(req, seed=99), save=False)
    assert engine.stage1_runs == runs + 1
    text = first.infotexts[0]
    for key in ("Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 2", "Hires upscaler: Lanczos"):
        assert key in text


def test_hires_denoise_zero_returns_the_upscaled_draft(engine, req_factory):
    draft = engine.generate(req_factory(), save=False).images[0]
    up = engine.generate(req_factory(hires=HiresConfig(scale=2, upscaler="lanczos", denoise=0.0)), save=False)
    assert np.array_equal(_arr(up.images[0]), _arr(draft.resize((128, 128), Image.LANCZOS)))


def test_latent_upscaler_defaults_to_high_denoise_and_warns_below(engine, req_factory):
    from pipelines.request.hires import hires_denoise

    assert hires_denoise(req_factory(hires=HiresConfig(scale=2, upscaler="latent"))) >= 0.5
    res = engine.generate(req_factory(hires=HiresConfig(scale=1.5, upscaler="latent", denoise=0.2, steps=2)),
                          save=False)
    assert res.images[0].size == (96, 96)
    assert any("blurry" in w for w in res.warnings)


def test_esrgan_upscaler_from_models_folder(engine, req_factory, manager):
    from safetensors.torch import save_file

    from tests.test_upscale import rrdb_state_dict

    folder = manager.models_dir / "upscalers"
    folder.mkdir(exist_ok=True)
    save_file(rrdb_state_dict(), folder / "x4-test.safetensors")
    res = engine.generate(req_factory(hires=HiresConfig(scale=2, upscaler="x4-test.safetensors", denoise=0.3,
                                                        steps=2)), save=False)
    assert res.images[0].size == (128, 128)
    up = engine.upscale(Image.new("RGB", (40, 48), "red"), upscaler="x4-test.safetensors", scale=3, save=False)
    assert up.images[0].size == (120, 144)
    # `auto` (the quality and ultra presets' upscaler) runs the model file and says so in the metadata
    auto = engine.generate(req_factory(hires=HiresConfig(scale=2, upscaler="auto", denoise=0.3, steps=2)),
                           save=False)
    assert auto.request.hires.upscaler == "x4-test.safetensors"
    assert "Hires upscaler: x4-test.safetensors" in auto.infotexts[0]
    assert _arr(auto.images[0]).tolist() == _arr(res.images[0]).tolist()


@pytest.mark.parametrize(
    ("hires", "msg"),
    [
        (HiresConfig(scale=2, upscaler="no-such-upscaler"), "hires_upscaler"),
        (HiresConfig(scale=2, upscaler="../../etc/passwd"), "hires_upscaler"),
        (HiresConfig(scale=0.5), "hires_scale"),
        (HiresConfig(scale=9), "hires_scale"),
        (HiresConfig(scale=2, denoise=1.5), "hires_denoise"),
    ],
)
def test_hires_bad_input(engine, req_factory, hires, msg):
    with pytest.raises(ValidationError, match=msg):
        engine.generate(req_factory(hires=hires), save=False)


def test_upscale_entry_point_bad_input(engine, manager):
    (manager.models_dir / "upscalers").mkdir(exist_ok=True)
    (manager.models_dir / "upscalers" / "fake.pth").write_bytes(b"not a model at all")
    img = Image.new("RGB", (64, 64))
    with pytest.raises(TesseraError, match="fake.pth"):
        engine.upscale(img, upscaler="fake.pth", scale=2, save=False)
    with pytest.raises(ValidationError, match="image"):
        engine.upscale(b"not an image", scale=2, save=False)
    with pytest.raises(ValidationError, match="scale"):
        engine.upscale(img, scale=1.0, save=False)


# ---------------------------------------------------------------- ControlNet (issue 8)
def _control_image() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[16:48, 16:48] = 255
    return Image.fromarray(arr)


def test_controlnet_scale_zero_is_uncontrolled_and_scale_one_changes(engine, req_factory):
    plain = engine.generate(req_factory(), save=False).images[0]
    zero = engine.generate(req_factory(control=(ControlUnit(_control_image(), "canny", scale=0.0),)), save=False)
    assert np.array_equal(_arr(plain), _arr(zero.images[0]))
    one = engine.generate(req_factory(control=(ControlUnit(_control_image(), "canny", scale=1.0),)), save=False)
    assert not np.array_equal(_arr(plain), _arr(one.images[0]))
    window = engine.generate(req_factory(control=(ControlUnit(_control_image(), "canny", start=0.5, end=0.5),)),
                             save=False)
    assert np.array_equal(_arr(plain), _arr(window.images[0]))


def test_controlnet_in_tiled_and_two_stage_runs(engine, req_factory):
    unit = ControlUnit(_control_image(), "canny", scale=1.0)
    tiled = engine.generate(req_factory(width=128, height=96, control=(unit,),
                                        tiling=TileConfig(mode="on", size=8, overlap=2)), save=False)
    assert tiled.stats["tiles_per_step"] > 1 and tiled.images[0].size == (128, 96)
    two = engine.generate(req_factory(control=(unit,), hires=HiresConfig(scale=2, denoise=0.5, steps=2)), save=False)
    assert two.images[0].size == (128, 128)


def test_control_bad_upload_and_unknown_model(engine, req_factory):
    with pytest.raises(ValidationError, match="control"):
        engine.generate(req_factory(control=(ControlUnit(b"GIF89a garbage", "canny"),)), save=False)
    with pytest.raises(TesseraError, match="no-such-cn|controlnet|ControlNet"):
        engine.generate(req_factory(control=(ControlUnit(_control_image(), "canny", model="no-such-cn"),)),
                        save=False)


def test_ui_and_api_control_units_act_together_and_name_their_fields(engine):
    from pipelines.a1111 import parse_infotext
    from pipelines.serving.service import Backend

    backend = Backend(engine)
    base = {"prompt": "a lighthouse", "model": "tiny", "width": 64, "height": 64, "steps": 3, "seed": 5}
    square, bar = _control_image(), Image.new("RGB", (64, 64))
    bar.paste((255, 255, 255), (0, 24, 64, 40))
    second = {"control2_image": bar, "control2_scale": 0.7, "control2_start": 0.2, "control2_guess_mode": True}
    both = backend.request({**base, "control_image": square, "control_scale": 1.2, **second})
    assert [(u.type, u.scale, u.start, u.guess_mode) for u in both.control] == [("canny", 1.2, 0.0, False),
                                                                               ("canny", 0.7, 0.2, True)]
    only_second = backend.request({**base, **second})  # an empty first unit is skipped, not an error
    assert [u.scale for u in only_second.control] == [0.7]
    images = {name: _arr(engine.generate(req, save=False).images[0]) for name, req in
              (("both", both), ("second", only_second), ("none", backend.request(base)))}
    assert not np.array_equal(images["both"], images["second"]) and not np.array_equal(images["second"],
                                                                                        images["none"])
    text = engine.generate(both, save=False).infotexts[0]
    params = parse_infotext(text)
    assert params["ControlNet 0"].startswith("Module: canny, Model: default, Weight: 1.2, Guidance Start: 0,")
    assert "Weight: 0.7, Guidance Start: 0.2" in params["ControlNet 1"]
    assert params["ControlNet 1"].endswith("Control Mode: ControlNet is more important")
    assert request_from_infotext(text).seed == 5  # the extra keys do not disturb reading the request back
    # PNG info -> "Send to Generate" restores every unit's settings; with the images uploaded again, same pixels
    _, values = backend.read_info(Image.open(io.BytesIO(_png_with(text))))
    assert {k: values[k] for k in ("control_scale", "control2_scale", "control2_start", "control2_guess_mode")} == {
        "control_scale": 1.2, "control2_scale": 0.7, "control2_start": 0.2, "control2_guess_mode": True}
    again = backend.request({**values, "control_image": square, "control2_image": bar})
    assert np.array_equal(_arr(engine.generate(again, save=False).images[0]), images["both"])
    # errors name the field the caller sent, whichever position the unit has in the engine's list
    for values, field in (({**base, **second, "control2_scale": 5}, "control2_scale"),
                          ({**base, "control_image": square, **second, "control2_end": 0.1}, "control2_start"),
                          ({**base, "control3_image": square, "control3_type": "sketchy"}, "control3_type"),
                          ({**base, "control_image": square, "control_low": 300}, "control_low")):
        with pytest.raises(ValidationError) as err:
            backend.request(values)
        assert err.value.field == field and f"`{field}`" in str(err.value)
    with pytest.raises(ValidationError, match="`control2_image`"):
        backend.request({**base, "control2_image": "not an image"})


def _png_with(text: str) -> bytes:
    from pipelines.image_info import png_info

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=png_info(text))
    return buf.getvalue()


def test_tile_controlnet_holds_structure_in_the_refine(engine, req_factory):
    base = req_factory(batch_size=2, hires=HiresConfig(scale=2, denoise=0.6, steps=2))
    plain = engine.generate(base, save=False)
    held = engine.generate(replace(base, hires=replace(base.hires, control_tile=1.0)), save=False)
    assert held.warnings == [] and held.images[0].size == (128, 128)
    for a, b in zip(plain.images, held.images):
        assert not np.array_equal(_arr(a), _arr(b))
    assert "hires_control_tile" in held.infotexts[0]
    latent = engine.generate(replace(base, hires=replace(base.hires, upscaler="latent", control_tile=0.5)), save=False)
    assert latent.images[1].size == (128, 128)
    xl = engine.generate(req_factory(model="tiny-sdxl", hires=HiresConfig(scale=2, denoise=0.5, steps=2,
                                                                          control_tile=1.0)), save=False)
    assert any("no tile ControlNet" in w for w in xl.warnings)


def test_sdxl_controlnet_from_models_folder(engine, manager, req_factory, tiny_sdxl_dir):
    from pipelines.models.tiny import build_tiny_controlnet

    folder = manager.models_dir / "controlnet" / "tiny-sdxl-cn"
    if not folder.exists():
        folder.parent.mkdir(exist_ok=True)
        build_tiny_controlnet(tiny_sdxl_dir, folder)
    plain = engine.generate(req_factory(model="tiny-sdxl"), save=False).images[0]
    unit = ControlUnit(_control_image(), "canny", model="tiny-sdxl-cn", scale=1.0)
    held = engine.generate(req_factory(model="tiny-sdxl", control=(unit,)), save=False).images[0]
    assert not np.array_equal(_arr(plain), _arr(held))
    zero = engine.generate(req_factory(model="tiny-sdxl", control=(replace(unit, scale=0.0),)), save=False).images[0]
    assert np.array_equal(_arr(plain), _arr(zero))
