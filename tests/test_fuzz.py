"""Hostile input: generated (random field values, unknown keys, bracket soup, CFG text, infotext) and a fixed table.

The contract: every entry point either returns a usable value or raises ValidationError whose message starts with
the backquoted name of the field at fault; no other exception type escapes. The table at the end sends the same bad
inputs through the CLI (exit code 2, one line, no traceback) and the UI backend (TesseraError, same message), and
checks that path-like names are refused without the file being opened.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.errors import TesseraError, ValidationError
from pipelines.metadata import request_from_infotext
from pipelines.prompts.encoding import PromptEncoder
from pipelines.prompts.parser import parse_weighted, prompts_per_step
from pipelines.request.cfg import GuidanceSchedule, parse_cfg
from pipelines.request.schema import GenerationRequest, flat_fields, from_flat
from pipelines.request.validation import validate
from pipelines.serving.service import Backend
from tests.conftest import tiny_request

FIELD_FIRST = re.compile(r"^`([^`]+)` ")
FLAT = sorted(flat_fields())
BASE = tiny_request()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW_FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

PATHS = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "~/.ssh/id_rsa", "file:///etc/passwd",
         "models/../../../x", "tiny/../../x", "\x00", "NUL", "./tiny", "http://169.254.169.254/"]
NUMBER_TEXT = ["nan", "inf", "-inf", "-1", " 64 ", "1e309", "0x40", "６４", "", "7,5", "1_000", "9" * 5000]
HUGE = [10**400, -(10**400), 10**5000, 2**64, -(2**63) - 1]

values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.sampled_from(PATHS),
    st.sampled_from(NUMBER_TEXT), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.tuples(st.text(max_size=5)),
)
SYNTAX = "()[]{}:|\\,.-0123456789 abBREAKAND\n\t"
bracket_soup = st.text(alphabet=SYNTAX, max_size=300)
prompts = st.one_of(st.text(max_size=300), bracket_soup)


def _assert_names_a_field(exc: ValidationError, allowed: set[str]) -> None:
    message = str(exc)
    m = FIELD_FIRST.match(message)
    assert m, f"message does not start with a backquoted field name: {message[:120]!r}"
    sent = re.sub(r"^regions\[\d+\](\.\w+)?$", "regions", exc.field)  # one region's field: regions[2].x
    assert m[1] == exc.field and sent in allowed, (exc.field, sorted(allowed))


def _assert_normalised(req: GenerationRequest) -> None:
    """What `validate` promises: numbers are numbers of the right type, texts are texts."""
    for name in ("width", "height", "steps", "batch_size", "seed", "clip_skip"):
        assert type(getattr(req, name)) is int, name
    assert type(req.strength) is float and math.isfinite(req.strength)
    assert isinstance(req.cfg, str) and isinstance(parse_cfg(req.cfg), GuidanceSchedule)
    assert isinstance(req.prompt, str) and isinstance(req.negative_prompt, str)
    assert isinstance(req.loras, tuple) and all(isinstance(s, str) for s in req.loras)
    assert isinstance(req.sampler, str) and isinstance(req.tiling.shift, bool)
    h = req.hires
    assert type(h.scale) is float and math.isfinite(h.scale)
    assert h.cfg is None or isinstance(h.cfg, str)
    for text in (h.prompt, h.negative_prompt):
        assert text is None or (isinstance(text, str) and len(text) <= 10_000)


# ---------------------------------------------------------------- request validation

@FUZZ
@given(fields=st.dictionaries(st.sampled_from(FLAT), values, min_size=1, max_size=4))
def test_validate_returns_a_request_or_names_the_bad_field(fields):
    try:
        req = validate(from_flat(fields, BASE))
    except ValidationError as exc:
        # a product check (width x height) names width when only height was sent
        _assert_names_a_field(exc, set(fields) | ({"width"} if "height" in fields else set()))
    else:
        _assert_normalised(req)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(FLAT), values, min_size=1, max_size=3))
def test_engine_check_returns_a_request_or_names_the_bad_field(manager, fields):
    """`Engine.check` adds the names (sampler, model, upscaler): still only ValidationError, nothing loaded."""
    from pipelines.engine import Engine

    engine = Engine(manager, None)
    try:
        engine.check(from_flat(fields, BASE))
    except ValidationError as exc:
        _assert_names_a_field(exc, set(fields) | ({"width"} if "height" in fields else set()))


@FUZZ
@given(key=st.text(min_size=1, max_size=30), value=values)
def test_from_flat_rejects_unknown_keys_by_name(key, value):
    if key in flat_fields() or key in ("control", "init_image", "mask"):
        return
    with pytest.raises(ValidationError) as err:
        from_flat({"prompt": "x", key: value, "steps": 3})
    assert err.value.field == key
    assert str(err.value).startswith(f"`{key}` is not a known setting")


# ---------------------------------------------------------------- prompts as the engine sees them

@FUZZ
@given(prompt=prompts, steps=st.integers(1, 150))
@example(prompt="[" * 3000 + "a:b:0.5" + "]" * 3000, steps=150)
@example(prompt="(" * 4990 + "x:1e309" + ")" * 4990, steps=20)
@example(prompt="[a|" * 2000, steps=150)
@example(prompt=("(a:-1e308) BREAK [b:c:" * 500)[:10_000], steps=150)
def test_engine_check_accepts_any_prompt_and_the_schedule_parses(manager, prompt, steps):
    from pipelines.engine import Engine

    req = Engine(manager, None).check(tiny_request(prompt=prompt, negative_prompt=prompt[::-1], steps=steps))
    for text in (req.prompt, req.negative_prompt):
        per_step = prompts_per_step(text, req.steps)
        assert len(per_step) == steps and all(isinstance(p, str) for p in per_step)
        for p in set(per_step):
            assert parse_weighted(p)


def test_prompt_over_the_limit_is_refused_with_the_limit(engine):
    with pytest.raises(ValidationError, match=r"^`prompt` must be at most 10000 characters"):
        engine.check(tiny_request(prompt="(" * 10_001))


@SLOW_FUZZ
@given(prompt=prompts)
@example(prompt="(a:0) (b:0)")
@example(prompt="(a:-1) (a:1)")
@example(prompt="(x:1e308) " * 40)
@example(prompt=("[(" * 400 + "a" + ")]" * 400))
def test_any_prompt_encodes(manager, prompt):
    """Through the tiny text encoder with either emphasis: no crash, and no NaN/inf reaching the UNet."""
    import torch

    from pipelines.denoise.stages import PromptCache, build_conditioning
    from tests.conftest import stage_spec

    model = manager.get("tiny")
    a1111, plain = ([build_conditioning(model, stage_spec(prompt=prompt, emphasis=e, steps=3), PromptCache(), 3)(i)
                     for i in range(3)] for e in ("a1111", "none"))
    assert len(a1111) == len(plain) == 3 and a1111[0].cond.shape == plain[0].cond.shape
    for cond in (*a1111, *plain):
        assert torch.isfinite(cond.cond).all(), f"non-finite embeddings for {prompt[:60]!r}"


def test_a1111_emphasis_stays_finite_when_the_mean_is_near_zero(manager):
    """Found by the fuzz above: the tiny SD1 encoder's outputs average ~0, and the mean restore divided by it."""
    import torch

    encoder = PromptEncoder.from_pipe(manager.get("tiny").pipe)
    assert torch.isfinite(encoder.encode("000000[112").embeds).all()


