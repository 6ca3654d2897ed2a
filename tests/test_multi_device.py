"""One tiled image across two CPU workers: the same pixels as one worker, UNet calls balanced within one, the
plan line saying how the work was split; ControlNet units on each device; the expected-scaling model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.serving.multi_device import TileReplicas, expected_speedup, split_note
from pipelines.serving.workers import build_pool
from tests.conftest import tiny_request

# 256² on the tiny model: a 32² latent in 16² tiles (overlap 4), one tile per UNet call -> 9 batches per step.
# (The 1024² is the same code with 25 batches; one tiny UNet call on a 32² tile takes ~3 s on the shared
# CI CPUs, so 1024² would cost minutes: `benchmarks/multi_device.py --size 1024` runs it.)
BIG = {"width": 256, "height": 256, "steps": 2, "tile_mode": "on", "tile_size": 16, "tile_overlap": 4,
       "tile_batch": 1, "vae_tiling": "off"}


def _request(**kw):
    from pipelines.request import from_flat

    return from_flat({**BIG, **kw}, tiny_request(), source="the test")


@pytest.fixture(scope="module")
def pool(tiny_cache, tmp_path_factory):
    return build_pool(["cpu", "cpu"], tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("split-out"),
                      dtype="fp32")


def test_one_tiled_image_across_two_workers_is_bit_identical_to_one_worker(pool):
    req = _request(seed=5)
    one = pool.workers[0].engine.generate(req)
    split = pool.generate(req)
    assert np.array_equal(np.asarray(split.images[0]), np.asarray(one.images[0]))
    assert split.infotexts == one.infotexts  # nothing about devices in the metadata
    calls = split.stats["unet_calls_per_worker"]
    assert sum(calls) == one.stats["unet_calls"] == 18 and abs(calls[0] - calls[1]) <= 1
    assert split.stats["worker"] == "0:cpu+1:cpu"
    assert "split over 2 devices: UNet calls 9+9" in split.stats["plan"]


def test_a_small_image_runs_on_one_worker_unless_split_is_forced(pool):
    small = _request(width=64, height=64, tile_mode="off")
    assert not pool._splits(small)
    assert "unet_calls_per_worker" not in pool.generate(small).stats
    pool.split = "on"
    try:
        assert pool._splits(small)
    finally:
        pool.split = "auto"


def test_controlnet_units_run_on_each_device_with_the_same_result(pool, tmp_path):
    """A ControlNet unit's residuals on the second replica come from its own copy of the model."""
    from PIL import Image

    rng = np.random.default_rng(0)
    edges = Image.fromarray((rng.random((256, 256)) > 0.5).astype(np.uint8) * 255).convert("RGB")
    from pipelines.request import ControlUnit, from_flat

    req = from_flat({"control": (ControlUnit(image=edges, type="none", scale=0.8),)},
                    _request(width=192, height=192, seed=3, tile_size=16, tile_overlap=8))
    one = pool.workers[0].engine.generate(req)
    split = pool.generate(req)
    assert np.array_equal(np.asarray(split.images[0]), np.asarray(one.images[0]))
    assert min(split.stats["unet_calls_per_worker"]) > 0


def test_replicas_deal_batches_round_robin_and_gather_in_order():
    class Scale(torch.nn.Module):
        def __init__(self, k: float):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x * self.k

    reps = TileReplicas([(Scale(1.0), "cpu"), (Scale(1.0), "cpu"), (Scale(1.0), "cpu")])
    seen: list[tuple[int, int]] = []

    def run(index, unet, device, item):
        seen.append((index, item))
        return unet(torch.full((1,), float(item)))

    out = reps.map(run, list(range(7)), torch.device("cpu"))
    assert [float(o) for o in out] == list(range(7))
    assert sorted(seen) == sorted((k % 3, k) for k in range(7))
    reps.map(run, list(range(2)), torch.device("cpu"))  # continues at replica 1
    assert reps.calls == [3, 3, 3]
    assert reps.splits(3) and not reps.splits(2)


@pytest.mark.parametrize(("batches", "devices", "force", "note"), [
    (8, 2, False, "split over 2 devices: 4+4 tile batches per step"),
    (5, 2, False, "split over 2 devices: 3+2 tile batches per step"),
    (1, 2, False, "not split (1 tile batch(es) per step < 2 devices)"),
    (1, 2, True, "split over 2 devices: 1+0 tile batches per step"),
    (8, 1, False, ""),
])
def test_split_note(batches, devices, force, note):
    assert split_note(batches, devices, force) == note


def test_expected_speedup_is_batches_over_the_slowest_device():
    assert expected_speedup(64, 1) == 1
    assert expected_speedup(64, 8) == 8
    assert expected_speedup(5, 2, batch_s=1.0) == pytest.approx(5 / 3)
    assert expected_speedup(64, 4, batch_s=1.0, step_s=2.0) == pytest.approx(66 / 18)
