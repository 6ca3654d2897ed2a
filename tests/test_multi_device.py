"""One tiled image across two CPU workers: the same pixels as one worker, UNet calls and VAE tiles balanced within
one, the plan line saying how the work was split; ControlNet units on each device, copied once per device; the
expected-scaling model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipelines.factory import build_pool
from pipelines.serving.multi_device import TileReplicas, expected_speedup, split_note
from tests.conftest import tiny_request

# 256² on the tiny model: a 32² latent in 16² tiles (overlap 4), one tile per UNet call -> 9 batches per step.
# (The 1024² is the same code with 25 batches; one tiny UNet call on a 32² tile takes ~3 s on the shared
# CI CPUs, so 1024² would cost minutes: `benchmarks/multi_device.py --size 1024` runs it.)
# The tiled VAE (16² latent tiles) is split too: its stages' tiles are dealt over both workers' VAEs.
BIG = {"width": 256, "height": 256, "steps": 2, "tile_mode": "on", "tile_size": 16, "tile_overlap": 4,
       "tile_batch": 1, "vae_tiling": "on", "vae_tile_size": 16}


def _request(**kw):
    from pipelines.request.schema import from_flat

    return from_flat({**BIG, **kw}, tiny_request(), source="the test")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per device thread: two devices' threads x two OpenMP threads on the shared CI cores
    spun against each other (a streamed tiled decode ran 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    tiles = split.stats["vae_tiles_per_worker"]
    assert min(tiles) > 0 and abs(tiles[0] - tiles[1]) <= 1
    assert f"split over 2 devices: UNet calls 9+9, VAE tiles {tiles[0]}+{tiles[1]}" in split.stats["plan"]


def test_img2img_across_two_workers_encodes_and_decodes_on_both(pool):
    """The init image's tiled encode is split too: the same latents, so the same pixels."""
    from PIL import Image

    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8))
    req = _request(width=192, height=192, seed=2, init_image=init, strength=0.6)
    one = pool.workers[0].engine.generate(req)
    pool.split = "on"
    try:
        split = pool.generate(req)
        txt2img = pool.generate(_request(width=192, height=192, seed=2))  # the decode's tiles alone
    finally:
        pool.split = "auto"
    assert np.array_equal(np.asarray(split.images[0]), np.asarray(one.images[0]))
    tiles, decode_only = split.stats["vae_tiles_per_worker"], txt2img.stats["vae_tiles_per_worker"]
    assert min(decode_only) > 0 and sum(tiles) > sum(decode_only) and abs(tiles[0] - tiles[1]) <= 1


def test_feature_caching_across_two_workers_is_bit_identical_to_one_worker(pool):
    """Each device's UNet runs its own full/shallow passes; a cached feature made on one device is moved to the
    device whose batch needs it at the next shallow step (tiles are dealt round-robin)."""
    req = _request(width=192, height=192, seed=4, steps=3, feature_cache="on", feature_cache_interval=3)
    one = pool.workers[0].engine.generate(req)
    split = pool.generate(req)
    assert np.array_equal(np.asarray(split.images[0]), np.asarray(one.images[0]))
    assert split.stats["unet_shallow_calls"] == one.stats["unet_shallow_calls"] > 0
    assert min(split.stats["unet_calls_per_worker"]) > 0


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
    from pipelines.request.schema import ControlUnit, from_flat

    req = from_flat({"control": (ControlUnit(image=edges, type="none", scale=0.8),)},
                    _request(width=192, height=192, seed=3, tile_size=16, tile_overlap=8))
    one = pool.workers[0].engine.generate(req)
    split = pool.generate(req)
    assert np.array_equal(np.asarray(split.images[0]), np.asarray(one.images[0]))
    assert min(split.stats["unet_calls_per_worker"]) > 0
    assert pool.workers[1].controlnets.copies == 1  # kept for the next split job (`ControlCopies`)


@dataclass(frozen=True)
class _Unit:
    """The one field of a ControlInput the replicas replace."""

    model: torch.nn.Module


def test_controlnet_copies_are_kept_per_device_across_jobs():
    from pipelines.serving.multi_device import ControlCopies

    source, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    copies = [ControlCopies("cpu"), ControlCopies("cpu", size=1)]

    def job(model):  # a split job: fresh replicas, the workers' kept copies
        return TileReplicas([(None, "cpu"), (None, "cpu")], controlnets=copies).control_for(1, [_Unit(model)])[0]

    first, again = job(source), job(source)
    assert first.model is again.model is not source and copies[1].copies == 1
    assert torch.equal(first.model.weight, source.weight)
    job(other)
    assert copies[1].copies == 2 and len(copies[1]._copies) == 1  # bounded: the oldest copy went


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
    if note.startswith("split"):
        assert split_note(batches, devices, force, vae_tiled=True) == f"{note}, tiled VAE too"


def test_expected_speedup_is_batches_over_the_slowest_device():
    assert expected_speedup(64, 1) == 1
    assert expected_speedup(64, 8) == 8
    assert expected_speedup(5, 2, batch_s=1.0) == pytest.approx(5 / 3)
    assert expected_speedup(64, 4, batch_s=1.0, step_s=2.0) == pytest.approx(66 / 18)
