"""A worker per device: `--devices` parsing, the dispatcher (two CPU workers run two jobs at once), the same
pixels on either worker, the worker in the stats but not in the PNG metadata, Gradio's concurrency = workers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipelines.errors import CancelledError, ValidationError
from pipelines.factory import build_pool
from pipelines.serving.workers import SharedPromptCache, WorkerPool, parse_devices
from tests.conftest import tiny_request


@pytest.mark.parametrize(("text", "count", "expected"), [
    (None, 0, ["auto"]), ("", 2, ["auto"]), ("all", 2, ["cuda:0", "cuda:1"]), ("all", 0, ["cpu"]),
    ("cuda:0,cuda:1", 2, ["cuda:0", "cuda:1"]), ("cpu,cpu", 0, ["cpu", "cpu"]), (" CPU , cpu", 0, ["cpu", "cpu"]),
])
def test_parse_devices(text, count, expected):
    assert parse_devices(text, cuda_count=count) == expected


@pytest.mark.parametrize(("text", "match"), [("cuda:2", "has 2 CUDA"), ("gpu0", "comma list"), ("cpu,,cpu", "comma")])
def test_parse_devices_names_the_bad_value(text, match):
    with pytest.raises(ValidationError, match=match) as err:
        parse_devices(text, cuda_count=2)
    assert err.value.field == "devices"


@pytest.fixture(scope="module")
def pool(tiny_cache, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    return build_pool(["cpu", "cpu"], models, tmp_path_factory.mktemp("pool-out"), dtype="fp32")


def test_two_workers_serve_two_jobs_at_once(pool):
    """Each job waits at a barrier on its first step: it passes only if both jobs are inside a worker together."""
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def job(i: int) -> None:
        def callback(info) -> None:
            if info.step == 0:
                barrier.wait()

        try:
            results[i] = pool.generate(tiny_request(seed=i, steps=2), callback=callback)
        except Exception as exc:  # the test reports it below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert {results[0].stats["worker"], results[1].stats["worker"]} == {"0:cpu", "1:cpu"}
    assert all(not w.busy for w in pool.workers)


def test_a_seed_gives_the_same_pixels_on_either_worker_and_the_worker_is_not_in_the_metadata(pool):
    req = tiny_request(seed=11, steps=2)
    a, b = (w.engine.generate(req) for w in pool.workers)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.infotexts == b.infotexts
    one = pool.generate(req)
    assert one.stats["worker"] in ("0:cpu", "1:cpu")
    assert "worker" not in one.infotexts[0].lower() and "cpu" not in one.infotexts[0].lower()
    assert one.infotexts == a.infotexts


def test_the_workers_share_one_prompt_cache_and_each_owns_its_weights(pool):
    e0, e1 = (w.engine for w in pool.workers)
    assert isinstance(e0.prompt_cache, SharedPromptCache) and e0.prompt_cache is e1.prompt_cache
    assert e0.manager is not e1.manager and e0.gpu_lock is not e1.gpu_lock
    m0, m1 = e0.manager.get("tiny"), e1.manager.get("tiny")
    assert m0.unet is not m1.unet


def test_a_job_waiting_for_a_worker_can_be_cancelled():
    class Busy:
        default_model = "tiny"

    one = WorkerPool([Busy()])
    one.workers[0].busy = True
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError, match="waiting for a free device"):
        one.generate(tiny_request(), cancel=cancel)


def test_gradio_runs_as_many_jobs_at_once_as_there_are_workers(pool):
    from pipelines.serving.service import make_backend
    from ui.app import create_demo

    pool.default_model = "tiny"
    demo = create_demo(make_backend(pool), workers=len(pool))
    limits = {fn.name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert {"generate", "upscale"} <= set(limits)
    assert set(limits.values()) == {2}


def test_app_devices_option_builds_a_pool_and_matching_queue(tiny_cache, tmp_path):
    from app import build_demo, ui_parser

    args = ui_parser().parse_args(["--model", "tiny", "--devices", "cpu,cpu", "--models-dir", str(tmp_path),
                                   "--out", str(tmp_path / "out")])
    demo = build_demo(args)
    limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert limits == {2}


def test_cli_devices_option_builds_a_splitting_pool(tiny_cache, tmp_path):
    from cli import _engine, build_parser

    args = build_parser().parse_args(["generate", "--model", "tiny", "--devices", "cpu,cpu", "--split-image", "on",
                                      "--models-dir", str(tmp_path)])
    engine = _engine(args)
    assert isinstance(engine, WorkerPool) and len(engine) == 2 and engine.split == "on"
    assert all(w.engine.allow_paths for w in engine.workers)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--split-image", "sometimes"])


def test_cli_bad_devices_is_one_line_and_exit_2(tiny_cache, tmp_path, capsys):
    from cli import main

    code = main(["generate", "--model", "tiny", "--prompt", "x", "--devices", "gpu0", "--models-dir", str(tmp_path),
                 "--out", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: `devices` must be all, or a comma list")


class _Meeting:
    """An engine that waits at a barrier before generating: two jobs pass it only if they run at the same time."""

    def __init__(self, engine, barrier: threading.Barrier):
        self._engine, self._barrier = engine, barrier

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, req, **kw):
        self._barrier.wait()
        return self._engine.generate(req, **kw)


@pytest.mark.xdist_group("gradio-app")
def test_two_api_callers_run_at_once_on_two_workers(pool, tmp_path):
    import socket

    from gradio_client import Client

    from pipelines.serving.service import make_backend
    from tests.conftest import assert_valid_png
    from ui.app import create_demo, launch_kwargs

    barrier = threading.Barrier(2, timeout=60)
    meeting = WorkerPool([_Meeting(w.engine, barrier) for w in pool.workers], [w.name for w in pool.workers])
    meeting.default_model = "tiny"
    demo = create_demo(make_backend(meeting), workers=len(meeting))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        jobs = [client.submit(prompt="x", model="tiny", width=64, height=64, steps=2, seed=i, api_name="/generate")
                for i in range(2)]
        for job in jobs:
            assert_valid_png(job.result(timeout=120)[0][0])
    finally:
        demo.close()
    assert not barrier.broken
