"""The Gradio UI against a fake backend that follows pipelines.serving.service's contract (no torch, no engine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.errors import ValidationError
from pipelines.request import GenerationRequest, flatten
from pipelines.serving.service import Done, Progress  # the contract's event types (torch-free)

ROOT = Path(__file__).resolve().parent.parent


PRESETS = {"draft": {"steps": 8, "vae_decode": "taesd", "hires_scale": 1},
           "fast": {"steps": 20, "cfg": "7"},
           "balanced": {"steps": 25, "hires_scale": 1.5, "hires_denoise": 0.4, "hires_steps": 12}}


class FakeBackend:
    """The backend contract with instant, deterministic results; records every call and whether runs were closed."""

    def __init__(self, out: Path, *, gate: threading.Event | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.calls: list[tuple[str, dict]] = []
        self.closed = 0
        self.finished = 0
        self.gate = gate  # when set, each step waits for it (a slow GPU)

    def check(self, values: dict) -> None:
        self.calls.append(("check", dict(values)))
        for side in ("width", "height"):
            v = values.get(side)
            if v is not None and int(v) % 8:
                raise ValidationError(side, int(v), f"must be a multiple of 8; try {v - v % 8} or {v - v % 8 + 8}")
        if values.get("prompt") == "boom":
            raise RuntimeError("internal failure with a long traceback")

    def generate(self, values: dict):
        self.check(values)
        self.calls.append(("generate", dict(values)))
        return self._run(values)

    def _run(self, values: dict):
        steps = int(values.get("steps") or PRESETS.get(values.get("preset") or "", {}).get("steps", 4))
        size = (int(values.get("width") or 64), int(values.get("height") or 64))
        seed = int(values["seed"]) if values.get("seed") not in (None, -1) else 1234
        try:
            for i in range(steps):
                if self.gate is not None:
                    self.gate.wait(5)
                yield Progress(i + 1, steps, float(steps - i - 1), Image.new("RGB", size, "gray") if i % 2 else None)
            images, paths, texts, seeds = [], [], [], []
            for b in range(int(values.get("batch_size") or 1)):
                text = f"{values.get('prompt', '')}\nSteps: {steps}, Seed: {seed + b}, Size: {size[0]}x{size[1]}"
                img = Image.new("RGB", size, (10 * b, 80, 160))
                info = PngInfo()
                info.add_text("parameters", text)
                path = self.out / f"{len(self.calls):04d}-{seed + b}.png"
                img.save(path, pnginfo=info)
                images.append(img)
                paths.append(str(path))
                texts.append(text)
                seeds.append(seed + b)
            self.finished += 1
            yield Done(images, paths, texts, seeds, {"seconds": 0.1, "plan": "1 tile"}, ["a warning"])
        finally:
            if not self.finished:
                self.closed += 1

    def upscale(self, values: dict):
        self.calls.append(("upscale", dict(values)))
        with Image.open(values["image"]) as upload:  # the UI and the API hand the backend a file path
            image = upload.convert("RGB")
        scale = float(values.get("scale") or 2)
        if scale > 8:
            raise ValidationError("scale", scale, "must be in (1, 8]")
        big = image.resize((int(image.width * scale), int(image.height * scale)))
        path = self.out / "up.png"
        info = PngInfo()
        info.add_text("parameters", "up\nSteps: 0")
        big.save(path, pnginfo=info)
        yield Done([big], [str(path)], ["up\nSteps: 0"], [0])

    def describe(self, values: dict) -> str:
        return f"**{values.get('preset')}**: {values.get('width')}×{values.get('height')}, {values.get('steps')} steps"

    def token_count(self, model: str, text: str) -> str:
        n = len(text.split())
        return f"{n}/75 tokens, 1 chunk" if text else ""

    def cfg_plot(self, cfg: str, steps: int) -> Image.Image:
        if not re.fullmatch(r"[\d.]+|linear\([\d.]+,[\d.]+\)", cfg.replace(" ", "")):
            raise ValidationError("cfg", cfg, "must be a number or a schedule like linear(4,9)")
        return Image.new("RGB", (360, 160), "white")

    def read_info(self, image) -> tuple[str, dict]:
        text = image.info.get("parameters") if hasattr(image, "info") else None
        if not text:
            raise ValidationError("image", "upload", "has no generation parameters")
        values = flatten(GenerationRequest(prompt=text.splitlines()[0], seed=77, width=64, height=64))
        return text, values

    def control_preview(self, image, type: str, low: int, high: int) -> Image.Image:
        self.calls.append(("control_preview", {"type": type, "low": low, "high": high}))
        with Image.open(image) as upload:
            return upload.convert("L").convert("RGB")

    def choices(self) -> dict:
        return {"models": ["tiny", "tiny-sdxl"], "samplers": ["DPM++ 2M Karras", "Euler a"],
                "upscalers": ["lanczos", "latent", "latent-bicubic"], "controlnets": [],
                "preprocessors": ["canny", "none"], "presets": {n: f"{n} tier" for n in PRESETS},
                "defaults": flatten(GenerationRequest(model="tiny")), "default_model": "tiny",
                "latent_min_denoise": 0.5}

    def preset_values(self, name: str) -> dict:
        if name not in PRESETS:
            raise ValidationError("preset", name, f"must be one of: {', '.join(PRESETS)}")
        return dict(PRESETS[name])


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def backend(tmp_path) -> FakeBackend:
    return FakeBackend(tmp_path / "outputs")


@pytest.fixture
def demo(backend):
    from ui.app import create_demo

    return create_demo(backend, queue_size=4)


def handler(demo: gr.Blocks, name: str):
    """The Python function behind an event, found by its name (events are private, so not by api_name)."""
    matches = [fn for fn in demo.fns.values() if fn.name == name]
    assert matches, f"no event handler named {name}"
    return matches[0]


def initial_data(block_fn) -> dict:
    """{component: its initial value} for an event's inputs, as Gradio's dict-input form passes them."""
    return {c: c.value for c in block_fn.inputs}


def by_label(block_fn, label: str):
    return next(c for c in block_fn.inputs if getattr(c, "label", None) == label)


# ---------------------------------------------------------------- import hygiene

def test_ui_builds_without_torch(tmp_path):
    """Importing ui.app and building the demo must not import torch (checked in a clean interpreter)."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import ui.app\n"
        "from test_ui import FakeBackend\n"
        f"demo = ui.app.create_demo(FakeBackend({str(tmp_path)!r}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers') "
        "or m in ('pipelines.engine', 'pipelines.models.manager'))\n"
        "print('BAD', bad)\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ui_sources_do_not_import_the_engine():
    banned = re.compile(r"^\s*(import|from)\s+(torch|diffusers|pipelines\.engine|pipelines\.models)\b", re.M)
    for path in (ROOT / "ui").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not banned.search(text), path
        assert len(text.splitlines()) <= 400, f"{path.name} is over 400 lines"


