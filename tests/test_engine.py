"""Engine end to end on the tiny models: determinism, seeds, samplers, caches, img2img, saving."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pipelines.denoise.schedulers import sampler_names
from pipelines.image_info import read_parameters
from pipelines.images import from_pil, to_pil
from pipelines.metadata import request_from_infotext


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_seed_gives_byte_identical_png_and_metadata(engine, req_factory):
    a = engine.generate(req_factory())
    b = engine.generate(req_factory())
    assert a.paths[0] != b.paths[0]  # never overwritten
    assert a.paths[0].read_bytes() == b.paths[0].read_bytes()
    c = engine.generate(req_factory(seed=43))
    assert not np.array_equal(_arr(a.images[0]), _arr(c.images[0]))


def test_png_has_parameters_that_parse_back(engine, req_factory):
    req = req_factory(negative_prompt="blurry, low quality", cfg="linear(4,9), rescale=0.5", width=96, height=64)
    res = engine.generate(req)
    img = Image.open(res.paths[0])
    assert img.format == "PNG" and img.size == (96, 64)
    text = read_parameters(res.paths[0])
    assert "Steps: 3" in text and "Seed: 42" in text and "Size: 96x64" in text and "Model: tiny" in text
    back = request_from_infotext(text)
    assert back == replace(req, seed=42)


def test_batch_seeds_are_consecutive_and_reproducible_alone(engine, req_factory):
    batch = engine.generate(req_factory(batch_size=3, sampler="Euler a"))
    assert batch.seeds == [42, 43, 44]
    assert len(batch.paths) == 3
    alone = engine.generate(req_factory(seed=44, sampler="Euler a"))
    diff = np.abs(_arr(batch.images[2]) - _arr(alone.images[0])).max()
    assert diff <= 1, f"batch image 3 differs from seed 44 alone by {diff}"
    assert not np.array_equal(_arr(batch.images[0]), _arr(batch.images[1]))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_runs_end_to_end(engine, req_factory, model, sampler):
    res = engine.generate(req_factory(model=model, sampler=sampler, steps=4), save=False)
    arr = _arr(res.images[0])
    assert res.images[0].size == (64, 64)
    assert arr.std() > 0, "image is flat"


def test_prompt_cache_hit_skips_text_encoder(engine, manager, req_factory, monkeypatch):
    model = manager.get("tiny")
    calls = []
    original = type(model.pipe.text_encoder).forward

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(type(model.pipe.text_encoder), "forward", counting)
    engine.generate(req_factory(prompt="a lighthouse at dusk"), save=False)
    first = len(calls)
    assert first > 0
    engine.generate(req_factory(prompt="a lighthouse at dusk", seed=7), save=False)
    assert len(calls) == first, "the second run with the same prompt called the text encoder again"
    engine.generate(req_factory(prompt="a different prompt"), save=False)
    assert len(calls) > first


def test_img2img_strength_zero_is_the_vae_round_trip(engine, manager, req_factory):
    from pipelines.vae import io as vae_io

    init = engine.generate(req_factory(seed=1), save=False).images[0]
    same = engine.generate(req_factory(init_image=init, strength=0.0), save=False)
    assert same.stats["unet_evals"] == 0
    # strength 0 = no denoising: only the VAE round trip remains (the tiny VAE is random, so it is lossy)
    model = manager.get("tiny")
    trip = to_pil(vae_io.decode(model, vae_io.encode(model, from_pil(init, 64, 64, "cpu", model.dtype))))
    assert np.array_equal(_arr(same.images[0]), _arr(trip[0]))
    half = engine.generate(req_factory(init_image=init, strength=0.5, steps=4), save=False)
    assert half.stats["unet_evals"] == 2 * 4  # `steps` steps actually run, each with CFG


def test_img2img_schedule_is_tail_of_longer_schedule():
    from pipelines.denoise.stages import img2img_schedule

    assert img2img_schedule(20, 1.0) == (20, 20)
    assert img2img_schedule(20, 0.5) == (40, 20)
    total, run = img2img_schedule(20, 0.3)
    assert run == 20 and total == 67
    assert img2img_schedule(25, 0.001) == (1000, 1)


def test_previews_and_cancel(engine, req_factory):
    import threading

    from pipelines.errors import CancelledError

    seen = []
    engine.generate(req_factory(steps=4), callback=lambda info: seen.append((info.step, info.denoised.shape)), save=False)
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    cancel = threading.Event()

    def stop_after_two(info):
        if info.step == 1:
            cancel.set()

    with pytest.raises(CancelledError):
        engine.generate(req_factory(steps=10), callback=stop_after_two, cancel=cancel)
    assert not engine.gpu_lock.locked()
    assert engine.generate(req_factory(), save=False).images  # the next request runs


def test_taesd_decode_and_preview(engine, manager, req_factory):
    from pipelines.vae.io import preview

    res = engine.generate(req_factory(vae_decode="taesd"), save=False)
    assert res.images[0].size == (64, 64)
    model = manager.get("tiny")
    import torch

    img = preview(model, torch.zeros(1, 4, 8, 8))
    assert img.size == (64, 64)


def test_fp16_nan_guard_decodes_again_in_fp32(engine, manager, req_factory, monkeypatch):
    import torch

    from pipelines.vae import io as vae_io

    model = manager.get("tiny")
    calls = []

    def fake_decode(vae, z, tiled, tile, overlap, tile_mode, host_budget, replicas=None):
        calls.append(vae.dtype)
        if vae.dtype != torch.float32:
            return torch.full((1, 3, 64, 64), float("nan"))
        return torch.zeros(1, 3, 64, 64)

    monkeypatch.setattr(vae_io, "_decode_once", fake_decode)
    model.vae.to(torch.float16)
    try:
        report = vae_io.DecodeReport()
        out = vae_io.decode(model, torch.zeros(1, 4, 8, 8), report=report)
    finally:
        model.vae.to(torch.float32)
    assert torch.isfinite(out).all()
    assert calls == [torch.float16, torch.float32]
    assert report.notes == ["fp32 VAE fallback"]


def test_token_counter_needs_no_loaded_weights(tiny_cache, tmp_path):
    from pipelines.engine import Engine
    from pipelines.models.manager import ModelManager

    engine = Engine(ModelManager(tmp_path, device="cpu", dtype="fp32"), None)
    assert engine.count_tokens("tiny", "abc def") == "6/75 tokens, 1 chunk"
    assert engine.manager.current is None  # only the tokenizer was read
    assert engine.count_tokens("stable-diffusion-v1-5/stable-diffusion-v1-5", "x") in ("", "1/75 tokens, 1 chunk")


def test_v_prediction_model_from_a_local_folder(engine, manager, req_factory, tiny_dir):
    """An SD 2.x-style v-prediction model (a local diffusers folder) runs with every kind of scheduler."""
    import json
    import shutil

    folder = manager.models_dir / "tiny-v"
    if not folder.exists():
        shutil.copytree(tiny_dir, folder)
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["prediction_type"] = "v_prediction"
        cfg_path.write_text(json.dumps(cfg))
    assert "tiny-v" in manager.list_models()
    seen = []
    for sampler in ("DPM++ 2M Karras", "Euler a", "DDIM"):
        res = engine.generate(req_factory(model="tiny-v", sampler=sampler),
                              callback=lambda info: seen.append(float(info.denoised.abs().mean())), save=False)
        assert res.images[0].size == (64, 64)
    assert manager.get("tiny-v").prediction_type == "v_prediction"
    assert all(np.isfinite(seen))
    eps = engine.generate(req_factory(), save=False).images[0]
    v = engine.generate(req_factory(model="tiny-v"), save=False).images[0]
    assert not np.array_equal(_arr(eps), _arr(v))


def test_availability_names_what_must_be_fetched(manager, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert manager.availability("tiny") is None
    msg = manager.availability("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert msg is not None and "not downloaded yet" in msg and "--model tiny" in msg
    assert "not a known model" in manager.availability("../../etc/passwd")


def test_tiny_models_build_once_when_asked_from_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.models.tiny import ensure_tiny

    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: ensure_tiny("tiny", tmp_path), range(4)))
    assert len(set(folders)) == 1 and (folders[0] / "unet" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no partial or stale folders left
