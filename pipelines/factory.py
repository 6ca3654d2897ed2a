"""The one place that builds a ModelManager + Engine from the server options, for app.py and cli.py alike.

    python app.py ...           build_engine(args, pool=True)       a WorkerPool, one worker per --devices entry
    python app.py generate ...  build_engine(args, allow_paths=True) an Engine (a WorkerPool for several devices)

Nothing loads here: the manager loads weights on the first job that needs them (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.engine import Engine
from pipelines.models.manager import ModelManager
from pipelines.request.limits import Limits
from pipelines.serving.workers import WorkerPool, parse_devices, pool_of


@dataclass(frozen=True)
class EngineOptions:
    """The server options an engine is built from (app.py's and cli.py's machine options, same names and defaults)."""

    models_dir: str | Path = "models"
    """Folder of local models, LoRAs, upscalers, embeddings (--models-dir)."""
    outputs_dir: str | Path | None = "outputs"
    """Where images are saved; None saves nothing (--out)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:1 | mps (--device)."""
    devices: str | None = None
    """One worker per device (--devices, `pipelines.serving.workers.parse_devices`); None = `device` alone."""
    dtype: str = "auto"
    attention: str = "sdpa"
    compile_unet: bool = False
    offload: bool = False
    split: str = "auto"
    """One tiled image across the devices: auto | on | off (--split-image)."""
    allow_paths: bool = False
    """Whether requests may name model files by path (the CLI only)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, allow_paths: bool = False) -> EngineOptions:
        """The options from parsed app.py or cli.py arguments."""
        return cls(models_dir=args.models_dir, outputs_dir=args.out, device=args.device,
                   devices=getattr(args, "devices", None), dtype=args.dtype, attention=args.attention,
                   compile_unet=args.compile, offload=args.offload, split=getattr(args, "split_image", "auto"),
                   allow_paths=allow_paths)


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
