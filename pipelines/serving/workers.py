"""A worker per device on one machine: `--devices` -> one Engine per device behind a dispatcher.

Each worker owns its weights (its own ModelManager on its device) and its lock; the dispatcher gives each job to
the next idle worker, so N devices serve N jobs at once. The pool looks like one Engine to `pipelines.serving.service`
(check, plan, generate, upscale, manager, default_model), so the UI, the API and the CLI need no other code.
Progress, previews, Stop and cancel stay per job: they travel with the job's callback and cancel token.
The worker that ran a job is in `result.stats["worker"]`, never in the PNG metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipelines.errors import CancelledError, ValidationError
from pipelines.lru import LRUCache
from pipelines.options import SPLIT_MODES
from pipelines.serving.facade import EngineFacade

log = logging.getLogger(__name__)



def parse_devices(text: str | None, default: str = "auto", *, cuda_count: int | None = None) -> list[str]:
    """`--devices` -> one device string per worker: None = [default]; "all" = every CUDA GPU (or one CPU)."""
    if text is None or not str(text).strip():
        return [default]
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    text = str(text).strip().lower()
    if text == "all":
        if cuda_count == 0:
            log.warning("--devices all: no CUDA GPU found; serving on one CPU worker")
            return ["cpu"]
        return [f"cuda:{i}" for i in range(cuda_count)]
    devices = [d.strip() for d in text.split(",")]
    for d in devices:
        kind, _, index = d.partition(":")
        ok = kind in ("cpu", "mps") and not index or kind == "cuda" and (not index or index.isdigit())
        if not ok:
            raise ValidationError("devices", text, "must be all, or a comma list such as cuda:0,cuda:1 or cpu,cpu")
        if kind == "cuda" and int(index or 0) >= cuda_count:
            raise ValidationError("devices", text, f"names {d}, but this machine has {cuda_count} CUDA GPU(s)")
    return devices


class SharedPromptCache(LRUCache):
    """The prompt cache shared by workers on devices of one type (text embeddings are small; keys name the model
    and its LoRAs). Dict updates are locked; encoding runs outside the lock (two workers may both encode once)."""

    def __init__(self, size: int = 64):
        super().__init__(size)  # the same size as `pipelines.denoise.stages.PromptCache`
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
        value = make()
        with self._lock:
            self.misses += 1
            self._data[key] = value
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value


@dataclass
class Worker:
    """One device's engine; `busy` while it runs a job."""

    name: str
    engine: Any
    busy: bool = False
    jobs: int = 0
    controlnets: Any = None
    """Its device's ControlNet copies for split jobs (`pipelines.serving.multi_device.ControlCopies`), made by the
    first split job that needs them and kept for the next."""


