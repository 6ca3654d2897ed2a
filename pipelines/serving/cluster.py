"""A cluster on Ray Serve: `TesseraWorker` replicas (an Engine each) behind a DeploymentHandle; Gradio is the one
ingress process (a GradioServer replica cannot be load-balanced, and Gradio objects do not pickle).

    python app.py --ray                 # start a local Ray instance with the workers
    python app.py --ray auto            # join the running cluster (`ray start --head` on the head node)

The ingress validates each request itself (names, sizes; it loads no weights), calls a replica with
`handle.options(stream=True)`, and gets back `Started`, the `Progress` events (previews decoded on the worker), then
`Finished`: the PNG bytes with their metadata, which the ingress saves (`pipelines.saving`), so no disk is shared.
Stop or a client that went away closes the ingress generator, which cancels the Ray call; the replica's async
generator gets `asyncio.CancelledError` at its next `await` (one per step) and sets the engine's cancel token.
A replica lost before its images came back gets the job retried once on another replica; a second loss is a clear
error. Importing this module does not import ray (the embedded default needs nothing new).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipelines import errors
from pipelines.errors import TesseraError, ValidationError
from pipelines.image_info import png_bytes
from pipelines.serving.facade import EngineFacade
from pipelines.serving.service import Backend, Done, Progress, RunToken, _image, _Timer, safe_preview

if TYPE_CHECKING:
    from pipelines.engine import Engine
    from pipelines.options import EngineOptions

EngineBuilder = Callable[["EngineOptions", str], "Engine"]
"""(options, device) -> an Engine: `pipelines.factory.engine_for`, handed to the replicas (Ray pickles it by name)."""

log = logging.getLogger(__name__)

APP_NAME = "tessera"
ROOT = Path(__file__).resolve().parents[2]  # the repository (pipelines/serving/cluster.py): `pipelines` imports
LOOPBACK = "127.0.0.1"


class WorkerLostError(TesseraError):
    """The Ray replica running a job died (and so did the one it was retried on)."""


# ---------------------------------------------------------------- what a replica streams back (plain, picklable)
@dataclass
class Started:
    """A replica took the job: its id, its actor handle (for operators: ray.kill), how its previous job ended."""

    worker: str
    actor: Any = None
    previous: dict[str, Any] | None = None


@dataclass
class Finished:
    """The images as PNG bytes (with their `parameters` chunk), in order, and the run's statistics."""

    pngs: list[bytes]
    infotexts: list[str]
    seeds: list[int]
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Failed:
    """A TesseraError on the replica, by class name and message (ValidationError with its three parts)."""

    kind: str
    message: str
    parts: tuple | None = None

    def error(self) -> TesseraError:
        if self.parts is not None:
            return ValidationError(*self.parts)
        cls = getattr(errors, self.kind, TesseraError)
        return cls(self.message) if isinstance(cls, type) and issubclass(cls, TesseraError) else TesseraError(
            self.message)


def _failed(exc: TesseraError) -> Failed:
    parts = (exc.field, exc.value, exc.fix) if isinstance(exc, ValidationError) else None
    return Failed(type(exc).__name__, str(exc), parts)


