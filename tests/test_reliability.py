"""Fault injection: OOM retries, the fp16 VAE NaN fallback, cancellation (engine, backend, client gone), saving.

Every test ends by checking that the GPU lock is free and, where it matters, that the engine serves the next
request: a fault must cost one request, never the server.
"""

from __future__ import annotations

import gc
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines import saving
from pipelines.errors import CancelledError, OutOfMemoryError
from pipelines.image_info import read_parameters
from pipelines.metadata import request_from_infotext
from pipelines.saving import save_png
from pipelines.serving.service import Backend, Done, Progress
from pipelines.vae import io as vae_io
from tests.conftest import assert_valid_png

LOCK_WAIT_S = 15  # the loop checks the cancel token every step; a tiny-model step takes well under a second
RETRY_WARNING = "retried with tiling, tile batch 1 and tiled VAE"
TINY_VALUES = {"prompt": "a lighthouse", "model": "tiny", "width": 64, "height": 64, "steps": 6, "seed": 3}


class FlakyUnet:
    """Wraps a UNet; raises an out-of-memory error on the first `fail` calls (every call when `fail` is None)."""

    def __init__(self, real, fail: int | None, exc: type[BaseException] = torch.OutOfMemoryError):
        self.real, self.fail, self.exc, self.calls = real, fail, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail is None or self.calls <= self.fail:
            raise self.exc("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(*args, **kwargs)


def _lock_is_free(engine, wait_s: float = LOCK_WAIT_S) -> bool:
    """True once the engine's GPU lock can be taken (it is released again at once)."""
    if not engine.gpu_lock.acquire(timeout=wait_s):
        return False
    engine.gpu_lock.release()
    return True


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*")) if folder.exists() else []


def _generator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tessera-generate" and t.is_alive()]


# ---------------------------------------------------------------- out of memory

def test_oom_on_first_unet_call_is_retried_with_low_memory_settings(engine, manager, req_factory):
    unet = FlakyUnet(manager.get("tiny").unet, fail=1)
    res = engine.generate(req_factory(steps=2), unet=unet)
    assert unet.calls == 1 + 2, "expected the failed call, then one call per step of the retry"
    assert any(RETRY_WARNING in w for w in res.warnings), res.warnings
    assert len(res.paths) == 1
    assert_valid_png(res.paths[0])
    assert not engine.gpu_lock.locked()


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, RuntimeError], ids=["OutOfMemoryError", "RuntimeError"])
def test_oom_on_every_try_names_the_settings_to_lower(engine, manager, req_factory, exc):
    unet = FlakyUnet(manager.get("tiny").unet, fail=None, exc=exc)
    with pytest.raises(OutOfMemoryError) as err:
        engine.generate(req_factory(steps=2), unet=unet)
    message = str(err.value)
    for setting in ("width/height", "batch_size", "hires_scale", "tile_size"):
        assert setting in message, message
    assert unet.calls == 2, "one try, one low-memory retry, then give up"
    assert not engine.gpu_lock.locked()
    assert not _pngs(engine.outputs_dir)
    assert engine.generate(req_factory(steps=2), save=False).images  # the engine serves the next request


def test_oom_through_the_backend_is_a_clear_error(engine, manager, monkeypatch):
    unet_cls = type(manager.get("tiny").unet)

    def always_oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(unet_cls, "forward", always_oom)
    with pytest.raises(OutOfMemoryError, match="lower width/height"):
        list(Backend(engine).generate({**TINY_VALUES, "steps": 2}))
    assert _lock_is_free(engine)
    assert not _generator_threads()


# ---------------------------------------------------------------- NaN from an fp16 VAE

def test_nan_from_fp16_vae_decodes_again_in_fp32_and_says_so(engine, manager, req_factory, monkeypatch):
    model = manager.get("tiny")
    vae, real_decode, scale = model.vae, model.vae.decode, model.vae_scale
    dtypes = []

    def nan_in_half(z, *args, **kwargs):
        dtypes.append(vae.dtype)
        if vae.dtype == torch.float16:  # what an overflowing fp16 SDXL VAE returns
            return (torch.full((z.shape[0], 3, z.shape[2] * scale, z.shape[3] * scale), float("nan")),)
        return real_decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", nan_in_half)
    vae.to(torch.float16)
    try:
        res = engine.generate(req_factory(steps=2))
        assert vae.dtype == torch.float16, "the fallback must put the VAE back in its own dtype"
    finally:
        vae.to(torch.float32)
    assert dtypes == [torch.float16, torch.float32]
    assert res.stats["notes"] == ["fp32 VAE fallback"]
    text = assert_valid_png(res.paths[0])
    assert "fp32 VAE fallback" in text
    assert torch.tensor(list(res.images[0].getdata()), dtype=torch.float32).std() > 0


# ---------------------------------------------------------------- cancellation

