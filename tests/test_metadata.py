"""A1111 infotext: exact format, round trips of requests, A1111 samples, hostile text, PNG/JPEG/WebP files."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.a1111 import PARAM_RE, param_pairs, parse_infotext
from pipelines.denoise.schedulers import SAMPLERS
from pipelines.errors import ValidationError
from pipelines.image_info import exif_info, png_info, read_parameters
from pipelines.metadata import VERSION, control_settings, infotext, request_from_infotext
from pipelines.request.schema import ControlUnit, GenerationRequest, HiresConfig, TileConfig

UPSCALERS = ("lanczos", "latent", "latent-bicubic", "latent-nearest-exact", "latent-antialiased", "4x-UltraSharp.pth")


def roundtrip(req: GenerationRequest, seed: int = 123) -> GenerationRequest:
    return request_from_infotext(infotext(req, seed=seed, model_hash="x"))


# ---------------------------------------------------------------- format

def test_exact_a1111_format():
    req = GenerationRequest(prompt="a cat", negative_prompt="blurry", model="tiny",
                            hires=HiresConfig(scale=2.0, upscaler="latent", denoise=0.35, steps=10))
    text = infotext(req, seed=123, model_hash="1a2b3c4d5e")
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 1a2b3c4d5e, Model: tiny, Denoising strength: 0.35, Hires upscale: 2, Hires steps: 10, "
        f"Hires upscaler: Latent, Version: {VERSION}"
    )


def test_defaults_need_no_tessera_key_and_no_negative_line():
    text = infotext(GenerationRequest(prompt="p"), seed=1, model_hash="")
    assert "Negative prompt" not in text and "Tessera" not in text and "Model hash" not in text
    assert text.splitlines()[0] == "p"


def test_schedule_written_as_max_scale_plus_our_key():
    text = infotext(GenerationRequest(cfg="linear(4,9), rescale=0.7"), seed=1, model_hash="x")
    params = parse_infotext(text)
    assert params["CFG scale"] == "9"
    assert params["CFG schedule"] == "linear(4,9), rescale=0.7"
    assert 'CFG schedule: "linear(4,9), rescale=0.7"' in text


def test_non_karras_sampler_is_automatic_and_clip_skip_written():
    params = parse_infotext(infotext(GenerationRequest(sampler="Euler a", clip_skip=2), seed=1, model_hash="x"))
    assert (params["Sampler"], params["Schedule type"], params["Clip skip"]) == ("Euler a", "Automatic", "2")


def test_img2img_strength_is_denoising_strength():
    params = parse_infotext(infotext(GenerationRequest(strength=0.6), seed=1, model_hash="x"))
    assert params["Denoising strength"] == "0.6"
    assert "Hires upscale" not in params


def test_extra_keys_appended_and_not_part_of_request():
    req = GenerationRequest(prompt="x", tiling=TileConfig(mode="on"))
    text = infotext(req, seed=7, model_hash="x",
                    extra={"Seam score": 1.03, "VAE notes": "fp32 VAE fallback", "Tile plan": "3x2 tiles, 96px, overlap 32"})
    params = parse_infotext(text)
    assert params["Seam score"] == "1.03" and params["VAE notes"] == "fp32 VAE fallback" and "VAE" not in params
    assert params["Tile plan"] == "3x2 tiles, 96px, overlap 32"
    assert list(params)[-1] == "Tessera"
    assert request_from_infotext(text) == replace(req, seed=7)


@pytest.mark.parametrize("key", ["Seed", "Tessera", "x", "bad:key", " lead", "trail ", "VAE", "VAE hash",
                                 "Hires denoising strength"])
def test_extra_keys_that_would_break_parsing_are_rejected(key):
    with pytest.raises(ValidationError) as err:
        infotext(GenerationRequest(), seed=1, model_hash="x", extra={key: 1})
    assert err.value.field == "extra"


# ---------------------------------------------------------------- round trips

ROUND_TRIP_CASES = [
    GenerationRequest(),
    GenerationRequest(prompt="a photo of a cat", cfg="7.5"),
    GenerationRequest(cfg="linear(4,9), rescale=0.7"),
    GenerationRequest(cfg="cosine(9,4)"),
    GenerationRequest(cfg="step(9,5,0.5)"),
    GenerationRequest(cfg="interval(7.5,0.2,0.8), rescale=0.3"),
    GenerationRequest(cfg="7, rescale=0.7"),
    GenerationRequest(cfg="7.0"),  # non-canonical text is kept exactly
    GenerationRequest(negative_prompt='worst quality, "bad" hands: 1.4, \\ back\nsecond line'),
    GenerationRequest(prompt="猫, ネコ — café ☕ 🐱", negative_prompt="ぼやけ"),
    GenerationRequest(prompt="line one\nline two, with comma\n\nafter blank"),
    GenerationRequest(prompt="  padded  ", negative_prompt=" padded too "),
    GenerationRequest(prompt="\nleading newline\r\nwindows"),
    GenerationRequest(prompt="Negative prompt: trick\nNegative prompt: again", negative_prompt="real"),
    GenerationRequest(prompt="", negative_prompt="only negative"),
    GenerationRequest(prompt="a\nSteps: 1, Sampler: Euler, CFG scale: 7"),
    GenerationRequest(loras=("lcm-lora-sdv1-5:1.0", "detail, tweaker:0.5", "plain")),
    GenerationRequest(width=768, height=1024, steps=40, clip_skip=2, model="my/model, v2", batch_size=4),
    GenerationRequest(strength=0.55, vae_decode="taesd", emphasis="none"),
    GenerationRequest(tiling=TileConfig(mode="on", size=64, overlap=16, blend="average", batch=4, shift=True,
                                        vae_tiling="on", vae_tile_size=64, memory_budget_gb=6.5)),
    GenerationRequest(hires=HiresConfig(scale=1.0, upscaler="latent", denoise=0.5)),  # stage 2 off, fields kept
    GenerationRequest(hires=HiresConfig(scale=1.5, sampler="Euler a", prompt="sharp, detailed", negative_prompt="",
                                        cfg="cosine(9,4)", steps=12, denoise=0.4), strength=0.8),
    GenerationRequest(hires=HiresConfig(scale=2.0, sampler="DPM++ 2M SDE Karras", cfg="5")),
    GenerationRequest(model=""),
]


@pytest.mark.parametrize("req", ROUND_TRIP_CASES)
def test_round_trip(req):
    assert roundtrip(req, seed=987654321) == replace(req, seed=987654321)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_round_trip_every_sampler(sampler):
    req = GenerationRequest(sampler=sampler, hires=HiresConfig(scale=2.0, sampler=sampler))
    text = infotext(req, seed=5, model_hash="x")
    assert "Tessera" not in text  # Sampler + Schedule type say it all
    assert request_from_infotext(text) == replace(req, seed=5)


@pytest.mark.parametrize("upscaler", UPSCALERS)
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_round_trip_hires_upscalers(upscaler, scale):
    req = GenerationRequest(prompt="x", hires=HiresConfig(scale=scale, upscaler=upscaler, steps=8))
    assert roundtrip(req) == replace(req, seed=123)


def test_batch_images_carry_their_own_seed():
    req = GenerationRequest(seed=100, batch_size=3)
    seeds = [request_from_infotext(infotext(req, seed=100 + i, model_hash="x")).seed for i in range(3)]
    assert seeds == [100, 101, 102]


_texts = st.text(max_size=60)
_requests = st.builds(
    GenerationRequest,
    prompt=_texts,
    negative_prompt=_texts,
    model=st.text(min_size=1, max_size=30),
    width=st.sampled_from([256, 512, 768]),
    steps=st.integers(1, 150),
    cfg=st.sampled_from(["7", "1", "0.5", "12.25", "linear(4,9)", "cosine(9,4), rescale=0.7", "step(9,5,0.5)"]),
    sampler=st.sampled_from(list(SAMPLERS)),
    strength=st.sampled_from([1.0, 0.3, 0.75]),
    loras=st.lists(st.text(min_size=1, max_size=12), max_size=3).map(tuple),
    clip_skip=st.integers(1, 4),
    hires=st.builds(HiresConfig, scale=st.sampled_from([1.0, 1.5, 2.0]), upscaler=st.sampled_from(UPSCALERS),
                    denoise=st.none() | st.floats(0, 1), steps=st.none() | st.integers(1, 50),
                    prompt=st.none() | _texts, cfg=st.none() | st.sampled_from(["5", "linear(3,6)"])),
)


@settings(max_examples=150, deadline=None)
@given(req=_requests, seed=st.integers(0, 2**32 - 1))
def test_round_trip_property(req, seed):
    assert roundtrip(req, seed) == replace(req, seed=seed)


# ---------------------------------------------------------------- A1111 samples

A1111_SAMPLE = (
    "masterpiece, best quality, 1girl, (red scarf:1.2), <lora:add_detail:0.6>\n"
    "snowy street\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, "
    "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer dilate erode: 4, "
    "ADetailer mask blur: 4, ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, "
    "ADetailer inpaint padding: 32, ADetailer version: 24.1.2, Hires upscale: 2, Hires steps: 15, "
    'Hires upscaler: Latent (bicubic), Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03", Emphasis: Original, Version: v1.9.4'
)


def test_parse_real_a1111_sample():
    params = parse_infotext(A1111_SAMPLE)
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["ADetailer model"] == "face_yolov8n.pt"
    req = request_from_infotext(A1111_SAMPLE)
    assert req == GenerationRequest(
        prompt="masterpiece, best quality, 1girl, (red scarf:1.2), <lora:add_detail:0.6>\nsnowy street",
        negative_prompt="(worst quality, low quality:1.4), easynegative",
        steps=30, sampler="DPM++ 2M Karras", cfg="7.5", seed=1234567890, width=512, height=768,
        model="v1-5-pruned-emaonly", clip_skip=2,
        hires=HiresConfig(scale=2.0, upscaler="latent-bicubic", steps=15, denoise=0.45),
    )


@pytest.mark.parametrize(("sampler_keys", "expected"), [
    ("Sampler: DPM++ 2M Karras", "DPM++ 2M Karras"),  # A1111 < 1.9
    ("Sampler: Euler a, Schedule type: Automatic", "Euler a"),
    ("Sampler: Euler, Schedule type: Karras", "Euler Karras"),
    ("Sampler: dpm++ 2m sde, Schedule type: karras", "DPM++ 2M SDE Karras"),
    ("Sampler: Euler a, Schedule type: Karras", "Euler a"),  # no Karras variant: schedule dropped
    ("Sampler: Euler, Schedule type: Exponential", "Euler"),
    ("Sampler: DPM++ SDE, Schedule type: Karras", "DPM++ SDE Karras"),  # unknown to us: kept for check_sampler
])
def test_sampler_mapping(sampler_keys, expected):
    req = request_from_infotext(f"p\nSteps: 20, {sampler_keys}, CFG scale: 7, Seed: 1, Size: 512x512")
    assert req.sampler == expected


@pytest.mark.parametrize(("name", "ours"), [
    ("Latent", "latent"), ("Lanczos", "lanczos"), ("Latent (bicubic)", "latent-bicubic"),
    ("Latent (nearest-exact)", "latent-nearest-exact"), ("Latent (antialiased)", "latent-antialiased"),
    ("R-ESRGAN 4x+", "R-ESRGAN 4x+"), ("4x-UltraSharp", "4x-UltraSharp"),
])
def test_upscaler_mapping(name, ours):
    text = f"p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Hires upscale: 1.5, Hires upscaler: {name}"
    assert request_from_infotext(text).hires.upscaler == ours


def test_hires_resize_becomes_scale_and_denoise_goes_to_stage_two():
    text = ("p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x768, Denoising strength: 0.5, "
            "Hires resize: 1024x1536, Hires upscaler: Latent")
    req = request_from_infotext(text)
    assert (req.hires.scale, req.hires.denoise, req.strength) == (2.0, 0.5, 1.0)


def test_base_supplies_what_the_text_does_not_say_and_hires_is_switched_off():
    base = GenerationRequest(tiling=TileConfig(mode="on"), batch_size=4, hires=HiresConfig(scale=2.0))
    req = request_from_infotext("cat\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 640x512", base)
    assert (req.tiling.mode, req.batch_size, req.hires.enabled) == ("on", 4, False)
    assert (req.prompt, req.steps, req.cfg, req.seed, req.width) == ("cat", 20, "5", 9, 640)


@pytest.mark.parametrize(("bad", "field"), [
    ("Steps: abc", "Steps"), ("Seed: 1.5", "Seed"), ("Size: big", "Size"), ("CFG scale: lots", "CFG scale"),
    ("Clip skip: two", "Clip skip"), ('CFG schedule: "wobble(1)"', "CFG schedule"),
    ("Hires upscale: x", "Hires upscale"), ("Hires upscale: 2, Hires steps: many", "Hires steps"),
    ('Tessera: "[1, 2]"', "Tessera"), ('Tessera: "not json"', "Tessera"),
    ('Tessera: "{\\"warp_drive\\": 9}"', "warp_drive"), ('Tessera: "{\\"init_image\\": \\"x\\"}"', "init_image"),
])
def test_bad_values_name_their_key(bad, field):
    text = f"p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, {bad}"
    with pytest.raises(ValidationError) as err:
        request_from_infotext(text)
    assert err.value.field == field


@pytest.mark.parametrize("text", ["", "just a prompt", "a: 1, b: 2, c: 3", "Negative prompt: x", "\n\n"])
def test_text_that_is_not_infotext(text):
    with pytest.raises(ValidationError, match="is not Stable Diffusion generation parameters") as err:
        request_from_infotext(text)
    assert err.value.field == "parameters"


def test_parse_without_key_value_line_is_all_prompt():
    assert parse_infotext("one\ntwo: 2") == {"Prompt": "one\ntwo: 2", "Negative prompt": ""}


# ---------------------------------------------------------------- ControlNet units

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["canny", "none", "depth"]), st.sampled_from([None, "my-cn", "a b"]),
                          st.floats(0, 2), st.floats(0, 1), st.integers(0, 255), st.booleans()), max_size=3))
def test_control_units_round_trip(units):
    control = tuple(ControlUnit(None, kind, model, scale, start, 1.0, low, 200, guess)
                    for kind, model, scale, start, low, guess in units)
    text = infotext(GenerationRequest(prompt="p", control=control), seed=1, model_hash="")
    read = control_settings(text, 3)
    for unit, got in zip(control, read, strict=False):
        want = {"type": unit.type, "model": unit.model, "scale": unit.scale, "start": unit.start, "end": 1.0,
                "guess_mode": unit.guess_mode}
        if unit.type == "canny":
            want |= {"low": unit.low, "high": 200}
        assert got == want
    assert read[len(control):] == [{}] * (3 - len(control))
    assert request_from_infotext(text).prompt == "p"


def test_control_units_from_sd_webui_controlnet():
    text = ('x\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, ControlNet 0: "Module: canny, Model: '
            'control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and Resize, Low Vram: False, '
            'Processor Res: 512, Threshold A: 64, Threshold B: 128, Guidance Start: 0.1, Guidance End: 0.9, '
            'Pixel Perfect: False, Control Mode: Balanced", ControlNet 1: "Module: depth_midas, Model: '
            'control_v11f1p_sd15_depth [cfd03158], Weight: nan, Threshold A: 64, Guidance Start: x, Guidance End: 1, '
            'Control Mode: ControlNet is more important"')
    first, second, third = control_settings(text, 3)
    assert first == {"type": "canny", "model": "control_v11p_sd15_canny", "scale": 0.8, "start": 0.1, "end": 0.9,
                     "low": 64, "high": 128, "guess_mode": False}
    # aliases to this app's names; unreadable numbers and non-canny thresholds are left out
    assert second == {"type": "depth", "model": "control_v11f1p_sd15_depth", "end": 1.0, "guess_mode": True}
    assert third == {} and control_settings("no units here", 2) == [{}, {}]


# ---------------------------------------------------------------- hostile text

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_infotext_never_raises(text):
    out = parse_infotext(text)
    assert isinstance(out["Prompt"], str) and isinstance(out["Negative prompt"], str)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab -/:,\"\\\t\n é", max_size=40))
def test_param_pairs_equals_a1111_findall(line):
    assert param_pairs(line) == PARAM_RE.findall(line)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_request_from_infotext_raises_only_validation_errors(text):
    with contextlib.suppress(ValidationError):
        request_from_infotext(text)
    assert len(control_settings(text, 2)) == 2  # never raises


@pytest.mark.parametrize("unit", ["a", " ", "a -", "\t ", "ab: \"x", 'k: "\\'])
def test_hostile_long_line_parses_in_linear_time(unit):
    line = "p\nSteps: 1, Sampler: Euler, Seed: 2, " + unit * (200_000 // len(unit))
    start = time.perf_counter()
    parse_infotext(line)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- files

PARAMS = "a cat, ☕ ünïcode\nNegative prompt: dog\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"


def test_png_write_read_round_trip(tmp_path):
    path = tmp_path / "out.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path, pnginfo=png_info(PARAMS))
    assert read_parameters(path) == PARAMS
    assert read_parameters(str(path)) == PARAMS
    assert read_parameters(path.read_bytes()) == PARAMS
    with Image.open(path) as im:
        assert read_parameters(im) == PARAMS
    req = request_from_infotext(read_parameters(path))
    assert (req.prompt, req.steps, req.sampler) == ("a cat, ☕ ünïcode", 20, "Euler")


def test_png_latin1_text_chunk(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info("cat\nSteps: 1, Sampler: Euler, Seed: 1"))
    assert read_parameters(path) == "cat\nSteps: 1, Sampler: Euler, Seed: 1"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_round_trip(tmp_path, fmt):
    path = tmp_path / f"out.{fmt.lower()}"
    Image.new("RGB", (32, 32)).save(path, fmt, exif=exif_info(PARAMS))
    assert read_parameters(path) == PARAMS


def test_image_without_parameters_gives_none(tmp_path):
    path = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_parameters(path) is None
    assert read_parameters(Image.new("RGB", (8, 8))) is None


def test_truncated_png_never_raises(tmp_path):
    path = tmp_path / "cut.png"
    Image.effect_noise((256, 256), 50).convert("RGB").save(path, pnginfo=png_info(PARAMS))
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 200):
        broken = tmp_path / f"cut{cut}.png"
        broken.write_bytes(data[:cut])
        assert read_parameters(broken) in (PARAMS, None)


def test_non_image_and_missing_file_raise_validation_error(tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("hello")
    with pytest.raises(ValidationError, match="is not an image"):
        read_parameters(text_file)
    with pytest.raises(ValidationError, match="is not an existing image file"):
        read_parameters(tmp_path / "missing.png")
