"""The one place that builds a ModelManager + Engine from the server options, for app.py and cli.py alike.

    python app.py ...           build_engine(args, pool=True)       a WorkerPool, one worker per --devices entry
    python app.py generate ...  build_engine(args, allow_paths=True) an Engine (a WorkerPool for several devices)

Nothing loads here: the manager loads weights on the first job that needs them (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.engine import Engine
from pipelines.models.manager import ModelManager
from pipelines.request.limits import Limits
from pipelines.serving.workers import DEVICES_HELP, SPLIT_HELP, SPLIT_MODES, WorkerPool, parse_devices, pool_of


def _option(default: Any, flag: str, help: str, **argparse: Any) -> Any:
    """An `EngineOptions` field that is also a command-line option of app.py and cli.py (`add_machine_options`)."""
    return field(default=default, metadata={"flag": flag, "help": help, "argparse": argparse})


@dataclass(frozen=True)
class EngineOptions:
    """The machine options an engine is built from: declared once here, as app.py's and cli.py's options too."""

    models_dir: str | Path = _option("models", "--models-dir", "folder of local models, LoRAs, upscalers, embeddings")
    outputs_dir: str | Path | None = _option("outputs", "--out", "output folder; images go to OUT/<date>/")
    device: str = _option("auto", "--device", "auto | cpu | cuda | cuda:1 | mps")
    devices: str | None = _option(None, "--devices", DEVICES_HELP)
    """One worker per device (`pipelines.serving.workers.parse_devices`); None = `device` alone."""
    dtype: str = _option("auto", "--dtype", "auto | fp16 | bf16 | fp32 (auto: fp16 on GPU, fp32 on CPU)")
    attention: str = _option("sdpa", "--attention", "attention kernels", choices=["sdpa", "xformers"])
    compile_unet: bool = _option(False, "--compile", "torch.compile the UNet (slow first run, faster after)",
                                 action="store_true")
    offload: bool = _option(False, "--offload", "keep weights on CPU, move each model to the GPU when used",
                            action="store_true")
    split: str = _option("auto", "--split-image", SPLIT_HELP, choices=list(SPLIT_MODES))
    allow_paths: bool = False
    """Whether requests may name model files by path (the CLI only; not an option)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, allow_paths: bool = False) -> EngineOptions:
        """The options from parsed app.py or cli.py arguments (`add_machine_options`)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if "flag" in f.metadata},
                   allow_paths=allow_paths)


def add_machine_options(group: Any) -> None:
    """The machine options (`EngineOptions`) as options of an argparse parser or group, with their defaults."""
    for f in fields(EngineOptions):
        if "flag" not in f.metadata:
            continue
        meta, extra = f.metadata, dict(f.metadata["argparse"])
        default = "" if f.default in (None, False) else f" (default: {f.default})"
        group.add_argument(meta["flag"], dest=f.name, default=f.default, help=meta["help"] + default, **extra)


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
