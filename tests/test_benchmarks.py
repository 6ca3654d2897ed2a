"""The benchmark harness (`python -m benchmarks`) runs every case end to end on the tiny model at a tiny size."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_benchmark_has_every_case_with_both_numbers(tiny_cache, tmp_path, capsys):
    from benchmarks.__main__ import main
    from benchmarks.settings import CASES

    out = tmp_path / "results.json"
    code = main(["--device", "cpu", "--model", "tiny", "--quick", "--size-scale", "0.25", "--warmup", "0",
                 "--repeats", "1", "--memory", "inprocess", "--json", str(out), "--cache-dir", str(tmp_path)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert {r["case"] for r in rows.values()} == set(CASES)
    printed = capsys.readouterr().out
    for key, row in rows.items():
        for side in ("app", "baseline"):
            m = row[side]
            assert m["error"] is None, f"{key} {side}: {m['error']}"
            assert m["median_s"] > 0 and m["runs"] == 1, (key, side, m)
            assert m["memory"] is not None and m["memory"]["peak_mb"] > 0, (key, side)
        assert row["speedup"] > 0
        assert f"| {key}: " in printed
    # Same weights, scheduler and initial latents: the app's txt2img is diffusers' image.
    assert rows["txt2img"]["extra"]["max_abs_pixel_diff"] <= 2
    assert rows["txt2img"]["app"]["unet_evals"] == rows["txt2img"]["baseline"]["unet_evals"] == 2 * 6
    guidance = rows["guidance-interval"]
    assert guidance["app"]["unet_evals"] == guidance["extra"]["predicted_evals_app"]
    assert guidance["target"]["met"] is True  # counts are device-independent, so judged on CPU too
    assert rows["vae-tiling"]["extra"]["mae_app"] < rows["vae-tiling"]["extra"]["mae_diffusers"] / 2
    stream = rows["vae-stream"]["extra"]  # both tiled modes equal the full decode up to float rounding
    assert stream["mae_stream"] < 1e-4 and stream["mae_layerwise"] < 1e-4
    assert rows["txt2img"]["target"]["judged"] is False  # speed targets are for a GPU, not judged here
    assert data["meta"]["quick"] is True and data["meta"]["sizes"]["native"] == 64


def test_memory_is_measured_in_a_fresh_process(tiny_cache, tmp_path):
    from benchmarks.runner import memory_in_fresh_process
    from benchmarks.settings import Settings

    settings = Settings(device="cpu", quick=True, size_scale=0.25, cache_dir=str(tmp_path))
    memory, problem = memory_in_fresh_process(settings, "vae-full")
    assert problem is None
    assert memory.peak_mb > 100 and memory.delta_mb >= 0
    assert "fresh process" in memory.method


def test_sizes_follow_the_issue_and_scale_down():
    from benchmarks.settings import Settings, sizes_for

    full = sizes_for(Settings(), "sd1")
    assert (full.native, full.steps, full.tiled, full.vae, full.ultra) == (512, 20, 2048, 2048, 4096)
    assert sizes_for(Settings(), "sdxl").native == 1024
    tiny = sizes_for(Settings(quick=True, size_scale=0.25), "sd1")
    assert tiny.native == 64 and tiny.ultra == 256 and tiny.tile >= 16 and tiny.native % 8 == 0


def test_stack_quick_has_every_layer_with_ratios(tiny_cache, tmp_path, capsys):
    """`--stack --quick` on the tiny model: rows 1-9 present, CPU-only rows say why, counts follow each layer."""
    from benchmarks.__main__ import main

    out = tmp_path / "stack.json"
    code = main(["--stack", "--stack-table", "gpu", "--device", "cpu", "--model", "tiny", "--quick", "--size-scale",
                 "0.25", "--warmup", "0", "--repeats", "1", "--threads", "1", "--json", str(out), "--cache-dir",
                 str(tmp_path)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == list(range(1, 10))
    skipped = {r["n"]: r["why_not"] for r in rows if r["why_not"]}
    assert set(skipped) == {2, 9} and all("GPU only" in why for why in skipped.values())
    for r in rows:
        if r["n"] not in skipped:
            assert r["latency_s"] > 0 and r["images_per_s"] > 0 and r["peak_mb"] is not None, r
    evals = {r["n"]: r["unet_evals"] for r in rows}
    assert evals[1] == evals[3] == 2 * 15 and evals[4] == evals[5] == evals[6] == 2 * 6  # DDIM 15, DPM++ 6, CFG
    assert evals[7] == evals[8] < evals[6]  # the guidance interval drops uncond passes
    printed = capsys.readouterr().out
    assert "| 8 | + feature caching (interval 3) |" in printed and "speed-up vs 1" in printed
    assert out.with_suffix(".md").read_text().count("\n| ") == 10  # header + 9 rows


def test_the_cpu_stack_has_each_row_against_diffusers_in_the_same_run(tiny_cache, tmp_path, capsys):
    """`--stack --device cpu` (issue 32's table): diffusers fp32 first, each later row's wall and CPU ratio against it
    from interleaved rounds, compile left out without --compile and saying why."""
    from benchmarks.__main__ import main

    out = tmp_path / "cpu-stack.json"
    code = main(["--stack", "--device", "cpu", "--model", "tiny", "--quick", "--size-scale", "0.25", "--warmup", "0",
                 "--repeats", "2", "--threads", "1", "--json", str(out), "--cache-dir", str(tmp_path)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["layer"].startswith("diffusers fp32") and "caching" in rows[3]["layer"]
    assert rows[4]["why_not"] and "--compile" in rows[4]["why_not"]
    for r in rows:
        if not r["why_not"]:
            assert len(r["wall_s"]) == len(r["cpu_s"]) == 2 and min(r["wall_s"]) > 0 and min(r["cpu_s"]) > 0, r
    assert "| wall vs 1 |" in capsys.readouterr().out and "| 4 | + feature caching" in out.with_suffix(".md").read_text()