# ---------------------------------------------------------------- guidance text and infotext

@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.text(alphabet="linearcosstepintv()0123456789.,=e-+ na", max_size=60),
                      st.sampled_from(NUMBER_TEXT), st.floats(allow_nan=True, allow_infinity=True)))
@example(text="linear(" + "1," * 5000 + "1)")
@example(text="linear(4,9), rescale=" + "9" * 400)
@example(text=" " * 10_000 + "7")
def test_parse_cfg_returns_a_schedule_or_a_cfg_error(text):
    try:
        schedule = parse_cfg(text)
    except ValidationError as exc:
        _assert_names_a_field(exc, {"cfg"})
    else:
        assert all(math.isfinite(p) for p in schedule.params)


INFO_KEYS = ["Steps", "Sampler", "Schedule type", "CFG scale", "CFG schedule", "Seed", "Size", "Model", "Clip skip",
             "Denoising strength", "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler",
             "Hires CFG Scale", "Hires prompt", "Hires denoising strength", "Inpaint area", "Loras", "Tessera",
             "Version", "Unknown key"]
info_values = st.one_of(
    st.integers(-(10**30), 10**30).map(str), st.floats().map(str), st.text(alphabet="0123456789x.e-", max_size=12),
    st.sampled_from(['{"width": 64}', '{"tile_mode": "on"}', '{"hires": 1}', "[1]", '{"control": 1}', '"quoted, text"',
                     '{"width": 1e999}', '{"loras": 5}', "Euler a", "DPM++ 2M", "Karras", "64x64", "0x0", "1x99999",
                     "Only masked"]),
    st.text(max_size=20),
)


