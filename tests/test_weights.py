"""One owner of weights: the manager's ControlNet, annotator and upscaler caches are bounded, emptied by unload(),
and their bytes reach the plan."""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.control.models import load_controlnet
from pipelines.control.preprocessors import ANNOTATORS, preprocess
from pipelines.models import caches as caches_mod
from pipelines.models import upscalers
from pipelines.models.caches import WeightCaches, module_bytes
from pipelines.models.manager import ModelManager
from pipelines.request.schema import ControlUnit, TileConfig
from tests.conftest import tiny_request


def tensor_bytes(module: torch.nn.Module) -> int:
    """The closed-form size: every parameter and buffer, numel x element size."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _fake_detector(name: str) -> type:
    """A controlnet-aux detector stand-in holding a small torch module (as Midas/HED/... hold theirs)."""

    class Detector:
        loads = 0

        def __init__(self):
            self.net = torch.nn.Conv2d(3, 3, 3)
            self.net.register_buffer("mean", torch.zeros(3))

        @classmethod
        def from_pretrained(cls, path):
            cls.loads += 1
            return cls()

        def to(self, device):
            self.net.to(device)
            return self

        def __call__(self, image, **kwargs):
            return Image.new("RGB", image.size, "white")

    Detector.__name__ = name
    return Detector


@pytest.fixture
def fake_aux(monkeypatch, tmp_path) -> Path:
    """A stand-in controlnet_aux with the depth, lineart and mlsd detectors, and their weight files in place."""
    fake = type(sys)("controlnet_aux")
    for kind in ("depth", "lineart", "mlsd"):
        spec = ANNOTATORS[kind]
        setattr(fake, spec.cls, _fake_detector(spec.cls))
        for f in spec.files:
            (tmp_path / f).write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "controlnet_aux", fake)
    return tmp_path


@pytest.fixture(scope="module")
def aux_models(tiny_dir, tmp_path_factory) -> Path:
    """A models folder with a tiny ControlNet and three tiny x4 upscalers."""
    from safetensors.torch import save_file

    from pipelines.models.tiny import build_tiny_controlnet
    from tests.test_upscale import rrdb_state_dict

    root = tmp_path_factory.mktemp("models")
    build_tiny_controlnet(tiny_dir, root / "controlnet" / "cn")
    (root / "upscalers").mkdir()
    for i in range(3):
        save_file(rrdb_state_dict(seed=i), root / "upscalers" / f"tiny{i}_x4.safetensors")
    return root


def _photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_unload_frees_every_cached_controlnet_annotator_and_upscaler(aux_models, fake_aux):
    manager = ModelManager(aux_models, device="cpu", dtype="fp32", warmup=False)
    cn = load_controlnet("cn", models_dir=aux_models, cache=manager.caches.controlnets)
    up = upscalers.load_upscaler(aux_models / "upscalers" / "tiny0_x4.safetensors", cache=manager.caches.upscalers)
    preprocess("depth", _photo(), annotators_dir=fake_aux, cache=manager.caches.annotators)
    (detector,) = manager.caches.annotators.values()
    assert len(manager.caches) == 3
    # the manager counts exactly their parameters and buffers
    expected = tensor_bytes(cn) + tensor_bytes(up.model) + tensor_bytes(detector.net)
    assert manager.auxiliary_bytes() == expected > 0
    # cached: a second request is the same object, not a second load
    assert load_controlnet("cn", models_dir=aux_models, cache=manager.caches.controlnets) is cn
    preprocess("depth", _photo(), annotators_dir=fake_aux, cache=manager.caches.annotators)
    assert type(detector).loads == 1
    refs = [weakref.ref(m) for m in (cn, up, detector)]
    del cn, up, detector
    manager.unload()
    gc.collect()
    assert len(manager.caches) == 0 and manager.auxiliary_bytes() == 0
    assert [r() for r in refs] == [None, None, None]  # nothing else held them: the memory is free


def test_switching_models_empties_the_caches(tiny_cache, aux_models):
    """get() of another model unloads the current one, and the auxiliary weights with it."""
    manager = ModelManager(aux_models, device="cpu", dtype="fp32", warmup=False)
    manager.get("tiny")
    up = upscalers.load_upscaler(aux_models / "upscalers" / "tiny0_x4.safetensors", cache=manager.caches.upscalers)
    ref = weakref.ref(up)
    del up
    manager.get("tiny")  # the same model: kept
    assert len(manager.caches.upscalers) == 1
    manager.get("tiny-sdxl")
    gc.collect()
    assert ref() is None and len(manager.caches) == 0


def test_caches_are_bounded_and_evict_the_least_recently_used(aux_models, fake_aux):
    caches = WeightCaches()
    models = [upscalers.load_upscaler(aux_models / "upscalers" / f"tiny{i}_x4.safetensors", cache=caches.upscalers)
              for i in range(3)]
    assert len(caches.upscalers) == caches_mod.UPSCALERS == 2
    assert [id(m) for m in caches.upscalers.values()] == [id(m) for m in models[1:]]  # the first one went
    first = weakref.ref(models[0])
    del models
    gc.collect()
    assert first() is None
    for kind in ("depth", "lineart", "mlsd"):  # three detector classes, room for two
        preprocess(kind, _photo(), annotators_dir=fake_aux, cache=caches.annotators)
    assert len(caches.annotators) == caches_mod.ANNOTATORS == 2
    assert [type(d).__name__ for d in caches.annotators.values()] == ["LineartDetector", "MLSDdetector"]
    assert caches_mod.CONTROLNETS >= 3  # the three units of one job stay loaded together


def test_without_a_cache_nothing_is_kept(aux_models, fake_aux):
    path = aux_models / "upscalers" / "tiny0_x4.safetensors"
    assert upscalers.load_upscaler(path) is not upscalers.load_upscaler(path)
    preprocess("depth", _photo(), annotators_dir=fake_aux)
    preprocess("depth", _photo(), annotators_dir=fake_aux)
    assert sys.modules["controlnet_aux"].MidasDetector.loads == 2


def test_module_bytes_counts_shared_tensors_once_and_filters_by_device():
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.weight = a.weight  # tied weights
    holder = type("Holder", (), {})()
    holder.parts = {"a": a, "b": b}
    assert module_bytes(holder) == tensor_bytes(a) + b.bias.numel() * 4
    assert module_bytes([a, a]) == tensor_bytes(a)
    assert module_bytes(a, "cpu") == tensor_bytes(a) and module_bytes(a, "meta") == 0


def test_auxiliary_bytes_appear_in_the_plan(tiny_cache, tmp_path, aux_models):
    from pipelines.engine import Engine

    manager = ModelManager(aux_models, device="cpu", dtype="fp32", warmup=False)
    engine = Engine(manager, None)
    model = manager.get("tiny")
    req = tiny_request(tiling=TileConfig(memory_budget_gb=64))
    before = engine.plan(req, model)
    cn = load_controlnet("cn", models_dir=aux_models, cache=manager.caches.controlnets)
    after = engine.plan(req, model)
    assert (after.tiled, after.vae_tiled) == (before.tiled, before.vae_tiled)
    assert after.est_peak_bytes - before.est_peak_bytes == tensor_bytes(cn) == manager.auxiliary_bytes()


def test_generation_keeps_its_controlnet_in_the_managers_cache(tiny_cache, aux_models):
    """The engine hands the manager's cache to the loaders: the second job reuses the first job's ControlNet."""
    from pipelines.engine import Engine

    manager = ModelManager(aux_models, device="cpu", dtype="fp32", warmup=False)
    engine = Engine(manager, None)
    unit = ControlUnit(_photo(), "none", scale=1.0, model="cn")
    req = tiny_request(steps=2, control=(unit,))
    first = engine.generate(req, save=False).images[0]
    (cn,) = manager.caches.controlnets.values()
    second = engine.generate(replace(req, seed=43), save=False).images[0]
    assert manager.caches.controlnets.values() == [cn] and manager.caches.controlnets.hits >= 1
    assert first.size == second.size == (64, 64)
    assert manager.auxiliary_bytes() == tensor_bytes(cn)