# ---------------------------------------------------------------- the Blocks

def test_demo_has_named_api_and_one_gpu_queue(demo):
    config = demo.get_config_file()
    api_names = {d.get("api_name") for d in config["dependencies"] if d.get("api_visibility") == "public"}
    assert {"generate", "upscale"} <= api_names
    gpu = {fn.name for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert {"on_generate", "on_upscale", "on_map", "generate", "upscale"} <= gpu
    assert all(fn.concurrency_limit == 1 for fn in demo.fns.values() if fn.concurrency_id == "gpu")
    assert demo._queue.max_size == 4


def test_stop_cancels_the_generate_event(demo):
    config = demo.get_config_file()
    gen_id = next(i for i, fn in demo.fns.items() if fn.name == "on_generate")
    stop = [d for d in config["dependencies"] if d.get("cancels")]
    assert any(gen_id in d["cancels"] for d in stop)


def test_api_generate_parameters_are_request_fields(demo):
    info = demo.get_api_info()
    params = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    for name in ("prompt", "negative_prompt", "preset", "model", "width", "height", "steps", "cfg", "sampler",
                 "seed", "batch_size", "hires_scale", "hires_upscaler", "hires_denoise", "hires_steps", "tile_mode",
                 "tile_size", "tile_overlap", "tile_blend", "vae_tiling", "vae_decode", "loras"):
        assert name in params
    up = [p["parameter_name"] for p in info["named_endpoints"]["/upscale"]["parameters"]]
    assert up[:5] == ["image", "upscaler", "scale", "denoise", "prompt"]


# ---------------------------------------------------------------- handlers

def test_validation_error_becomes_gr_error_with_the_same_message(backend):
    from ui.generate_events import generate_updates

    gen = generate_updates(backend, backend.generate, {"prompt": "x", "width": 1001, "height": 64}, [])
    with pytest.raises(gr.Error) as err:
        next(gen)
    assert err.value.message == "`width` must be a multiple of 8; try 1000 or 1008, got 1001"


def test_unexpected_error_becomes_a_short_gr_error(backend, caplog):
    from ui.generate_events import generate_updates

    with pytest.raises(gr.Error) as err:
        next(generate_updates(backend, backend.generate, {"prompt": "boom"}, []))
    assert "failed unexpectedly (RuntimeError)" in err.value.message
    assert "traceback" not in err.value.message
    assert "Generation failed" in caplog.text


def test_generate_yields_progress_then_the_gallery(backend):
    from ui.generate_events import generate_updates

    seen = []
    updates = list(generate_updates(backend, backend.generate, {"prompt": "a fox", "steps": 4, "seed": 5,
                                                                 "batch_size": 2, "width": 64, "height": 64},
                                    [("old.png", "seed 1")], progress=lambda p, desc: seen.append(p)))
    assert updates[0]["progress"] == "Starting…"
    steps = [u["progress"] for u in updates[1:-1]]
    assert steps[0].startswith("Step 1/4") and steps[-1].startswith("Step 4/4")
    assert any(isinstance(u.get("preview"), Image.Image) for u in updates)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    last = updates[-1]
    paths = [p for p, _ in last["gallery"]]
    assert [c for _, c in last["gallery"]] == ["seed 5", "seed 6"]
    assert Image.open(paths[0]).info["parameters"].startswith("a fox")
    assert last["infotext"].startswith("a fox") and last["results"]["seeds"] == [5, 6]
    assert last["history"][:2] == last["gallery"] and last["history"][2] == ("old.png", "seed 1")
    assert "a warning" in last["notes"]


def test_closing_the_handler_cancels_the_backend_run(tmp_path):
    from ui.generate_events import generate_updates

    backend = FakeBackend(tmp_path)
    gen = generate_updates(backend, backend.generate, {"prompt": "x", "steps": 50}, [])
    assert next(gen)["progress"] == "Starting…"
    assert next(gen)["progress"].startswith("Step 1/50")
    gen.close()  # what Gradio does when Stop cancels the event
    assert backend.closed == 1 and backend.finished == 0


def test_request_values_map_widgets_to_backend_values():
    from ui.generate_events import request_values

    out = request_values({"loras": "a:0.5, b", "hires_sampler": "", "hires_cfg": " ", "prompt": "", "width": 512.0,
                          "strength": 0.4, "init_image": None, "tile_size": None})
    assert out == {"loras": ("a:0.5", "b"), "hires_sampler": None, "hires_cfg": None, "prompt": "", "width": 512,
                   "strength": None, "init_image": None, "tile_size": None}


def test_optional_numbers_are_text_boxes_that_send_none_when_empty(demo):
    from ui.components import request_value

    assert request_value("tile_size", "") is None and request_value("tile_size", " 64 ") == 64
    assert request_value("hires_denoise", "0.45") == 0.45 and request_value("hires_steps", "12.0") == 12
    assert request_value("tile_size", "big") == "big"  # the backend's validation names the field
    # gr.Number turns an empty value into 0 in the browser, so no Number may start empty
    numbers = [b for b in demo.blocks.values() if isinstance(b, gr.Number)]
    assert numbers and all(b.value is not None for b in numbers)


def test_small_helpers(backend):
    from ui.generate_events import cfg_plot, latent_warning, seed_of, selected_image

    results = {"paths": ["a", "b"], "infotexts": ["ta", "tb"], "seeds": [3, 4]}
    assert seed_of(results, 1) == 4 and seed_of(results, 9) == 3
    assert selected_image(results, 1) == (1, "tb")
    assert latent_warning("latent", 0.3, 2, 0.5)["visible"] is True
    assert latent_warning("latent", 0.6, 2, 0.5)["visible"] is False
    assert latent_warning("lanczos", 0.3, 2, 0.5)["visible"] is False
    assert latent_warning("latent", 0.3, 1, 0.5)["visible"] is False
    assert latent_warning("latent", "0.3", 2, 0.5)["visible"] is True  # the text box's value
    assert latent_warning("latent", "", 2, 0.5)["visible"] is False  # auto = 0.55 for latent
    assert latent_warning("latent", "abc", 2, 0.5)["visible"] is False
    bad = cfg_plot(backend, "linear(4", 20)
    assert bad["cfg_error"]["visible"] is True and "`cfg`" in bad["cfg_error"]["value"]
    assert isinstance(cfg_plot(backend, "7", 20)["cfg_plot"], Image.Image)


# ---------------------------------------------------------------- the wired events (dict-of-components form)

def test_generate_event_maps_components_by_name(demo, backend):
    fn = handler(demo, "on_generate")
    data = initial_data(fn)
    data[by_label(fn, "Prompt")] = "a lighthouse"
    data[by_label(fn, "Width")] = 128
    outputs = list(fn.fn(data))
    sent = next(v for k, v in backend.calls if k == "generate")
    assert sent["prompt"] == "a lighthouse" and sent["width"] == 128 and sent["preset"] == "fast"
    assert sent["steps"] == 20 and sent["strength"] is None and sent["control_image"] is None
    final = outputs[-1]
    gallery = next(v for c, v in final.items() if isinstance(c, gr.Gallery) and c.elem_id == "gallery")
    assert Image.open(gallery[0][0]).size == (128, 512)


def test_preset_event_fills_the_knobs(demo):
    out = {getattr(c, "label", None) or c.elem_id: v for c, v in handler(demo, "on_preset").fn("balanced").items()}
    assert out["Steps"] == 25 and out["Upscale by"] == 1.5 and out["Denoise"] == "0.4" and out["Refine steps"] == "12"
    assert out["Tile size"] == ""  # back to "auto"
    assert out["VAE decode"] == "full" and out["Refine sampler"] == ""
    assert "Prompt" not in out and "Width" not in out and "Control image" not in out
    fn = handler(demo, "on_describe")
    data = initial_data(fn)
    data[by_label(fn, "Preset")] = "balanced"
    assert fn.fn(data).startswith("**balanced**")


def test_info_tab_sends_values_to_generate(demo, backend, tmp_path):
    from ui.info_tab import read_info

    path = tmp_path / "in.png"
    info = PngInfo()
    info.add_text("parameters", "a red fox\nSteps: 3, Seed: 77, Size: 64x64")
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    text, values, status = read_info(backend, str(path))
    assert text.startswith("a red fox") and values["seed"] == 77 and status["visible"] is False
    out = {getattr(c, "label", None): v for c, v in handler(demo, "on_send").fn(values).items()}
    assert out["Prompt"] == "a red fox" and out["Seed"] == 77 and out["Width"] == 64 and out["LoRAs"] == ""
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_info(backend, str(tmp_path / "plain.png"))[2]["visible"] is True


def png_file(folder: Path, size: tuple[int, int], color="black") -> str:
    """What an image widget hands a handler now: the uploaded file's path (decoded only by the backend)."""
    path = folder / f"upload-{size[0]}x{size[1]}-{color}.png"
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_image_widgets_hand_over_files_not_decoded_images(demo):
    images = [c for c in demo.blocks.values() if isinstance(c, gr.Image) and c.interactive is not False]
    assert sorted(c.label for c in images) == ["Control image"] * 3 + ["Image", "Image to upscale", "Initial image",
                                                         "Or upload a mask (white = repaint)"]
    assert all(c.type == "filepath" and c.image_mode is None for c in images)  # image_mode would convert = decode


def test_uploads_leave_gradios_cache_on_a_schedule(demo):
    from ui.app import DELETE_CACHE

    frequency, age = demo.delete_cache  # Gradio sweeps its cache every `frequency` s, deleting files older than age
    assert demo.delete_cache == DELETE_CACHE and 0 < frequency <= age <= 24 * 3600


def test_upscale_event(demo, backend, tmp_path):
    fn = handler(demo, "on_upscale")
    data = initial_data(fn)
    data[by_label(fn, "Image to upscale")] = png_file(tmp_path, (40, 30))
    final = list(fn.fn(data))[-1]
    result = next(v for c, v in final.items() if (getattr(c, "label", None) or "").startswith("Upscaled"))
    assert Image.open(result).size == (80, 60)
    data[by_label(fn, "Image to upscale")] = None
    with pytest.raises(gr.Error, match="Upload an image"):
        list(fn.fn(data))


def test_control_map_preview(demo, backend, tmp_path):
    fn = handler(demo, "on_map")
    data = initial_data(fn)
    with pytest.raises(gr.Error, match="control image"):
        fn.fn(data)
    data[by_label(fn, "Control image")] = png_file(tmp_path, (32, 32), "red")
    assert fn.fn(data).size == (32, 32)
    assert backend.calls[-1] == ("control_preview", {"type": "canny", "low": 100, "high": 200})


def test_three_control_units_each_with_its_own_fields_and_preview(demo, backend, tmp_path):
    maps = [fn for fn in demo.fns.values() if fn.name == "on_map"]
    assert len(maps) == 3
    second = maps[1]
    assert {c.elem_id for c in second.outputs} == {"control-map-2"}
    data = initial_data(second)
    data[by_label(second, "Control image")] = png_file(tmp_path, (24, 16), "blue")
    data[by_label(second, "Canny low threshold")] = 40
    assert second.fn(data).size == (24, 16)
    assert backend.calls[-1] == ("control_preview", {"type": "canny", "low": 40, "high": 200})
    fn = handler(demo, "on_generate")
    data = initial_data(fn)
    data[by_label(fn, "Prompt")] = "units"
    images = [c for c in fn.inputs if getattr(c, "label", None) == "Control image"]
    scales = [c for c in fn.inputs if getattr(c, "label", None) == "Strength"]
    assert len(images) == len(scales) == 3
    data[images[2]] = png_file(tmp_path, (8, 8))
    data[scales[2]] = 0.4
    list(fn.fn(data))
    sent = next(v for k, v in backend.calls if k == "generate")
    assert sent["control_image"] is None and sent["control2_image"] is None
    assert Image.open(sent["control3_image"]).size == (8, 8) and sent["control3_scale"] == 0.4


def _drain(api_fn, **kwargs) -> list:
    """Every output of an API function (an async generator: `ui.runner.deliver`)."""
    import asyncio

    async def drain() -> list:
        return [item async for item in api_fn(**kwargs)]

    return asyncio.run(drain())


def test_api_functions_return_png_files(demo, backend):
    gen = handler(demo, "generate").fn
    *steps, (files, texts) = _drain(gen, prompt="api", width=64, height=64, steps=2, seed=9)
    # progress for clients that submit a job: ([], ["Step 1/2 · about 1 s left"]), ...
    assert [(files, [text.split(" · ")[0]]) for files, (text,) in steps] == [([], ["Step 1/2"]), ([], ["Step 2/2"])]
    assert files[0]["meta"] == {"_type": "gradio.FileData"} and texts[0].startswith("api")
    assert Image.open(files[0]["path"]).info["parameters"] == texts[0]
    with pytest.raises(gr.Error, match="multiple of 8"):
        _drain(gen, width=1001)
    assert json.dumps(files)  # plain JSON for the client


def test_zero_gpu_wraps_the_gpu_callables_only_on_zero_gpu_spaces(monkeypatch, backend):
    import types

    from ui.runner import GpuCalls, zero_gpu

    wrapped = []

    def gpu(duration=60):
        def deco(fn):
            wrapped.append((fn.__name__, duration))
            return fn
        return deco

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    GpuCalls(backend)
    assert wrapped == []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    calls = GpuCalls(backend)
    assert [name for name, _ in wrapped] == ["generate", "upscale"]
    assert list(calls.generate({"steps": 1}))[-1].seeds == [1234]
    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: run without it
    assert zero_gpu(len) is len