def test_closing_the_backend_stream_cancels_and_frees_the_lock(engine):
    backend = Backend(engine)
    events = backend.generate(TINY_VALUES)
    first = next(events)
    assert isinstance(first, Progress) and first.total == TINY_VALUES["steps"]
    started = time.monotonic()
    events.close()  # Gradio's Stop button
    assert _lock_is_free(engine), "the GPU lock is still held after Stop"
    assert time.monotonic() - started < LOCK_WAIT_S
    assert not _generator_threads()
    assert not _pngs(engine.outputs_dir), "a cancelled run saved an image"
    done = list(backend.generate({**TINY_VALUES, "steps": 2}))[-1]
    assert isinstance(done, Done) and len(done.paths) == 1


def test_client_gone_mid_run_cancels(engine):
    """A disconnected client: Gradio drops the generator; its finaliser closes it, which cancels the run."""
    events = Backend(engine).generate(TINY_VALUES)
    assert isinstance(next(events), Progress)
    del events
    gc.collect()
    assert _lock_is_free(engine)
    assert not _generator_threads()
    assert not _pngs(engine.outputs_dir)


def test_client_gone_before_the_first_event_runs_nothing(engine):
    """A stream dropped before it was iterated (request queued, then the client left) must not generate."""
    events = Backend(engine).generate(TINY_VALUES)
    del events
    gc.collect()
    time.sleep(0.5)
    assert _lock_is_free(engine)
    assert not _generator_threads(), "a worker runs a generation nobody will receive"
    assert not _pngs(engine.outputs_dir)


def test_cancel_token_set_before_start_frees_the_lock(engine, req_factory):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.generate(req_factory(steps=2), cancel=cancel)
    assert not engine.gpu_lock.locked()


# ---------------------------------------------------------------- saving

def _numbered(i: int) -> Image.Image:
    """A 64x64 image whose pixels encode `i`, so a file can be matched to the call that wrote it."""
    return Image.new("RGB", (64, 64), (i % 256, i // 256, 77))


def test_concurrent_saves_are_distinct_complete_and_never_overwrite(tmp_path):
    threads_n, per_thread = 16, 4
    barrier = threading.Barrier(threads_n)
    saved: dict[int, Path] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            for k in range(per_thread):
                i = t * per_thread + k
                saved[i] = save_png(_numbered(i), f"image {i}\nSteps: 1, Seed: {i}, Size: 64x64", tmp_path, seed=7)
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(saved) == threads_n * per_thread
    assert len(set(saved.values())) == len(saved), "two saves returned the same file"
    files = _pngs(tmp_path)
    assert sorted(files) == sorted(saved.values())
    assert not _leftovers(tmp_path)
    for i, path in saved.items():
        assert re.fullmatch(r"\d{5}-7\.png", path.name)
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.getpixel((0, 0)) == _numbered(i).getpixel((0, 0)), f"{path.name} holds another image"
        assert read_parameters(path).startswith(f"image {i}\n")


def test_save_never_replaces_a_file_another_process_wrote(tmp_path, monkeypatch):
    """Another process may create the next name between our scan and our link: we must move on, not replace."""
    first = save_png(_numbered(1), "one", tmp_path, seed=5)
    before = first.read_bytes()
    monkeypatch.setattr(saving, "_next_index", lambda folder: 1)  # a stale view of the folder
    second = save_png(_numbered(2), "two", tmp_path, seed=5)
    assert second != first and second.name.startswith("00002-")
    assert first.read_bytes() == before
    assert not _leftovers(tmp_path)


class _FailingImage:
    """Writes half a PNG, then fails like a full disk."""

    def save(self, fp, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise OSError(28, "No space left on device")


def test_failed_write_leaves_no_partial_or_temporary_file(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        save_png(_FailingImage(), "x", tmp_path, seed=1)
    assert not _pngs(tmp_path)
    assert not _leftovers(tmp_path), "a failed write left its temporary file behind"


def test_crash_mid_batch_keeps_the_images_already_finished(engine, req_factory, monkeypatch):
    real_decode, calls = vae_io.decode, []

    def decode_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("decoder exploded on image 3")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae_io, "decode", decode_then_crash)
    with pytest.raises(RuntimeError, match="image 3"):
        engine.generate(req_factory(steps=2, batch_size=4, seed=100))
    files = _pngs(engine.outputs_dir)
    assert len(files) == 2, [f.name for f in files]
    seeds = sorted(request_from_infotext(assert_valid_png(f)).seed for f in files)
    assert seeds == [100, 101]
    assert not _leftovers(engine.outputs_dir)
    assert not engine.gpu_lock.locked()


def test_oom_while_decoding_image_3_keeps_images_1_2_without_saving_them_twice(engine, req_factory, monkeypatch):
    import torch as _torch

    from pipelines.vae import io as vae_io

    real = vae_io.decode
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(vae_io, "decode", flaky)
    res = engine.generate(req_factory(batch_size=4, seed=10))
    files = sorted(engine.outputs_dir.rglob("*.png"))
    assert len(res.paths) == 4 and len(files) == 4, "an image was saved twice or lost"
    assert sorted(res.paths) == files
    assert [p.name.split("-")[1] for p in res.paths] == ["10.png", "11.png", "12.png", "13.png"]
    assert any("retried" in w for w in res.warnings)
