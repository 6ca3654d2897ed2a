"""Issue 16's "also fix" list: text that cannot reach a tokenizer or a file name, the cancel/last-step boundary,
and the planner's estimate before a model is loaded."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.errors import ValidationError
from pipelines.service import Backend
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
