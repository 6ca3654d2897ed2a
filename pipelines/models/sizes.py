"""A model's weight bytes before it is loaded, so the plan shown first is the plan that will run.

Catalogue models have known parameter counts (UNet + VAE + text encoders, from their model cards and configs);
the built-in tiny models, local diffusers folders and single `.safetensors` checkpoints are counted from the
tensor shapes in their safetensors headers (read from disk, nothing loaded). The planner multiplies parameters by
the bytes per value of the dtype the model will be loaded in.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# hub id -> (UNet, VAE, text encoders) parameters. fp16: SD 1.5 = 2.13 GB, SD 2.1 = 2.61 GB, SDXL = 6.94 GB.
CATALOGUE_PARAMS: dict[str, tuple[float, float, float]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (859.5e6, 83.65e6, 123.1e6),
    "Lykon/dreamshaper-8": (859.5e6, 83.65e6, 123.1e6),
    "SimianLuo/LCM_Dreamshaper_v7": (859.5e6, 83.65e6, 123.1e6),
    "stabilityai/stable-diffusion-2-1": (865.9e6, 83.65e6, 340.4e6),
    "stabilityai/stable-diffusion-xl-base-1.0": (2567.5e6, 83.65e6, 817.1e6),
}
# the components a generation holds in memory (diffusers folder layout); the safety checker is never loaded
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one


def safetensors_params(path: Path) -> int:
    """The number of values in a .safetensors file, from its JSON header (8-byte length, then the header)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > _MAX_HEADER:
            raise ValueError(f"{path.name}: header of {size} bytes is not a safetensors header")
        header = json.loads(f.read(size))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def _component_files(folder: Path) -> list[Path]:
    """One copy of a component's weights: the plain files (all shards) if there are any, else a variant."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]
    return plain or files[:1]


def folder_params(folder: Path) -> int | None:
    """Parameters of a diffusers folder's UNet, VAE and text encoders; None where a component has no
    .safetensors weights (e.g. only .bin files), since a guess would mislead the planner."""
    total = 0
    for name in COMPONENTS:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = _component_files(sub)
        if not files:
            return None
        total += sum(safetensors_params(f) for f in files)
    return total or None


def activation_scale(folder: Path) -> float:
    """The UNet's width relative to the real architecture (320 channels), from its config (1 when unknown)."""
    try:
        config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        return float(config["block_out_channels"][0]) / 320
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 1.0


def known_sizes(source: Any, dtype_bytes: int) -> dict[str, Any]:
    """{"weights": bytes, "activation_scale": x} for a resolved `pipelines.models.manager.Source`, without loading it;
    {} when the size cannot be known (the planner then uses its per-family constants)."""
    try:
        if source.kind == "hub":
            counts = CATALOGUE_PARAMS.get(source.ref)
            return {} if counts is None else {"weights": int(sum(counts) * dtype_bytes)}
        if source.kind == "tiny":
            from pipelines.models.tiny import ensure_tiny

            folder = ensure_tiny(source.ref)  # built on disk once (a few MB), never moved to the device here
        elif source.kind == "folder":
            folder = Path(source.ref)
        elif source.kind == "file":
            return {"weights": safetensors_params(Path(source.ref)) * dtype_bytes}
        else:
            return {}
        params = folder_params(folder)
        if params is None:
            return {}
        return {"weights": params * dtype_bytes, "activation_scale": activation_scale(folder)}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # an unreadable file: plan with the constants
        log.info("weight size of %s unknown (%s)", source.ref, exc)
        return {}
