"""The one place that builds a ModelManager + Engine from the server options, for app.py and cli.py alike.

    python app.py ...           build_engine(args, pool=True)       a WorkerPool, one worker per --devices entry
    python app.py generate ...  build_engine(args, allow_paths=True) an Engine (a WorkerPool for several devices)

Nothing loads here: the manager loads weights on the first job that needs them (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.engine import Engine
from pipelines.models.manager import ModelManager
from pipelines.options import EngineOptions
from pipelines.request.limits import Limits
from pipelines.serving.workers import WorkerPool, parse_devices, pool_of


def build_manager(options: EngineOptions, device: str) -> ModelManager:
    """A model manager for one device (loads nothing)."""
    return ModelManager(options.models_dir, device=device, dtype=options.dtype, attention=options.attention,
                        compile_unet=options.compile_unet, offload=options.offload)


def engine_for(options: EngineOptions, device: str, *, limits: Limits | None = None) -> Engine:
    """One Engine on its own model manager for `device`."""
    return Engine(build_manager(options, device), options.outputs_dir, limits=limits,
                  allow_paths=options.allow_paths)


def build_pool(devices: list[str], models_dir: Path | str = "models", outputs_dir: Path | str | None = "outputs",
               *, dtype: str = "auto", attention: str = "sdpa", compile_unet: bool = False, offload: bool = False,
               limits: Limits | None = None, split: str = "auto", allow_paths: bool = False) -> WorkerPool:
    """One ModelManager + Engine per device (nothing is loaded until a job needs it), served as a `WorkerPool`."""
    options = EngineOptions(models_dir=models_dir, outputs_dir=outputs_dir, dtype=dtype, attention=attention,
                            compile_unet=compile_unet, offload=offload, allow_paths=allow_paths)
    return pool_of([engine_for(options, device, limits=limits) for device in devices], devices, split=split)


def build_engine(args: argparse.Namespace | EngineOptions, *, allow_paths: bool = False, pool: bool = False) -> Any:
    """The engine the options ask for: one Engine, or a `WorkerPool` of one Engine per device when there are
    several devices or `pool` is set (the UI always serves through a pool)."""
    options = args if isinstance(args, EngineOptions) else EngineOptions.from_args(args, allow_paths=allow_paths)
    devices = parse_devices(options.devices, options.device)
    if len(devices) > 1:
        return build_pool(devices, options.models_dir, options.outputs_dir, dtype=options.dtype,
                          attention=options.attention, compile_unet=options.compile_unet, offload=options.offload,
                          split=options.split, allow_paths=options.allow_paths)
    engine = engine_for(options, devices[0])
    return pool_of([engine], devices[:1]) if pool else engine


def build_cluster(args: argparse.Namespace) -> Any:
    """`python app.py --ray [ADDRESS]`: start or join Ray, deploy `TesseraWorker` replicas built by `engine_for` from
    the same options as the embedded engine, and return the ingress's backend (`pipelines.serving.cluster`)."""
    import importlib.util

    from pipelines.errors import ValidationError

    if importlib.util.find_spec("ray") is None:  # not imported here: `init_ray` sets Ray's env first
        raise ValidationError("ray", args.ray, 'needs Ray Serve: pip install "ray[serve]==2.60"')
    import torch

    from pipelines.serving.cluster import ClusterBackend, ClusterEngine, deploy, init_ray

    init_ray(None if args.ray == "local" else args.ray)
    options = EngineOptions.from_args(args)
    handle = deploy(engine_for, options, default_model=args.model, min_workers=args.min_workers,
                    max_workers=args.max_workers, threads=torch.get_num_threads())
    # the ingress's own engine checks, plans and counts tokens: names only, no weights
    local = engine_for(EngineOptions(models_dir=options.models_dir, outputs_dir=options.outputs_dir, device="cpu",
                                     dtype="fp32"), "cpu")
    if args.model:
        local.default_model = args.model
    engine = ClusterEngine(handle, local, max_workers=max(args.min_workers, args.max_workers or args.min_workers))
    return ClusterBackend(engine)
