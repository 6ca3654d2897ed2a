"""The Ray Serve cluster on a local Ray instance this module starts itself (2 CPUs, two CPU replicas of the tiny
model) behind the real Gradio ingress: concurrent callers, both replicas, the embedded engine's pixels, cancel,
a killed replica."""

from __future__ import annotations

import socket
import tempfile
import time

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

from pipelines.errors import OutOfMemoryError, ValidationError
from pipelines.serving.cluster import ClusterBackend, ClusterEngine, Failed, WorkerLostError, deploy, runtime_env
from tests.conftest import assert_valid_png, tiny_request

pytestmark = pytest.mark.xdist_group("ray")

TINY = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "prompt": "a red fox in the snow"}


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    """A fresh local Ray (never one already running), Serve with two CPU replicas, and the Gradio ingress."""
    import ray
    from ray import serve

    from pipelines.engine import Engine
    from pipelines.models.manager import ModelManager
    from ui.app import create_demo, launch_kwargs

    models = tmp_path_factory.mktemp("models")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env(None), _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    demo = None
    try:
        handle = deploy(models_dir=str(models), device="cpu", dtype="fp32", default_model="tiny", min_workers=2,
                        max_workers=2, num_cpus=0.5, threads=torch.get_num_threads())
        local = Engine(ModelManager(models, device="cpu", dtype="fp32"), tmp_path_factory.mktemp("ingress-out"))
        local.default_model = "tiny"
        engine = ClusterEngine(handle, local, max_workers=2)
        demo = create_demo(ClusterBackend(engine), queue_size=32, workers=2)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs())
        yield f"http://127.0.0.1:{port}/", engine
    finally:
        if demo is not None:
            demo.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster, tmp_path_factory) -> Client:
    return Client(cluster[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_eight_concurrent_callers_all_get_pngs_from_both_replicas(cluster, client):
    _, engine = cluster
    before = len(engine.history)
    jobs = [client.submit(**TINY, seed=100 + i, api_name="/generate") for i in range(8)]
    results = [job.result(timeout=240) for job in jobs]
    for i, (files, texts) in enumerate(results):
        assert len(files) == 1 and f"Seed: {100 + i}" in texts[0]
        assert assert_valid_png(files[0]) == texts[0]
    served = [h["worker"] for h in list(engine.history)[before:]]
    assert len(served) == 8 and len(set(served)) == 2


def test_the_same_seed_gives_the_embedded_engines_pixels(client, engine):
    files, texts = client.predict(**TINY, seed=7, api_name="/generate")
    local = engine.generate(tiny_request(**TINY, seed=7), save=False)
    assert np.array_equal(_pixels(files[0]), np.asarray(local.images[0]))
    assert texts[0] == local.infotexts[0]


def test_upscale_runs_on_a_worker_and_is_saved_by_the_ingress(cluster, client, tmp_path):
    from gradio_client import handle_file

    src = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    file, text = client.predict(image=handle_file(str(src)), upscaler="lanczos", scale=2, api_name="/upscale")
    with Image.open(file) as img:
        assert img.size == (128, 128) and img.info["parameters"] == text
    assert "Hires upscaler: lanczos" in text
    assert list(cluster[1].outputs_dir.rglob("*.png"))  # saved on the ingress's disk


def test_a_bad_request_is_refused_at_the_ingress_with_the_usual_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="multiple of 8"):
        client.predict(**{**TINY, "width": 1001}, api_name="/generate")


def _wait_for_progress(job, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(out and out[0] == [] for out in job.outputs()):
        assert time.monotonic() < deadline, "no progress from the worker"
        assert not job.done(), job.status()
        time.sleep(0.05)


def test_cancel_stops_the_run_on_the_worker_within_a_step_and_the_next_job_runs(cluster, client):
    _, engine = cluster
    job = client.submit(**{**TINY, "steps": 150, "width": 384, "height": 384}, seed=3, api_name="/generate")
    _wait_for_progress(job)
    (started,) = engine.running.values()
    steps_seen = max(int(out[1][0].split()[1].split("/")[0]) for out in job.outputs() if out and out[0] == [])
    job.cancel()
    # jobs in pairs (one per replica when both are free) until one runs on the cancelled job's replica
    deadline = time.monotonic() + 120
    record = None
    while record is None:
        assert time.monotonic() < deadline, "no later job ran on the cancelled job's worker"
        before = len(engine.history)
        pair = [client.submit(**TINY, seed=s, api_name="/generate") for s in (1, 2)]
        for j in pair:
            assert_valid_png(j.result(timeout=120)[0][0])
        record = next((h for h in list(engine.history)[before:] if h["worker"] == started.worker), None)
    previous = record["previous"]
    assert previous["outcome"] == "cancelled"
    # the loop stopped within a step of the cancel (a step or two may finish while the cancel travels)
    assert steps_seen <= previous["steps"] < 150
    # on the worker, at most the step under way when the cancel arrived finished after it
    assert previous["steps"] - previous["steps_at_cancel"] <= 1


def test_killing_a_replica_mid_job_gives_a_retried_success_and_the_server_keeps_serving(cluster, client):
    import ray

    _, engine = cluster
    job = client.submit(**{**TINY, "steps": 16, "width": 128, "height": 128}, seed=9, api_name="/generate")
    _wait_for_progress(job)
    (started,) = engine.running.values()
    ray.kill(started.actor, no_restart=True)
    files, texts = job.result(timeout=240)  # the retry on the other replica: a whole, valid image
    assert assert_valid_png(files[0], (128, 128)) == texts[0] and "Seed: 9" in texts[0]
    last = engine.history[-1]
    assert last["retried"] and last["worker"] != started.worker
    files, _ = client.predict(**TINY, seed=10, api_name="/generate")
    assert_valid_png(files[0])


def test_a_second_loss_is_a_clear_error_never_a_hang():
    class Dying:
        """A handle whose every replica dies before returning anything."""

        calls = 0

        def options(self, **_):
            return self

        @property
        def run(self):
            return self

        def remote(self, *args):
            Dying.calls += 1
            return _DeadStream()

    engine = ClusterEngine(Dying(), None, max_workers=1)
    with pytest.raises(WorkerLostError, match="lost .* retried"):
        list(engine.stream("generate", tiny_request()))
    assert Dying.calls == 2


class _DeadStream:
    def __iter__(self):
        from ray.exceptions import ActorDiedError

        raise ActorDiedError()

    def cancel(self):
        pass


@pytest.mark.parametrize("exc", [ValidationError("width", 1001, "must be a multiple of 8"),
                                 OutOfMemoryError("out of memory even with tiling")])
def test_worker_errors_come_back_as_the_same_errors(exc):
    from pipelines.serving.cluster import _failed

    back = _failed(exc).error()
    assert type(back) is type(exc) and str(back) == str(exc)
    assert isinstance(Failed("NoSuchError", "boom").error(), Exception)


def test_importing_the_app_does_not_import_ray():
    import subprocess
    import sys

    code = "import app, pipelines.serving.cluster, pipelines.serving.workers, sys; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

