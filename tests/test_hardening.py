"""Issue 16's "also fix" list: text that cannot reach a tokenizer or a file name, the cancel/last-step boundary,
and the planner's estimate before a model is loaded."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.errors import ValidationError
from pipelines.serving.service import Backend
from tests.test_cli import run_cli

SURROGATE = "a \ud800 fox"
LONG_NAME = "a" * 4100  # over NAME_MAX: models/lora/<name>.safetensors raised OSError (File name too long)


def _tiny(**kw):
    return {"model": "tiny", "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 1, **kw}


@pytest.mark.parametrize(("values", "field"), [
    ({"prompt": SURROGATE}, "prompt"),
    ({"negative_prompt": SURROGATE}, "negative_prompt"),
    ({"hires_scale": 2, "hires_prompt": SURROGATE}, "hires_prompt"),
    ({"hires_scale": 2, "hires_negative_prompt": SURROGATE}, "hires_negative_prompt"),
    ({"model": "tiny\ud800"}, "model"),
    ({"model": LONG_NAME}, "model"),
    ({"model": "tiny\x00"}, "model"),
    ({"sampler": "Euler\udcff"}, "sampler"),
    ({"hires_scale": 2, "hires_sampler": "Euler\ud800"}, "hires_sampler"),
    ({"hires_scale": 2, "hires_upscaler": "x\ud800.pth"}, "hires_upscaler"),
    ({"hires_scale": 2, "hires_upscaler": LONG_NAME + ".pth"}, "hires_upscaler"),
    ({"loras": LONG_NAME + ":1"}, "loras"),
    ({"loras": "a\ud800:0.5"}, "loras"),
    ({"loras": ", ".join(f"l{i}:1" for i in range(40))}, "loras"),
    ({"control_image": "img", "control_type": "canny\ud800"}, "control_type"),
    ({"control_image": "img", "control_model": LONG_NAME}, "control_model"),
    ({"control_image": "img", "control2_image": "img", "control2_model": "m\ud800"}, "control2_model"),
])
def test_bad_text_is_a_field_error_at_validation(engine, values, field):
    """Lone surrogates (TypeError in the tokenizer), over-long names (OSError in the file lookup), control
    characters and too many LoRAs are refused by validation, naming the field the caller used."""
    values = {k: Image.new("RGB", (64, 64)) if v == "img" else v for k, v in values.items()}
    with pytest.raises(ValidationError) as err:
        Backend(engine).request(_tiny(**values))
    assert err.value.field == field
    assert "\n" not in str(err.value) and str(err.value).startswith(f"`{field}` ")
    str(err.value).encode("utf-8")  # the message itself is printable anywhere


def test_generation_with_bad_text_saves_nothing(engine):
    """The refusal comes before any work: no stream, no file."""
    with pytest.raises(ValidationError, match="unpaired surrogate U\\+D800 at character 2"):
        Backend(engine).generate(_tiny(prompt=SURROGATE))
    assert not engine.outputs_dir.exists() or not any(engine.outputs_dir.rglob("*.png"))


def test_good_unicode_still_passes(engine):
    """Paired surrogates written as one character (emoji), accents and CJK are valid text."""
    req = Backend(engine).request(_tiny(prompt="a 🦊 in the snow, café, 雪", negative_prompt="blur ✗"))
    assert req.prompt == "a 🦊 in the snow, café, 雪"


def test_upscale_checks_its_texts(engine):
    """The upscale endpoint's prompt (written into the PNG even without a refine) and names are checked too."""
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValidationError) as err:
        engine.upscale(image, scale=2, prompt=SURROGATE)
    assert err.value.field == "prompt"
    with pytest.raises(ValidationError) as err:
        engine.upscale(image, scale=2, upscaler=LONG_NAME)
    assert err.value.field == "upscaler"


@pytest.mark.parametrize(("args", "option"), [
    (["--prompt", b"a \xff fox"], "prompt"),  # bytes that are not UTF-8 arrive as a lone surrogate (\udcff)
    (["--prompt", "a fox", "--lora", LONG_NAME + ":1"], "loras"),
    (["--prompt", "a fox", "--preset", "p" * 300], "--preset"),
])
def test_cli_bad_text_exits_2_with_one_line(tmp_path, tiny_cache, args, option):
    r = run_cli("generate", "--model", "tiny", "--steps", "2", "--width", "64", "--height", "64", *args,
                "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: `{option}` "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


# ---------------------------------------------------------------- the plan before the model is loaded

def _plan_req(model: str):
    from pipelines.request.schema import TileConfig
    from tests.conftest import tiny_request

    return tiny_request(model=model, width=256, height=256, tiling=TileConfig(memory_budget_gb=64))


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_tiny_estimate_before_loading_matches_after(engine, manager, name):
    """The plan shown before the first run used SD 1.5 sizes for tiny (6.6 GB before, 0.2 GB after)."""
    before = engine.plan(_plan_req(name)).est_peak_bytes
    after = engine.plan(_plan_req(name), manager.get(name)).est_peak_bytes
    assert 1 / 1.5 <= before / after <= 1.5, (before, after)


@pytest.mark.parametrize(("hub_id", "fp16_gb"), [("stable-diffusion-v1-5/stable-diffusion-v1-5", 2.13),
                                                 ("stabilityai/stable-diffusion-xl-base-1.0", 6.94)])
def test_catalogue_estimate_uses_the_models_own_size_without_download(tmp_path, hub_id, fp16_gb):
    from pipelines.engine import Engine
    from pipelines.models.manager import ModelManager
    from pipelines.models.sizes import known_sizes
    from pipelines.planner import ModelFootprint, PlanInput, plan_generation

    manager = ModelManager(tmp_path / "models", device="cpu", dtype="fp16")  # loads nothing
    weights = known_sizes(manager.resolve(hub_id), 2)["weights"]
    assert weights == pytest.approx(fp16_gb * 1e9, rel=0.01)
    plan = Engine(manager, None).plan(_plan_req(hub_id))
    family = "sdxl" if "xl" in hub_id else "sd1"
    expected = plan_generation(PlanInput(256, 256, budget_bytes=64_000_000_000, family=family, dtype_bytes=2,
                                         model=ModelFootprint(weights=weights)))
    assert plan.est_peak_bytes == expected.est_peak_bytes
    assert manager.current is None


def test_local_folder_size_is_read_from_its_files(tmp_path, tiny_dir, manager):
    import shutil

    from pipelines.models.loading import Source
    from pipelines.models.sizes import known_sizes
    from pipelines.request_plan import model_sizes

    folder = shutil.copytree(tiny_dir, tmp_path / "mine")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not counted: a variant copy")
    sizes = known_sizes(Source("folder", str(folder)), 4)
    loaded = model_sizes(manager.get("tiny"))
    assert sizes["weights"] == pytest.approx(loaded["weights"], rel=0.01)
    assert sizes["activation_scale"] == loaded["activation_scale"]


def test_single_file_size_counts_every_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipelines.models.loading import Source
    from pipelines.models.sizes import known_sizes

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.a": torch.zeros(3, 4), "first_stage_model.b": torch.zeros(5)}, str(path))
    assert known_sizes(Source("file", str(path)), 2) == {"weights": 34}
    path.write_bytes(b"\xff" * 16)  # not a safetensors file: the planner falls back to its constants
    assert known_sizes(Source("file", str(path)), 2) == {}
