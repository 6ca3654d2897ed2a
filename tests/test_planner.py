"""Memory planner: when tiling switches on, forced modes, monotonic estimates, the description line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipelines.errors import ValidationError
from pipelines.planner import ModelFootprint, PlanInput, TilingAsk, free_device_memory, plan_generation
from pipelines.vae.stream import Split

GB = 10**9


def test_no_budget_means_untiled() -> None:
    plan = plan_generation(PlanInput(4096, 4096, budget_bytes=None, family="sd1"))
    assert not plan.tiled and not plan.vae_tiled
    assert plan.tiles_per_step == 1 and plan.unet_evals_per_step == 1


def test_auto_tiles_above_budget_and_not_below() -> None:
    small = plan_generation(PlanInput(512, 512, budget_bytes=8 * GB, family="sd1"))
    assert not small.tiled and not small.vae_tiled
    assert small.est_peak_bytes <= 8 * GB
    big = plan_generation(PlanInput(2048, 2048, budget_bytes=8 * GB, family="sd1"))
    assert big.tiled and big.vae_tiled
    assert big.tile_size == 96 and big.overlap == 32 and big.tiles_per_step > 1
    assert big.est_peak_bytes <= 8 * GB
    assert big.unet_evals_per_step == -(-big.tiles_per_step // big.tile_batch)


def test_sdxl_defaults() -> None:
    plan = plan_generation(PlanInput(3072, 3072, budget_bytes=12 * GB, family="sdxl"))
    assert plan.tiled and plan.tile_size == 128 and plan.overlap == 32


def test_tile_batch_grows_with_budget_and_is_capped() -> None:
    tight = plan_generation(PlanInput(2048, 2048, budget_bytes=3 * GB, family="sd1", tiling=TilingAsk(force="on")))
    roomy = plan_generation(PlanInput(2048, 2048, budget_bytes=80 * GB, family="sd1", tiling=TilingAsk(force="on")))
    assert 1 <= tight.tile_batch < roomy.tile_batch <= 8
    assert tight.unet_evals_per_step > roomy.unet_evals_per_step


def test_forced_modes_honoured() -> None:
    on = plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1",
                                   tiling=TilingAsk(force="on", vae_tiling="on")))
    assert on.tiled and on.vae_tiled and on.vae_tile_size == 64
    off = plan_generation(PlanInput(4096, 4096, budget_bytes=1 * GB, family="sd1",
                                    tiling=TilingAsk(force="off", vae_tiling="off")))
    assert not off.tiled and not off.vae_tiled and off.est_peak_bytes > 1 * GB
    custom = plan_generation(PlanInput(1024, 1024, budget_bytes=None, family="sd1",
                                       tiling=TilingAsk(force="on", tile_size=64, overlap=16, tile_batch=3)))
    assert (custom.tile_size, custom.overlap, custom.tile_batch) == (64, 16, 3)


def test_estimates_monotonic_in_size_and_batch() -> None:
    sizes = [512, 768, 1024, 1536, 2048]
    peaks = [plan_generation(PlanInput(s, s, budget_bytes=None, family="sd1")).est_peak_bytes for s in sizes]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    by_batch = [plan_generation(PlanInput(1024, 1024, budget_bytes=None, family="sdxl", batch=b)) for b in (1, 2, 4)]
    by_batch = [p.est_peak_bytes for p in by_batch]
    assert by_batch[0] <= by_batch[1] < by_batch[2]  # the VAE (one image at a time) dominates at batch 1
    fp32 = plan_generation(PlanInput(1024, 1024, budget_bytes=None, family="sd1", dtype_bytes=4)).est_peak_bytes
    assert fp32 > plan_generation(PlanInput(1024, 1024, budget_bytes=None, family="sd1")).est_peak_bytes


def test_describe_mentions_tiles() -> None:
    plan = plan_generation(PlanInput(2048, 2048, budget_bytes=6 * GB, family="sd1"))
    line = plan.describe()
    assert line.startswith("2048×2048:")
    assert f"{plan.tiles_per_step} tiles of 96² latent (overlap 32)" in line
    assert f"{plan.unet_evals_per_step} UNet calls/step" in line and "VAE tiled 64² latent" in line and "GB" in line
    assert "1 tile" in plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1")).describe()


@pytest.mark.parametrize(
    ("kwargs", "tiling", "field"),
    [
        ({"width": 1001}, {}, "width"),
        ({"family": "sd3"}, {}, "family"),
        ({}, {"force": "maybe"}, "force"),
        ({"budget_bytes": 0}, {}, "budget_bytes"),
        ({}, {"force": "on", "tile_size": 32, "overlap": 32}, "overlap"),
        ({}, {"tile_batch": 0}, "tile_batch"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs: dict, tiling: dict, field: str) -> None:
    args = {"width": 1024, "height": 1024, "budget_bytes": None, "family": "sd1"} | kwargs
    with pytest.raises(ValidationError) as err:
        plan_generation(PlanInput(**args, tiling=TilingAsk(**tiling)))
    assert err.value.field == field


def test_free_device_memory_cpu_is_available_ram() -> None:
    from pipelines.planner import available_ram

    ram = free_device_memory("cpu")
    assert ram == available_ram() or abs(ram - available_ram()) < 2**30  # both read /proc/meminfo, moments apart
    assert ram is None or ram > 2**20
    if torch.cuda.is_available():
        assert free_device_memory("cuda") > 0


# SD's VAE decoding 4096² in fp16 (`decode_splits`, abridged): every stage streamed, the stages above 2048²
# streamed, layer by layer
SD_SPLITS = [Split(0, 25, int(0.37 * GB), 13), Split(12, 25, int(6.4 * GB), 3), Split(25, 25, int(17.2 * GB), 0)]


def test_tiled_vae_streams_when_its_canvases_exceed_the_host_budget() -> None:
    ask = TilingAsk(force="on", tile_batch=1, vae_tiling="on")

    def plan(host: int | None, budget: int | None = None, splits=SD_SPLITS, **tiling):
        model = ModelFootprint(vae_splits=splits, host_budget_bytes=host)
        return plan_generation(PlanInput(4096, 4096, family="sd1", budget_bytes=budget, model=model,
                                         tiling=replace(ask, **tiling)))

    roomy, tight, tiny_ram, unknown = plan(64 * GB), plan(8 * GB), plan(GB // 10), plan(None)
    assert (roomy.vae_mode, tight.vae_mode, tiny_ram.vae_mode, unknown.vae_mode) == ("exact", "stream", "stream",
                                                                                     "exact")
    # as few stages streamed as the host budget allows; nothing fits -> all of them
    assert (roomy.vae_split.at, tight.vae_split.at, tiny_ram.vae_split.at) == (25, 12, 0)
    assert (tight.vae_host_budget, roomy.vae_host_budget) == (8 * GB, None)
    assert "(stream: 13 of 25 stages tile by tile, ~6.4 GB host)" in tight.describe()
    assert "(exact: ~17.2 GB host)" in roomy.describe()
    # a streamed tile carries its context margin: a larger device working set, larger when more stages stream
    assert roomy.est_peak_bytes < tight.est_peak_bytes < tiny_ram.est_peak_bytes
    forced = plan(64 * GB, vae_mode="stream")
    assert (forced.vae_mode, forced.vae_split.at, forced.vae_host_budget) == ("stream", 0, None)
    # streamed tiles are as large as the device budget allows (the margin costs less on a larger tile)
    assert (roomy.vae_tile_size, tight.vae_tile_size) == (64, 128)
    small_gpu = plan(GB // 10, budget=6 * GB)
    assert small_gpu.vae_mode == "stream" and small_gpu.vae_tile_size < 128
    no_table = plan(GB, splits=None)
    assert (no_table.vae_mode, no_table.vae_split) == ("exact", None)  # no VAE to measure: layer-wise, as before
    assert plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1")).vae_mode == ""  # not tiled: no mode
    with pytest.raises(ValidationError) as err:
        plan_generation(PlanInput(512, 512, budget_bytes=None, family="sd1", tiling=TilingAsk(vae_mode="fast")))
    assert err.value.field == "vae_mode"


def test_vae_tile_size_is_honoured() -> None:
    plan = plan_generation(PlanInput(2048, 2048, budget_bytes=None, family="sd1",
                                     tiling=TilingAsk(vae_tiling="on", vae_tile_size=32)))
    assert plan.vae_tile_size == 32 and "32² latent" in plan.describe()
    auto = PlanInput(2048, 2048, budget_bytes=None, family="sd1", tiling=TilingAsk(vae_tiling="on"))
    assert plan_generation(auto).vae_tile_size == 64