# ---------------------------------------------------------------- the replica
class TesseraWorker:
    """One replica: an Engine on its device (Ray assigns the GPU) that runs one job at a time."""

    def __init__(self, build: EngineBuilder, options: EngineOptions, device: str, default_model: str | None = None,
                 threads: int | None = None):
        import torch

        if threads:  # CPU pixels depend on the thread count (reduction order): the ingress's, not Ray's 1
            torch.set_num_threads(int(threads))
        # the same factory as the embedded engine (--attention, --compile, --offload, --dtype reach the replica)
        self.engine = build(replace(options, outputs_dir=None, devices=None), device)
        if default_model:
            self.engine.default_model = default_model
        _loopback_replica_grpc()
        self.name, self.actor = _replica_identity()
        self.last_job: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None

    async def run(self, kind: str, payload: Any, preview_every: int = 0) -> AsyncIterator[Any]:
        """Started, Progress ..., then Finished (or Failed). Cancelling the call stops the engine within a step."""
        if self._thread is not None:  # a cancelled job's run stops at its next step: start after it
            await asyncio.to_thread(self._thread.join)
        yield Started(self.name, self.actor, self.last_job)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job: dict[str, Any] = {"steps": 0, "outcome": "running", "total": 1}
        self.last_job = job

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the replica is shutting down: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, item)

        # the last step done: "finishing", so the ingress stops cancelling (the images are finished work)
        cancel = RunToken(on_finished=lambda: put(Progress(job["total"], job["total"], 0.0, None, "finishing")))

        self._thread = threading.Thread(target=self._work, args=(kind, payload, preview_every, cancel, job, put),
                                        name="tessera-worker", daemon=True)
        self._thread.start()
        try:
            while True:
                item = await events.get()  # a cancelled call raises CancelledError here, between steps
                yield item
                if not isinstance(item, Progress):
                    return
        finally:
            job.setdefault("cancelled_at", time.monotonic())
            job.setdefault("steps_at_cancel", job["steps"])
            cancel.set()  # cancelled, or the caller went away: the loop stops at its next step

    def _work(self, kind, payload, every, cancel, job, put) -> None:
        timer = _Timer()

        def callback(info) -> None:
            job["steps"] += 1
            job["total"] = info.total
            stage, eta = timer.tick(info.step, info.total)
            preview = None
            if every and (info.step + 1) % every == 0 and info.step + 1 < info.total:
                preview = self._preview(info.denoised)
            put(Progress(info.step + 1, info.total, eta, preview, stage))

        try:
            if kind == "generate":
                result = self.engine.generate(payload, callback=callback, cancel=cancel, save=False)
            else:
                image, kwargs = payload
                result = self.engine.upscale(image, callback=callback, cancel=cancel, save=False, **kwargs)
            pngs = [png_bytes(img, text) for img, text in zip(result.images, result.infotexts, strict=True)]
            job["outcome"] = "done"
            put(Finished(pngs, result.infotexts, result.seeds, result.stats, result.warnings))
        except errors.CancelledError:
            job["outcome"] = "cancelled"
            job["stopped_after_s"] = round(time.monotonic() - job.get("cancelled_at", time.monotonic()), 3)
            put(Failed("CancelledError", "generation stopped"))
        except TesseraError as exc:
            job["outcome"] = "failed"
            put(_failed(exc))
        except Exception as exc:  # logged here; the ingress shows a clear one-line error
            log.exception("job failed on %s", self.name)
            job["outcome"] = "failed"
            put(Failed("TesseraError", f"the worker failed unexpectedly ({type(exc).__name__}: {exc})"))

    def _preview(self, denoised) -> Image.Image | None:
        return safe_preview(self.engine, denoised)


