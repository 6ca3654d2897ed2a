"""The Ray Serve cluster on a local Ray instance this module starts itself (2 CPUs, two CPU replicas of the tiny
model) behind the real Gradio ingress: concurrent callers, both replicas, the embedded engine's pixels, cancel,
a killed replica."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from gradio_client import Client
from PIL import Image

from pipelines.errors import OutOfMemoryError, ValidationError
from pipelines.factory import engine_for
from pipelines.options import EngineOptions
from pipelines.serving.cluster import (
    SINGLE_NODE,
    ClusterBackend,
    ClusterEngine,
    Failed,
    WorkerLostError,
    deploy,
    runtime_env,
)
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
    env = pytest.MonkeyPatch()
    env.setenv(SINGLE_NODE, "0")  # as the app does for a local Ray: 127.0.0.1 stays 127.0.0.1 (README)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env=runtime_env(None), _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    demo = None
    try:
        handle = deploy(engine_for, EngineOptions(models_dir=models, device="cpu", dtype="fp32"), default_model="tiny",
                        min_workers=2, max_workers=2, num_cpus=0.5, threads=torch.get_num_threads())
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
        env.undo()


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



# ---------------------------------------------------------------- `python app.py --ray` itself, as a user starts it

ROOT = Path(__file__).resolve().parent.parent
SEED_RUN = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 11}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ray_tmp: Path, single_node: bool = False) -> dict[str, str]:
    """The subprocesses' environment: offline, the tests' tiny-model cache, Ray's files in our own temp dir; the
    app sets Ray's loopback switch itself, the head started here gets it from us (as the README says)."""
    return {**os.environ, **({SINGLE_NODE: "0"} if single_node else {}), "RAY_TMPDIR": str(ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "RAY_agent_register_timeout_ms": "300000"}  # a loaded 2-core machine starts Ray's agents slowly


def _tree(proc: psutil.Process | int) -> list[psutil.Process]:
    """A process (or pid) and all its descendants; [] when it has already ended."""
    with contextlib.suppress(psutil.Error):
        proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        return [proc, *proc.children(recursive=True)]
    return []


def _ours(ray_tmp: Path) -> list[psutil.Process]:
    """Every process started for `ray_tmp` (its path is in their command lines): only Rays this test started."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(ray_tmp) in part for part in p.info["cmdline"] or []):
                found.append(p)
    return found


def _stop(procs: list[psutil.Process]) -> None:
    """End these processes (by their pid): terminate, then kill what is left."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _listening(procs: list[psutil.Process]) -> set[str]:
    """The addresses these processes listen on (TCP)."""
    out = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out |= {c.laddr.ip for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    return out


@contextlib.contextmanager
def _app(tmp: Path, ray_tmp: Path, *options: str):
    """`python app.py --model tiny ... OPTIONS` in a subprocess; yields (url, its process) once it serves."""
    port = _free_port()
    log = (tmp / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                             "--models-dir", str(tmp / "models"), "--out", str(tmp / "outputs"), "--port", str(port),
                             *options], cwd=ROOT, env=_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600  # a hang guard for a broken start, not a speed check
        while True:
            assert proc.poll() is None, (tmp / "app.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, (tmp / "app.log").read_text()[-3000:]
            time.sleep(1)
        yield url, proc
    finally:
        _stop(_tree(proc.pid))  # the app and what it started (its local Ray), by pid
        proc.wait()
        log.close()


def _cli_pixels(tmp: Path, ray_tmp: Path) -> np.ndarray:
    """`python app.py generate` (the CLI, embedded engine) for SEED_RUN."""
    out = tmp / "cli-out"
    args = [f"--{k}={v}" for k, v in SEED_RUN.items()]
    subprocess.run([sys.executable, "app.py", "generate", "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                    "--models-dir", str(tmp / "models"), "--out", str(out), *args], cwd=ROOT, env=_env(ray_tmp),
                   check=True, capture_output=True)
    (png,) = out.rglob("*.png")
    return _pixels(png)


def _api_pixels(url: str, tmp: Path) -> np.ndarray:
    client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
    files, texts = client.predict(**SEED_RUN, api_name="/generate")
    assert f"Seed: {SEED_RUN['seed']}" in texts[0]
    return _pixels(files[0])


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_app_ray_starts_a_loopback_only_local_ray_with_the_clis_pixels(tiny_dir, tmp_path):
    """`python app.py --ray`: a local Ray of its own, every process of it (replica included) listening on
    127.0.0.1 only, and the same pixels as `python app.py generate` for the same seed."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        with _app(tmp_path, ray_tmp, "--ray") as (url, proc):
            api = _api_pixels(url, tmp_path)
            processes = _tree(psutil.Process(proc.pid))
            assert any("TesseraWorker" in " ".join(p.cmdline()) or "ray::" in p.name() for p in processes)
            listening = _listening(processes)
        assert listening and listening <= LOOPBACK, listening
        assert np.array_equal(api, _cli_pixels(tmp_path, ray_tmp))
        assert len(list((tmp_path / "outputs").rglob("*.png"))) == 1  # saved by the ingress
    finally:
        _stop(_ours(ray_tmp))


def test_app_ray_joins_a_head_the_test_started_on_loopback(tiny_dir, tmp_path):
    """`ray start --head --node-ip-address 127.0.0.1` (ours, in our temp dir, stopped at the end), then
    `python app.py --ray 127.0.0.1:PORT`: the replicas import the project (the working_dir is the repository)
    and give the CLI's pixels."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(port), "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
                             # fixed agent ports: the raylet does not wait for slow agents to report theirs
                             *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port",
                               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")),
                             f"--temp-dir={ray_tmp}"], env=_env(ray_tmp, single_node=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # hang guard
        while True:
            assert head.poll() is None, "ray start failed"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                break
            assert time.monotonic() < deadline, "the head did not come up"
            time.sleep(1)
        with _app(tmp_path, ray_tmp, "--ray", f"127.0.0.1:{port}") as (url, _):
            api = _api_pixels(url, tmp_path)
            listening = _listening(_ours(ray_tmp) + _tree(psutil.Process(head.pid)))
        assert listening and listening <= LOOPBACK, listening
        assert np.array_equal(api, _cli_pixels(tmp_path, ray_tmp))
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(120)
        _stop(_ours(ray_tmp))


def test_a_cluster_streams_stop_cancels_the_call_unless_the_replica_said_finishing():
    """`ClusterStream.stop()` (the UI's Stop, the API's cancel) cancels the Ray call at once, also one made after
    the stop (a retry); after the replica's "finishing" it cancels nothing: the images are finished work."""
    from pipelines.serving.cluster import ClusterStream

    class Call:
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    stream, first = ClusterStream(), Call()
    stream.attach(first)
    stream.stop()
    assert first.cancelled == 1
    retry = Call()
    stream.attach(retry)
    assert retry.cancelled == 1
    done, call = ClusterStream(), Call()
    done.attach(call)
    done.finishing()
    done.stop()
    assert call.cancelled == 0
