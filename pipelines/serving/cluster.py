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
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines import errors
from pipelines.errors import TesseraError, ValidationError
from pipelines.image_info import png_bytes
from pipelines.serving.facade import EngineFacade
from pipelines.serving.service import Backend, Done, Progress, _image, _Timer, safe_preview

log = logging.getLogger(__name__)

APP_NAME = "tessera"
ROOT = Path(__file__).resolve().parent.parent


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

    def __init__(self, models_dir: str = "models", device: str = "auto", dtype: str = "auto",
                 default_model: str | None = None, threads: int | None = None):
        import torch

        from pipelines.engine import Engine
        from pipelines.models.manager import ModelManager

        if threads:
            torch.set_num_threads(int(threads))
        self.engine = Engine(ModelManager(models_dir, device=device, dtype=dtype), outputs_dir=None)
        if default_model:
            self.engine.default_model = default_model
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
        cancel = threading.Event()
        job: dict[str, Any] = {"steps": 0, "outcome": "running"}
        self.last_job = job

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the replica is shutting down: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, item)

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

    def stream(self, kind: str, payload: Any, preview_every: int = 0) -> Iterator[Progress | Done]:
        """Progress ... Done from a replica; a replica lost before its images came back is retried once."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        job = next(self._ids)
        for attempt in range(self.retries + 1):
            try:
                yield from self._attempt(job, kind, payload, preview_every, retried=attempt > 0)
                return
            except (RayActorError, ActorUnavailableError) as exc:
                lost = self.running.pop(job, None)
                log.warning("worker %s lost mid-job (%s)", lost.worker if lost else "?", type(exc).__name__)
                if attempt == self.retries:
                    raise WorkerLostError(f"the worker running this job was lost ({type(exc).__name__}) and so was "
                                          f"the one it was retried on; try again") from None
            finally:
                self.running.pop(job, None)

    def _attempt(self, job: int, kind: str, payload: Any, every: int, retried: bool) -> Iterator[Progress | Done]:
        response = self.handle.options(stream=True).run.remote(kind, payload, every)
        finished = False
        try:
            for item in response:
                if isinstance(item, Started):
                    self.running[job] = item
                elif isinstance(item, Progress):
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
    return {"working_dir": str(ROOT), "excludes": ["models/", "outputs/", ".git/"], "env_vars": offline}


def deploy(*, models_dir: str, device: str | None = None, dtype: str = "auto", default_model: str | None = None,
           min_workers: int = 1, max_workers: int | None = None, num_cpus: float | None = None,
           threads: int | None = None, name: str = APP_NAME):
    """Deploy `TesseraWorker` (GPU replicas when the cluster has GPUs, else CPU ones); returns its handle."""
    import ray
    from ray import serve

    max_workers = max(min_workers, max_workers or min_workers)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    options: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1 if num_cpus is None else num_cpus}
    device = device or ("cuda" if gpus else "cpu")
    scaling: dict[str, Any] = {"num_replicas": min_workers} if max_workers == min_workers else {
        "autoscaling_config": {"min_replicas": min_workers, "max_replicas": max_workers,
                               "initial_replicas": min_workers, "target_ongoing_requests": 1}}
    # Any: with **scaling, mypy picks the decorator overload of serve.deployment (this call returns a Deployment)
    worker: Any = serve.deployment(TesseraWorker, name="TesseraWorker", ray_actor_options=options,
                                   max_ongoing_requests=1, **scaling)
    serve.start(proxy_location="Disabled")
    app = worker.bind(str(Path(models_dir).resolve()), device, dtype, default_model, threads)
    return serve.run(app, name=name, route_prefix=None)


def connect(args: Any) -> ClusterBackend:
    """`python app.py --ray [ADDRESS]`: start or join Ray, deploy the workers, return the ingress's backend."""
    try:
        import ray
    except ImportError:
        raise ValidationError("ray", args.ray, 'needs Ray Serve: pip install "ray[serve]==2.60"') from None
    from pipelines.engine import Engine
    from pipelines.models.manager import ModelManager

    address = None if args.ray == "local" else args.ray
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(address), include_dashboard=False)
    device = None if args.device == "auto" else args.device
    handle = deploy(models_dir=args.models_dir, device=device, dtype=args.dtype, default_model=args.model,
                    min_workers=args.min_workers, max_workers=args.max_workers)
    local = Engine(ModelManager(args.models_dir, device="cpu", dtype="fp32"), args.outputs_dir)  # names only, no weights
    if args.model:
        local.default_model = args.model
    engine = ClusterEngine(handle, local, max_workers=max(args.min_workers, args.max_workers or args.min_workers))
    return ClusterBackend(engine)