@FUZZ
@given(prompt=st.text(max_size=50), pairs=st.lists(st.tuples(st.sampled_from(INFO_KEYS), info_values), min_size=3,
                                                  max_size=10))
def test_request_from_infotext_returns_a_request_or_a_validation_error(prompt, pairs):
    line = ", ".join(f"{k}: {v}" for k, v in pairs)
    try:
        req = request_from_infotext(f"{prompt}\n{line}")
    except ValidationError as exc:
        assert FIELD_FIRST.match(str(exc)), str(exc)[:120]
    else:
        assert isinstance(req, GenerationRequest)


@pytest.mark.parametrize("line", [
    "Steps: 2, Sampler: Euler, Size: " + "9" * 5000 + "x8",
    "Steps: 2, Sampler: Euler, Size: 8x8, Hires resize: " + "9" * 5000 + "x8",
    "Steps: 2, Sampler: Euler, Seed: 1, Tessera: " + "[" * 100_000,
], ids=["size-digits", "hires-resize-digits", "nested-json"])
def test_request_from_infotext_hostile_numbers_and_nesting(line):
    with pytest.raises(ValidationError):
        request_from_infotext("a prompt\n" + line)


# ---------------------------------------------------------------- the bad-input table: CLI and backend

ROOT = Path(__file__).resolve().parent.parent
SECRET = "/etc/passwd"
TRAVERSAL = "../../etc/passwd"
LONG_PROMPT = "a" * 100_000
IMAGE_ERROR = "must be a PNG/JPEG/WebP image of at most 64 MP"


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header (IHDR) that claims width x height, with almost no data: a decompression bomb's signature."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-input")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "ok.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (folder / "notes.txt").write_text("a text file, not an image\n")
    return {p.stem: str(p) for p in folder.iterdir()}


# name -> (backend values, CLI arguments or None, expected text (both, or (backend, CLI)), same message in both?)
# The CLI may name model files by path (the UI may not), so its model messages differ by design.
BAD_INPUT = {
    "width-huge": ({"width": 100_000}, ["--width", "100000"], "`width` must be between 64 and 8192, got 100000", True),
    "width-negative": ({"width": -64}, ["--width", "-64"], "`width` must be between 64 and 8192, got -64", True),
    "steps-negative": ({"steps": -3}, ["--steps", "-3"], "`steps` must be between 1 and 150, got -3", True),
    "steps-text": ({"steps": "abc"}, None, "`steps` must be a whole number, got 'abc'", False),
    "model-traversal": ({"model": TRAVERSAL}, ["--model", TRAVERSAL], ("`model` is not a known model", "`model` "), False),
    "model-absolute": ({"model": SECRET}, ["--model", SECRET],
                       ("`model` is not a known model", "`model` must be a .safetensors file"), False),
    "upscaler-traversal": ({"hires_scale": 2, "hires_upscaler": TRAVERSAL},
                           ["--hires-scale", "2", "--hires-upscaler", TRAVERSAL],
                           "`hires_upscaler` must be an upscaler name from the list, not a path", True),
    "upscaler-absolute": ({"hires_scale": 2, "hires_upscaler": SECRET}, ["--hires-scale", "2", "--hires-upscaler", SECRET],
                          "`hires_upscaler` must be an upscaler name from the list, not a path", True),
    "controlnet-traversal": ({"control_image": "{ok}", "control_model": TRAVERSAL},
                             ["--control", "canny:{ok}", "--control-model", TRAVERSAL], "not a path outside it", False),
    "controlnet-absolute": ({"control_image": "{ok}", "control_model": SECRET},
                            ["--control", "canny:{ok}", "--control-model", SECRET], "not a path outside it", False),
    "prompt-100k": ({"prompt": LONG_PROMPT}, ["--prompt", LONG_PROMPT], "`prompt` must be at most 10000 characters", True),
    "init-truncated": ({"init_image": "{truncated}"}, ["--init-image", "{truncated}"],
                       f"`init_image` {IMAGE_ERROR} (it is not an image, or it is truncated)", True),
    "init-bomb": ({"init_image": "{bomb}"}, ["--init-image", "{bomb}"], f"`init_image` {IMAGE_ERROR} (it is far too large)",
                  True),
    "init-text-file": ({"init_image": "{notes}"}, ["--init-image", "{notes}"], f"`init_image` {IMAGE_ERROR}", True),
    "init-bytes": ({"init_image": b"GIF89a not really"}, None, f"`init_image` {IMAGE_ERROR}", False),
    "control-bomb": ({"control_image": "{bomb}"}, ["--control", "canny:{bomb}"], "(it is far too large)", False),
    "control-text-file": ({"control_image": "{notes}"}, ["--control", "canny:{notes}"], IMAGE_ERROR, False),
}