def _loopback_replica_grpc() -> None:
    """On a loopback-only node, the replica's inter-deployment gRPC server (which Ray Serve 2.60 binds on [::],
    all interfaces, after this constructor) listens on 127.0.0.1 instead."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return
    real = getattr(replica, "add_port_to_grpc_server", None)
    if real is None or getattr(real, "tessera_loopback", False) or ray.util.get_node_ip_address() != LOOPBACK:
        return

    def loopback(server: Any, address: str) -> Any:
        return real(server, address.replace("[::]", LOOPBACK, 1))

    loopback.tessera_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


def _replica_identity() -> tuple[str, Any]:
    try:
        import ray
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().current_actor
    except Exception:  # not inside a Serve replica (a direct test): one local worker
        return "local", None


# ---------------------------------------------------------------- the ingress
class ClusterEngine(EngineFacade):
    """The ingress's face of the cluster: checks and plans locally (no weights), runs jobs on the replicas."""

    def __init__(self, handle: Any, local: Any, *, max_workers: int, retries: int = 1):
        self.handle, self.local, self.max_workers, self.retries = handle, local, max_workers, retries
        self.running: dict[int, Started] = {}  # jobs in flight -> the replica that took them
        self.history: deque[dict[str, Any]] = deque(maxlen=64)  # finished jobs: worker, previous job there, retried
        self._ids = iter(range(1 << 62))

    def _local_engine(self) -> Any:  # the Engine face (`EngineFacade`): checks and plans here, no weights
        return self.local

    def stream(self, kind: str, payload: Any, preview_every: int = 0) -> ClusterStream:
        """Progress ... Done from a replica, with `stop()` (`ClusterStream`); a replica lost before its images came
        back is retried once."""
        stream = ClusterStream()
        stream.events = self._stream(kind, payload, preview_every, stream)
        return stream

    def _stream(self, kind: str, payload: Any, preview_every: int, control: ClusterStream
                ) -> Iterator[Progress | Done]:
        from ray.exceptions import ActorUnavailableError, RayActorError

        job = next(self._ids)
        for attempt in range(self.retries + 1):
            try:
                yield from self._attempt(job, kind, payload, preview_every, attempt > 0, control)
                return
            except (RayActorError, ActorUnavailableError) as exc:
                lost = self.running.pop(job, None)
                log.warning("worker %s lost mid-job (%s)", lost.worker if lost else "?", type(exc).__name__)
                if attempt == self.retries:
                    raise WorkerLostError(f"the worker running this job was lost ({type(exc).__name__}) and so was "
                                          f"the one it was retried on; try again") from None
            finally:
                self.running.pop(job, None)

    def _attempt(self, job: int, kind: str, payload: Any, every: int, retried: bool,
                 control: ClusterStream) -> Iterator[Progress | Done]:
        from ray.exceptions import TaskCancelledError

        response = self.handle.options(stream=True).run.remote(kind, payload, every)
        control.attach(response)
        finished = False
        try:
            for item in _cancelled_as_stopped(response, TaskCancelledError):
                if isinstance(item, Started):
                    self.running[job] = item
                elif isinstance(item, Progress):
                    if item.stage == "finishing":
                        control.finishing()
                    yield item
                elif isinstance(item, Failed):
                    finished = True
                    raise item.error()
                else:
                    finished = True
                    started = self.running.get(job)
                    yield self._save(item, started, retried)
                    return
        finally:
            if not finished:
                response.cancel()  # Stop / client gone / error here: the replica stops within a step

    def _save(self, item: Finished, started: Started | None, retried: bool) -> Done:
        """Decode and save the images here (the ingress owns the outputs folder); then the Done."""
        from pipelines.saving import save_png

        images, paths = [], []
        for data, text, seed in zip(item.pngs, item.infotexts, item.seeds, strict=True):
            with Image.open(io.BytesIO(data)) as png:
                img = png.convert("RGB")
            images.append(img)
            if self.outputs_dir is not None:
                paths.append(str(save_png(img, text, self.outputs_dir, seed)))
        worker = started.worker if started else "?"
        self.history.append({"worker": worker, "previous": started.previous if started else None,
                             "retried": retried})
        stats = {**item.stats, "worker": worker, "retried": retried}
        return Done(images, paths, item.infotexts, item.seeds, stats, item.warnings)


def _cancelled_as_stopped(response: Any, cancelled: type[BaseException]) -> Iterator[Any]:
    """The replica's items; a call cancelled by `ClusterStream.stop()` ends as the engine's CancelledError."""
    try:
        yield from response
    except cancelled:
        raise errors.CancelledError("generation stopped") from None


class ClusterStream:
    """A cluster run's events with `stop()`, callable from any thread (the UI's Stop, the API's cancel): it cancels
    the Ray call at once, so the replica's loop stops within a step, unless the replica said its last step is done
    ("finishing"): then the images are finished work and come back as usual. `close()` drops the rest."""

    def __init__(self) -> None:
        self.events: Iterator[Progress | Done] = iter(())
        self._lock = threading.Lock()
        self._response: Any = None
        self._stopped = self._finishing = False

    def __iter__(self) -> ClusterStream:
        return self

    def __next__(self) -> Progress | Done:
        return next(self.events)

    def close(self) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()

    def attach(self, response: Any) -> None:
        """The Ray call in flight (a retry makes a new one); a stop asked for earlier cancels it now."""
        with self._lock:
            self._response = response
            cancel = self._stopped and not self._finishing
        if cancel:
            response.cancel()

    def finishing(self) -> None:
        with self._lock:
            self._finishing = True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            response = None if self._finishing else self._response
        if response is not None:
            response.cancel()


class ClusterBackend(Backend):
    """The UI's backend over the cluster: requests are checked here, run on a replica, saved here."""

    def generate(self, values: dict[str, Any]) -> Iterator[Progress | Done]:
        req = self.request(values)
        return self.engine.stream("generate", req, int(values.get("preview_every") or 0))

    def upscale(self, values: dict[str, Any]) -> Iterator[Progress | Done]:
        image = _image(values.get("image"), "image")
        kwargs = {k: values[k] for k in ("upscaler", "scale", "denoise", "prompt", "negative_prompt", "model",
                                         "steps", "seed") if values.get(k) is not None}
        return self.engine.stream("upscale", (image, kwargs), 0)

    def _preview(self, denoised) -> None:
        return None  # previews are decoded on the replica


