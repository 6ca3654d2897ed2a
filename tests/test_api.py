"""The real app (engine + tiny model) through gradio_client: /generate and /upscale by parameter name."""

from __future__ import annotations

import contextlib
import logging
import time

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.metadata import request_from_infotext
from pipelines.request.presets import load_presets
from pipelines.request.validation import hires_target
from tests.conftest import running_app

pytestmark = pytest.mark.xdist_group("gradio-app")
log = logging.getLogger(__name__)

TINY = {"model": "tiny", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def app(manager, tmp_path_factory):
    """The real app on the tiny model, on a free local port; yields (url, engine)."""
    from pipelines.engine import Engine

    engine = Engine(manager, tmp_path_factory.mktemp("api-outputs"))
    with running_app(engine) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(app, tmp_path_factory) -> Client:
    return Client(app[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def check_png(path: str, size: tuple[int, int]) -> str:
    """The file is a PNG of `size` with a `parameters` text chunk; returns that text."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        return img.info["parameters"]


def test_generate_by_parameter_name(client):
    files, texts = client.predict(prompt="a red fox in the snow", negative_prompt="blurry", model="tiny", width=64,
                                  height=72, steps=3, cfg="linear(4,9)", sampler="Euler a", seed=42, batch_size=2,
                                  api_name="/generate")
    assert len(files) == len(texts) == 2
    for i, (path, text) in enumerate(zip(files, texts)):
        params = check_png(path, (64, 72))
        assert params == text
        req = request_from_infotext(params)
        assert (req.prompt, req.negative_prompt, req.seed, req.steps) == ("a red fox in the snow", "blurry", 42 + i, 3)
        assert (req.width, req.height, req.sampler, req.cfg, req.model) == (64, 72, "Euler a", "linear(4,9)", "tiny")


@pytest.mark.parametrize("preset", list(load_presets()))
def test_every_preset_generates_on_tiny(client, preset):
    values = load_presets()[preset].resolved("cpu").values  # the test server runs on a CPU: the CPU tier
    files, texts = client.predict(prompt=f"{preset} test", preset=preset, seed=7, hires_steps=1, tile_size=16,
                                  tile_overlap=4, **TINY, api_name="/generate")
    scale = float(values.get("hires_scale", 1) or 1)
    size = hires_target(64, 64, scale) if scale > 1 else (64, 64)
    req = request_from_infotext(check_png(files[0], size))
    assert (req.prompt, req.seed, req.steps, req.sampler) == (f"{preset} test", 7, 2, values["sampler"])
    assert req.cfg == values["cfg"] and req.vae_decode == values["vae_decode"]
    assert req.hires.scale == scale


def test_bad_request_is_a_clear_error_and_the_server_keeps_answering(client):
    with pytest.raises(AppError, match="multiple of 8") as err:
        client.predict(prompt="x", model="tiny", width=1001, height=64, steps=2, api_name="/generate")
    assert "`width`" in str(err.value)
    with pytest.raises(AppError, match="preset"):
        client.predict(prompt="x", preset="no-such-tier", **TINY, api_name="/generate")
    files, _ = client.predict(prompt="still alive", seed=1, **TINY, api_name="/generate")
    check_png(files[0], (64, 64))


def test_two_controlnet_units_by_parameter_name(client, tmp_path):
    square, bar = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    bar.paste((255, 255, 255), (0, 24, 64, 40))
    square.save(tmp_path / "square.png")
    bar.save(tmp_path / "bar.png")
    files, texts = client.predict(prompt="two units", seed=4, **TINY, control_image=handle_file(str(tmp_path / "square.png")),
                                  control2_image=handle_file(str(tmp_path / "bar.png")), control2_scale=0.6,
                                  control2_end=0.5, api_name="/generate")
    text = check_png(files[0], (64, 64))
    assert 'ControlNet 0: "Module: canny, Model: default, Weight: 1,' in text
    assert 'ControlNet 1: "Module: canny, Model: default, Weight: 0.6, Guidance Start: 0, Guidance End: 0.5,' in text
    with pytest.raises(AppError, match="`control2_scale`"):
        client.predict(prompt="x", **TINY, control2_image=handle_file(str(tmp_path / "bar.png")), control2_scale=9,
                       api_name="/generate")


def test_a_submitted_job_reports_progress_and_cancelling_it_stops_the_run(app, client, monkeypatch):
    engine, real = app[1], app[1].generate
    seen = {"steps": 0, "after_cancel": 0, "finished": 0}

    def slow(req, *, callback=None, cancel=None, **kw):  # 150 steps of >= 50 ms: a run of several seconds
        def counting(info):
            seen["steps"] += 1
            seen["after_cancel"] += bool(cancel is not None and cancel.is_set())
            time.sleep(0.05)
            if callback is not None:
                callback(info)

        try:
            return real(req, callback=counting, cancel=cancel, **kw)
        finally:
            seen["finished"] += 1

    monkeypatch.setattr(engine, "generate", slow)
    job = client.submit(prompt="a long run", **{**TINY, "steps": 150}, api_name="/generate")
    deadline = time.monotonic() + 120
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    files, (text,) = job.outputs()[0]
    assert files == [] and text.startswith("Step 1/150")
    with contextlib.suppress(httpx.TimeoutException):  # the cancel POST waits for the stop; a loaded CI can pass 5 s
        job.cancel()
    while not seen["finished"] and time.monotonic() < deadline:
        time.sleep(0.05)
    log.warning("cancelled API job: %d of 150 steps ran, %d after the cancel token was set", seen["steps"],
                seen["after_cancel"])
    assert seen["finished"] == 1 and seen["steps"] < 100 and seen["after_cancel"] <= 1
    monkeypatch.setattr(engine, "generate", real)
    files, _ = client.predict(prompt="still here", seed=1, **TINY, api_name="/generate")  # the queue moved on
    check_png(files[0], (64, 64))


def test_upscale_by_parameter_name(client, tmp_path):
    src = tmp_path / "small.png"
    Image.new("RGB", (48, 40), (200, 60, 30)).save(src)
    path, text = client.predict(image=handle_file(str(src)), upscaler="lanczos", scale=2, api_name="/upscale")
    assert check_png(path, (96, 80)) == text
    assert "Hires upscaler: lanczos" in text


def test_upscale_with_refine(client, tmp_path):
    src = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (20, 120, 200)).save(src)
    path, text = client.predict(image=handle_file(str(src)), upscaler="lanczos", scale=1.5, denoise=0.3,
                                prompt="sharper", model="tiny", steps=2, seed=3, api_name="/upscale")
    req = request_from_infotext(check_png(path, (96, 96)))
    assert (req.prompt, req.seed, req.width, req.height) == ("sharper", 3, 96, 96)
    with pytest.raises(AppError, match="scale"):
        client.predict(image=handle_file(str(src)), scale=20, api_name="/upscale")


def test_api_is_documented_with_named_parameters(client):
    info = client.view_api(print_info=False, return_format="dict")
    gen = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    assert gen[:4] == ["prompt", "negative_prompt", "preset", "model"]
    assert all(p["parameter_has_default"] for p in info["named_endpoints"]["/generate"]["parameters"])
    assert {"control_image", "control2_image", "control3_image", "control3_guess_mode"} <= set(gen)
    assert "/upscale" in info["named_endpoints"]


def test_inpaint_with_an_uploaded_mask_by_parameter_name(client, tmp_path):
    import numpy as np

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 32, 40))
    mask.save(tmp_path / "mask.png")
    files, texts = client.predict(prompt="api inpaint", seed=5, **TINY, init_image=handle_file(str(tmp_path / "photo.png")),
                                  mask=handle_file(str(tmp_path / "mask.png")), strength=0.9, mask_blur=0,
                                  inpaint_area="only masked", outpaint_right=16, api_name="/generate")
    text = check_png(files[0], (80, 64))
    assert "Mask blur: 0, Inpaint area: Only masked" in text and "Masked area padding: 32" in text
    with Image.open(files[0]) as out:
        out_px = np.asarray(out.convert("RGB"))[:, :64]
    src = np.asarray(Image.open(tmp_path / "photo.png").convert("RGB"))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out_px[keep], src[keep]) and not np.array_equal(out_px[~keep], src[~keep])
    with pytest.raises(AppError, match="`mask` must have the image's size 64x64"):
        Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
        client.predict(prompt="x", **TINY, init_image=handle_file(str(tmp_path / "photo.png")),
                       mask=handle_file(str(tmp_path / "small.png")), api_name="/generate")
    with pytest.raises(AppError, match="`mask`"):  # a path string, not an upload: refused either way
        client.predict(prompt="x", **TINY, init_image=handle_file(str(tmp_path / "photo.png")),
                       mask="/etc/passwd", api_name="/generate")


def test_generate_keeps_the_parameter_order_it_had_before_the_schema():
    """Clients may pass /generate's arguments by position: the schema-derived order is the old one."""
    from ui.api import GENERATE_PARAMS

    before = [  # /generate's parameters up to the ControlNet units, as listed by hand before the schema
        "prompt", "negative_prompt", "preset", "model", "width", "height", "steps", "cfg", "sampler", "seed",
        "batch_size", "loras", "vae_decode", "emphasis", "clip_skip", "prompt_timeline", "feature_cache",
        "feature_cache_interval", "feature_cache_branch", "feature_cache_schedule", "hires_scale", "hires_upscaler",
        "hires_denoise", "hires_steps", "hires_sampler", "hires_prompt", "hires_negative_prompt", "hires_cfg",
        "hires_control_tile", "tile_mode", "tile_size", "tile_overlap", "tile_blend", "tile_batch", "tile_shift",
        "vae_tiling", "vae_tile_size", "vae_tile_mode", "memory_budget_gb", "regions", "region_base", "init_image",
        "strength", "mask", "mask_blur", "masked_content", "inpaint_area", "inpaint_padding", "inpaint_size",
        "mask_mode", "soft_inpainting", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"]
    units = [f"control{'' if i == 0 else i + 1}_{f}" for i in range(3) for f in
             ("image", "type", "model", "scale", "start", "end", "low", "high", "guess_mode")]
    assert list(GENERATE_PARAMS) == before + units