def _fill(item, files: dict[str, str]):
    """Put the fixture's file paths into a case's "{name}" placeholders."""
    if isinstance(item, str):
        for name, path in files.items():
            item = item.replace("{" + name + "}", path)
        return item
    if isinstance(item, dict):
        return {k: _fill(v, files) for k, v in item.items()}
    if isinstance(item, list):
        return [_fill(v, files) for v in item]
    return item


CLI_BASE = ["generate", "--model", "tiny", "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64"]
# Run as real processes (python app.py generate ...); every CLI case also runs in-process through cli.main.
SUBPROCESS_CASES = ("width-huge", "model-absolute", "prompt-100k", "init-text-file", "controlnet-traversal")


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *CLI_BASE, *args, "--out", str(cwd / "out")],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=180)


@pytest.fixture(scope="module")
def cli_results(bad_files, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The subprocess cases, run three at a time (each is one short-lived `python app.py generate`)."""
    cwd = tmp_path_factory.mktemp("cli-bad-input")
    cases = {name: _fill(BAD_INPUT[name][1], bad_files) for name in SUBPROCESS_CASES}
    cases["steps-text"] = ["--steps", "abc"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_cli, args, cwd) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def _expected(name: str, where: str) -> str:
    text = BAD_INPUT[name][2]
    return text if isinstance(text, str) else text[where == "cli"]


def _assert_one_error_line(stderr: str, expected: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: `"), stderr[-2000:]
    assert expected in lines[0]
    return lines[0]


_opened: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None:
        _opened.append(str(args[0]))


@pytest.fixture
def opened_files():
    """Paths opened (by anything in this process) during the test, seen through an audit hook."""
    global _opened, _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # hooks cannot be removed; this one records only while a test asks
        _hooked = True
    _opened = []
    yield _opened
    _opened = None


def _backend_error(engine, files: dict[str, str], name: str) -> str:
    """The message the UI backend raises for case `name` (the whole stream is consumed, as Gradio would)."""
    values = {"prompt": "x", "model": "tiny", "width": 64, "height": 64, "steps": 2, **_fill(BAD_INPUT[name][0], files)}
    with pytest.raises(TesseraError) as err:
        list(Backend(engine).generate(values))
    return str(err.value)


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_backend_bad_input_is_a_one_line_error_and_opens_nothing(engine, bad_files, opened_files, name):
    message = _backend_error(engine, bad_files, name)
    assert _expected(name, "backend") in message and "\n" not in message and FIELD_FIRST.match(message), message
    assert not engine.gpu_lock.locked() and not engine.outputs_dir.exists()
    assert not [p for p in opened_files if p.endswith("passwd")], "a path-like name was opened"


@pytest.mark.parametrize("name", [n for n, case in BAD_INPUT.items() if case[1] is not None])
def test_cli_bad_input_is_one_line_and_exit_2(engine, bad_files, tmp_path, capsys, opened_files, name):
    """cli.main in this process: exit code 2, one `error:` line naming the field, the UI's message where shared."""
    from cli import main

    args = [*CLI_BASE, *_fill(BAD_INPUT[name][1], bad_files), "--out", str(tmp_path / "out"),
            "--models-dir", str(tmp_path / "models"), "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 2
    out = capsys.readouterr()
    line = _assert_one_error_line(out.err, _expected(name, "cli"))
    assert out.out == "" and not (tmp_path / "out").exists()
    assert not [p for p in opened_files if p.endswith("passwd")], "a path-like name was opened"
    if BAD_INPUT[name][3]:
        assert line == "error: " + _backend_error(engine, bad_files, name), "the CLI and the UI disagree"


@pytest.mark.xdist_group("cli-bad-input")
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_process_bad_input_is_one_line_and_exit_2(cli_results, name):
    r = cli_results[name]
    assert r.returncode == 2, r.stderr[-2000:]
    _assert_one_error_line(r.stderr, _expected(name, "cli"))
    assert r.stdout == ""


@pytest.mark.xdist_group("cli-bad-input")
def test_cli_non_numeric_steps_is_an_argparse_usage_error(cli_results):
    r = cli_results["steps-text"]
    assert r.returncode == 2 and "invalid int value: 'abc'" in r.stderr and "Traceback" not in r.stderr
