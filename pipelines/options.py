"""The machine options an engine is built from (`EngineOptions`), declared once: the fields are also app.py's and
cli.py's command-line options (`add_machine_options`), and the factory (`pipelines.factory`), the worker pool and
the Ray replicas all read them. Pure data: imports nothing of the project.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEVICES_HELP = ("devices to serve on, one worker each: all (every CUDA GPU) | cuda:0,cuda:1,... | cpu,cpu "
                "(default: --device, i.e. the first GPU)")
SPLIT_MODES = ("auto", "on", "off")
SPLIT_HELP = ("one tiled image across --devices: auto = when a step has at least as many tile batches as devices, "
              "on = always, off = never (each job on one device)")


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
    dtype: str = _option("auto", "--dtype", "auto | fp16 | bf16 | fp32 (auto: fp16 on a GPU; on a CPU bf16 where it runs natively, AVX512-BF16 or AMX, else fp32)")
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