# ---------------------------------------------------------------- deploying
def runtime_env(address: str | None) -> dict[str, Any]:
    """How replicas find this code: the repository on PYTHONPATH locally, uploaded as working_dir to a cluster."""
    offline = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TESSERA_CACHE", "HF_HOME")
               if k in os.environ}
    if address is None:
        return {"env_vars": {"PYTHONPATH": str(ROOT), **offline}}
    return {"working_dir": str(ROOT), "excludes": ["/models/", "/outputs/", ".git/", "__pycache__/", "/.venv*/", "/venv/"],
            "env_vars": offline}


def app_name(env: dict[str, Any]) -> str:
    """The Serve application's name: "tessera-" and a hash of the replicas' runtime env (with the uploaded code's
    package URI when joining a cluster), so a deploy with other code or settings never updates, nor reuses, the
    replicas of an application deployed under another runtime env (a detached Serve controller outlives us)."""
    digest = hashlib.sha256(json.dumps(env, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{APP_NAME}-{digest}"


def _is_loopback(address: str | None) -> bool:
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch, read when ray is imported, for a one-machine instance: set to 0, the node's address is 127.0.0.1
and its gRPC servers listen on loopback only (else Ray turns 127.0.0.1 into the machine's network address)."""


def _ray_token_available() -> bool:
    """Whether this machine has a Ray cluster token (Ray's own places: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()


def init_ray(address: str | None) -> None:
    """Start a local Ray bound to 127.0.0.1 only (address None), or join `address`; a head on a loopback address
    is joined from 127.0.0.1 too. On a real cluster this node's address is Ray's choice (`ray start
    --node-ip-address` on each node sets it)."""
    if address is None or _is_loopback(address):
        os.environ.setdefault(SINGLE_NODE, "0")  # before ray is imported; its processes inherit it
    if address is not None and "RAY_AUTH_MODE" not in os.environ and _ray_token_available():
        # `ray start --head` turns token authentication on and writes the token; a joining driver must send it
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, runtime_env=runtime_env(None))
        return
    extra: dict[str, Any] = {"_node_ip_address": LOOPBACK} if _is_loopback(address) and \
        not address.startswith("ray://") else {}
    ray.init(address=address, runtime_env=runtime_env(address), **extra)


def deploy(build: EngineBuilder, options: EngineOptions, *, default_model: str | None = None, min_workers: int = 1,
           max_workers: int | None = None, num_cpus: float | None = None, threads: int | None = None,
           name: str | None = None):
    """Deploy `TesseraWorker` (GPU replicas when the cluster has GPUs, else CPU ones) built from `options` as the
    embedded engine is; returns its handle. Replicas get this job's runtime env explicitly (never one a running
    Serve controller kept from an earlier deploy), under `app_name(env)`; other Tessera applications on the
    cluster (earlier code) are deleted, so their replicas free their GPUs."""
    import ray
    from ray import serve

    max_workers = max(min_workers, max_workers or min_workers)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    env = dict(ray.get_runtime_context().runtime_env or {})
    options_ = {"num_gpus": 1} if gpus else {"num_cpus": 1 if num_cpus is None else num_cpus}
    actor_options: dict[str, Any] = {**options_, "runtime_env": env}
    device = options.device if options.device != "auto" else ("cuda" if gpus else "cpu")
    scaling: dict[str, Any] = {"num_replicas": min_workers} if max_workers == min_workers else {
        "autoscaling_config": {"min_replicas": min_workers, "max_replicas": max_workers,
                               "initial_replicas": min_workers, "target_ongoing_requests": 1}}
    # Any: with **scaling, mypy picks the decorator overload of serve.deployment (this call returns a Deployment)
    worker: Any = serve.deployment(TesseraWorker, name="TesseraWorker", ray_actor_options=actor_options,
                                   max_ongoing_requests=1, **scaling)
    serve.start(proxy_location="Disabled", http_options={"host": LOOPBACK})  # Gradio is the one ingress
    name = name or app_name({**env, "actor": options_, "options": options, "threads": threads})
    for other in serve.status().applications:
        if other != name and other.startswith(f"{APP_NAME}-"):
            log.warning("deleting the Serve application %s (deployed under another runtime env)", other)
            serve.delete(other)
    models = replace(options, models_dir=str(Path(options.models_dir).resolve()))
    app = worker.bind(build, models, device, default_model, threads if device == "cpu" else None)
    return serve.run(app, name=name, route_prefix=None)
