"""The stage-1 cache of two-stage runs: keyed by the images' contents, bounded, least recently used out."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.request.schema import ControlUnit, GenerationRequest, HiresConfig
from pipelines.stage_cache import Stage1Cache, Uncachable, content_hash, stage1_key

MODEL = SimpleNamespace(name="tiny", loras=())


def _image(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _one_pixel_changed(image: Image.Image) -> Image.Image:
    changed = image.copy()
    r, g, b = changed.getpixel((5, 7))
    changed.putpixel((5, 7), ((r + 1) % 256, g, b))
    return changed


def test_content_hash_follows_the_contents_not_the_object():
    image = _image()
    copy = Image.fromarray(np.asarray(image).copy())
    assert copy is not image and content_hash(copy) == content_hash(image)
    assert content_hash(_one_pixel_changed(image)) != content_hash(image)
    assert content_hash(image.convert("RGBA")) != content_hash(image)  # same pixels, another mode
    flat = Image.new("RGB", (64, 48)), Image.new("RGB", (48, 64))  # same bytes, another size
    assert content_hash(flat[0]) != content_hash(flat[1])
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert content_hash(t.clone()) == content_hash(t) != content_hash(t.reshape(4, 3))
    assert content_hash(t.numpy().copy()) == content_hash(t.numpy()) and content_hash(None) is None
    with pytest.raises(Uncachable):
        content_hash(object())


def test_stage1_key_hits_for_an_equal_image_in_another_object_and_misses_for_one_changed_pixel():
    image = _image(1)
    req = GenerationRequest(prompt="x", init_image=image, control=(ControlUnit(image=_image(2), type="none"),),
                            hires=HiresConfig(scale=2))
    copy = replace(req, init_image=image.copy(), control=(ControlUnit(image=_image(2), type="none"),))
    assert stage1_key(copy, MODEL, [1]) == stage1_key(req, MODEL, [1])
    assert stage1_key(replace(req, init_image=_one_pixel_changed(image)), MODEL, [1]) != stage1_key(req, MODEL, [1])
    control = (ControlUnit(image=_one_pixel_changed(_image(2)), type="none"),)
    assert stage1_key(replace(req, control=control), MODEL, [1]) != stage1_key(req, MODEL, [1])
    # stage-2 settings are not part of the key; stage-1 ones are
    stage2_changed = replace(req, hires=HiresConfig(scale=1.5, denoise=0.2))
    assert stage1_key(stage2_changed, MODEL, [1]) == stage1_key(req, MODEL, [1])
    assert stage1_key(req, MODEL, [2]) != stage1_key(req, MODEL, [1])
    assert stage1_key(replace(req, init_image=object()), MODEL, [1]) is None  # not hashable: not cached


def test_the_cache_is_bounded_and_drops_the_least_recently_used():
    cache = Stage1Cache(size=2)
    made = []

    def run(value: float):
        def make():
            made.append(value)
            return torch.full((1, 4, 2, 2), value)
        return make

    for key in ("a", "b", "a", "c"):  # "a" used again before "c" arrives: "b" is the oldest
        out = cache.latents(key, run({"a": 1.0, "b": 2.0, "c": 3.0}[key]), "cpu")
        assert out.device.type == "cpu"
    assert made == [1.0, 2.0, 3.0] and cache.runs == 3 and len(cache) == 2
    assert "a" in cache and "c" in cache and "b" not in cache
    assert torch.equal(cache.latents("a", run(9.0), "cpu"), torch.full((1, 4, 2, 2), 1.0))
    cache.latents(None, run(4.0), "cpu")  # no key: run, never stored
    assert made[-1] == 4.0 and cache.runs == 4 and len(cache) == 2


def test_engine_reuses_stage1_for_an_equal_init_image_and_reruns_for_one_changed_pixel(engine, req_factory):
    init = _image(3, (64, 64))
    req = req_factory(steps=2, init_image=init, strength=0.6,
                      hires=HiresConfig(scale=1.5, upscaler="lanczos", denoise=0.4, steps=1))
    first = engine.generate(req, save=False)
    runs = engine.stage1_runs
    again = engine.generate(replace(req, init_image=init.copy(), hires=replace(req.hires, denoise=0.3)), save=False)
    assert engine.stage1_runs == runs, "an equal image in another object ran stage 1 again"
    assert again.images[0].size == first.images[0].size == (96, 96)
    engine.generate(replace(req, init_image=_one_pixel_changed(init)), save=False)
    assert engine.stage1_runs == runs + 1, "one changed pixel must run stage 1 again"