class WorkerPool(EngineFacade):
    """Engines behind a dispatcher: each job goes to the next idle worker (first come, first served).

    Read-only services (check, plan, token counts, model lists) use the first worker's engine, which loads no
    weights for them. `manager` is the manager of the worker running in the calling thread (the job's previews are
    decoded on its own device), else the first worker's.
    """

    def __init__(self, engines: list[Any], names: list[str] | None = None, *, split: str = "auto"):
        if not engines:
            raise ValueError("a worker pool needs at least one engine")
        if split not in SPLIT_MODES:
            raise ValidationError("split_image", split, f"must be one of {', '.join(SPLIT_MODES)}")
        names = names or [f"worker{i}" for i in range(len(engines))]
        self.workers = [Worker(n, e) for n, e in zip(names, engines, strict=True)]
        self.split = split
        self._idle = threading.Condition()
        self._local = threading.local()
        self._gathering = 0  # split jobs waiting for every worker: single jobs let them go first

    def __len__(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------ the Engine face (`EngineFacade`)
    @property
    def first(self) -> Any:
        return self.workers[0].engine

    def _local_engine(self) -> Any:
        return self.first

    def _engines(self) -> list[Any]:
        return [w.engine for w in self.workers]

    @property
    def manager(self):
        worker = getattr(self._local, "worker", None)
        return (worker or self.workers[0]).engine.manager

    def generate(self, req, *, callback=None, cancel=None, **kw):
        """Run `req` on the next idle worker (waiting for one, cancellable); stats["worker"] names it. A large
        tiled image goes to every worker at once, its tile batches spread over their devices (`split`)."""
        if self._splits(req):
            return self._generate_split(req, callback, cancel, **kw)
        with self._worker(cancel) as worker:
            result = worker.engine.generate(req, callback=callback, cancel=cancel, **kw)
        result.stats["worker"] = worker.name
        return result

    def upscale(self, image, *, callback=None, cancel=None, **kw):
        with self._worker(cancel) as worker:
            result = worker.engine.upscale(image, callback=callback, cancel=cancel, **kw)
        result.stats["worker"] = worker.name
        return result

    # ------------------------------------------------------------ one image across the workers
    def _splits(self, req) -> bool:
        """Whether `req` runs across every worker: split on, or auto with at least as many tile batches per step
        (the final stage's plan, with the first worker's model when it has it loaded) as workers."""
        if len(self.workers) < 2 or self.split == "off":
            return False
        if self.split == "on":
            return True
        from pipelines.request.validation import hires_target

        req = self.first.check(req)
        current = self.first.manager.current
        model = current if current is not None and current.name == req.model else None
        size = hires_target(req.width, req.height, req.hires.scale) if req.hires.enabled else (req.width, req.height)
        plan = self.first.plan(req, model, width=size[0], height=size[1])
        return plan.tiled and plan.unet_evals_per_step >= len(self.workers)

    def _generate_split(self, req, callback, cancel, **kw):
        from pipelines.serving.multi_device import ControlCopies, TileReplicas

        with self._every_worker(cancel) as workers:
            main = workers[0].engine
            models = [w.engine.manager.get(req.model, loras=req.loras, allow_paths=main.allow_paths) for w in workers]
            for w, m in zip(workers, models, strict=True):
                if w.controlnets is None or w.controlnets.device != m.device:
                    w.controlnets = ControlCopies(m.device)
            replicas = TileReplicas([(m.unet, m.device) for m in models], force=self.split == "on",
                                    vaes=[m.vae for m in models], controlnets=[w.controlnets for w in workers])
            result = main.generate(req, callback=callback, cancel=cancel, executor=replicas, **kw)
        assert replicas.vae_replicas is not None  # vaes=[...] above holds one VAE per worker (at least one)
        calls, tiles = "+".join(map(str, replicas.calls)), replicas.vae_replicas.calls
        result.stats.update(worker="+".join(w.name for w in workers), unet_calls_per_worker=list(replicas.calls),
                            vae_tiles_per_worker=list(tiles))
        vae = f", VAE tiles {'+'.join(map(str, tiles))}" if any(tiles[1:]) else ""
        note = f"split over {len(workers)} devices: UNet calls {calls}{vae}"
        result.stats["plan"] = f"{result.stats.get('plan', '')}; {note}"
        return result

    @contextmanager
    def _every_worker(self, cancel) -> Iterator[list[Worker]]:
        with self._idle:
            self._gathering += 1
            try:
                while any(w.busy for w in self.workers):
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("generation stopped while waiting for the devices")
                    self._idle.wait(timeout=0.1)
                for w in self.workers:
                    w.busy, w.jobs = True, w.jobs + 1
            finally:
                self._gathering -= 1
        self._local.worker = self.workers[0]
        try:
            yield self.workers
        finally:
            self._local.worker = None
            with self._idle:
                for w in self.workers:
                    w.busy = False
                self._idle.notify_all()

    # ------------------------------------------------------------ dispatching
    @contextmanager
    def _worker(self, cancel) -> Iterator[Worker]:
        worker = self._acquire(cancel)
        self._local.worker = worker
        try:
            yield worker
        finally:
            self._local.worker = None
            with self._idle:
                worker.busy = False
                self._idle.notify_all()

    def _acquire(self, cancel) -> Worker:
        """The first idle worker, marked busy; waits (checking the cancel token) while all are busy."""
        with self._idle:
            while True:
                for w in self.workers:
                    if not w.busy and not self._gathering:
                        w.busy, w.jobs = True, w.jobs + 1
                        return w
                if cancel is not None and cancel.is_set():
                    raise CancelledError("generation stopped while waiting for a free device")
                self._idle.wait(timeout=0.1)


def pool_of(engines: list, devices: list[str], *, split: str = "auto") -> WorkerPool:
    """A pool of one worker per engine (built by `pipelines.factory`); workers on devices of one type share the
    prompt cache."""
    if len(engines) > 1 and len({d.split(":")[0] for d in devices}) == 1:
        shared = SharedPromptCache()
        for e in engines:
            e.prompt_cache = shared
    names = [f"{i}:{d}" for i, d in enumerate(devices)]
    log.info("serving on %d worker(s): %s", len(engines), ", ".join(names))
    return WorkerPool(engines, names, split=split)
