"""The command line: outputs, help, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.image_info import read_parameters
from pipelines.metadata import request_from_infotext

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_writes_png_with_parameters(tmp_path, tiny_cache):
    out = tmp_path / "out"
    r = run_cli("generate", "--model", "tiny", "--prompt", "a (red:1.2) fox", "--negative-prompt", "blur",
                "--width", "96", "--height", "64", "--steps", "3", "--cfg", "6.5", "--sampler", "Euler a",
                "--seed", "5", "--batch", "2", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = [Path(line) for line in r.stdout.splitlines()]
    assert len(paths) == 2 and all(p.exists() for p in paths)
    for p, seed in zip(paths, (5, 6)):
        img = Image.open(p)
        assert img.size == (96, 64) and img.format == "PNG"
        req = request_from_infotext(read_parameters(p))
        assert (req.prompt, req.negative_prompt, req.steps, req.cfg, req.sampler, req.seed, req.width, req.height) == (
            "a (red:1.2) fox", "blur", 3, "6.5", "Euler a", seed, 96, 64)
    assert "not expected" not in r.stderr  # no config warnings for our own models (TAESD's block_out_channels)
    assert "Loading" not in r.stderr and "%|" not in r.stderr  # no library progress bars without --verbose


def test_generate_help_documents_every_option(tmp_path):
    r = run_cli("generate", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for opt in ("--prompt", "--negative-prompt", "--width", "--height", "--steps", "--cfg", "--sampler", "--seed",
                "--batch", "--out", "--model", "--hires-scale", "--tile-size", "--control", "--vae-tiling"):
        assert opt in r.stdout


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--width", "1001"], "`width` must be a multiple of 8; try 1000 or 1008, got 1001"),
        (["--height", "16"], "`height` must be between 64 and 8192"),
        (["--steps", "0"], "`steps` must be between 1 and 150"),
        (["--steps", "100000"], "`steps` must be between 1 and 150"),
        (["--sampler", "Eulerish"], "`sampler` must be one of"),
        (["--model", "no-such-model"], "`model` is not a known model"),
        (["--model", "../../etc/passwd"], "`model`"),
        (["--strength", "1.5"], "`strength` must be between 0 and 1"),
        (["--cfg", "lots"], "`cfg` must be a number or one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_cache, args, expect):
    r = run_cli("generate", "--model", "tiny", "--prompt", "x", "--steps", "2", *args, "--out", str(tmp_path),
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0]
    assert "Traceback" not in r.stderr


def test_unreadable_model_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    r = run_cli("generate", "--model", str(bad), "--prompt", "x", cwd=tmp_path)
    assert r.returncode == 2
    assert "could not read model file broken.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_offline_hub_model_says_could_not_download(tmp_path):
    r = run_cli("generate", "--model", "Lykon/dreamshaper-8", "--prompt", "x", "--steps", "1", cwd=tmp_path,
                env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert "could not download Lykon/dreamshaper-8 (offline?)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_2048_tiled_generation_on_cpu_in_bounded_memory(tmp_path, tiny_cache):
    """The issue's must-show: 2048x2048 on CPU with tiling; the child's peak RSS stays bounded."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = run_cli("generate", "--model", "tiny", "--prompt", "a wide landscape", "--width", "2048", "--height", "2048",
                "--steps", "1", "--tiling", "on", "--vae-tiling", "on", "--seed", "3", "--out", str(tmp_path),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(r.stdout.strip()).size == (2048, 2048)
    assert "seam score" in r.stderr and "16 tiles" in r.stderr
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb >= before
    assert peak_kb < 4 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"


def test_control_option_and_upscale_subcommand(tmp_path, tiny_cache):
    import numpy as np

    arr = np.zeros((64, 64, 3), np.uint8)
    arr[20:44, 20:44] = 255
    Image.fromarray(arr).save(tmp_path / "edges.png")
    common = ["--model", "tiny", "--prompt", "a box", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "o")]
    plain = run_cli("generate", *common, cwd=tmp_path)
    held = run_cli("generate", *common, "--control", "canny:edges.png:1.0:0:1", cwd=tmp_path)
    assert plain.returncode == 0 and held.returncode == 0, held.stderr
    a, b = (np.asarray(Image.open(r.stdout.strip())) for r in (plain, held))
    assert not np.array_equal(a, b)
    bad = run_cli("generate", *common, "--control", "canny", cwd=tmp_path)
    assert bad.returncode == 2 and "TYPE:IMAGE" in bad.stderr
    up = run_cli("upscale", "--image", "edges.png", "--scale", "2", "--out", str(tmp_path / "u"), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert Image.open(up.stdout.strip()).size == (128, 128)
