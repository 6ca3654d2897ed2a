"""ControlNet models: listing, resolving and loading.

A spec (`load_controlnet`) is one of: a catalogue key or its hub id (`CONTROLNET_CATALOGUE`), a diffusers
folder, or a single ``.safetensors`` file inside ``models_dir/"controlnet"`` (by name or by a path that
resolves inside it).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.errors import ModelError, OfflineError, ValidationError
from pipelines.lru import LRUCache

log = logging.getLogger(__name__)

CONTROLNET_CATALOGUE: dict[str, str] = {
    "canny-sd15": "lllyasviel/control_v11p_sd15_canny",
    "depth-sd15": "lllyasviel/control_v11f1p_sd15_depth",
    "openpose-sd15": "lllyasviel/control_v11p_sd15_openpose",
    "lineart-sd15": "lllyasviel/control_v11p_sd15_lineart",
    "softedge-sd15": "lllyasviel/control_v11p_sd15_softedge",
    "scribble-sd15": "lllyasviel/control_v11p_sd15_scribble",
    "normal-sd15": "lllyasviel/control_v11p_sd15_normalbae",
    "mlsd-sd15": "lllyasviel/control_v11p_sd15_mlsd",
    "tile-sd15": "lllyasviel/control_v11f1e_sd15_tile",
    "canny-sdxl": "diffusers/controlnet-canny-sdxl-1.0",
    "depth-sdxl": "diffusers/controlnet-depth-sdxl-1.0",
}
"""Short name -> Hugging Face hub id: the only hub ControlNets a user may ask for."""


def _controlnet_root(models_dir: Path) -> Path:
    """The folder holding local ControlNets."""
    return Path(models_dir) / "controlnet"


def _is_local_model(path: Path) -> bool:
    """A diffusers folder (config.json) or a .safetensors file."""
    if path.is_dir():
        return (path / "config.json").is_file()
    return path.is_file() and path.suffix.lower() == ".safetensors"


def list_controlnets(models_dir: Path) -> list[str]:
    """Catalogue keys, then local ControlNets (folder or file names) in `models_dir/controlnet`."""
    root = _controlnet_root(models_dir)
    local = sorted((p.name for p in root.iterdir() if _is_local_model(p)), key=str.lower) if root.is_dir() else []
    return [*CONTROLNET_CATALOGUE, *local]


def _within(path: Path, root: Path) -> bool:
    """True if `path` lies inside `root` after normalising `..` (lexically; admin symlinks are trusted)."""
    path, root = Path(os.path.normpath(os.path.abspath(path))), Path(os.path.normpath(os.path.abspath(root)))
    return path == root or root in path.parents


def resolve_controlnet(spec: str, models_dir: Path, *, allow_paths: bool = False) -> str | Path:
    """A hub id (from the catalogue) or a local Path for `spec`; paths must stay inside models/controlnet.

    `allow_paths=True` is for trusted callers (the CLI) that may name any local folder or file.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError("controlnet", spec, "must be a ControlNet name")
    if spec in CONTROLNET_CATALOGUE:
        return CONTROLNET_CATALOGUE[spec]
    if spec in CONTROLNET_CATALOGUE.values():
        return spec
    root = _controlnet_root(models_dir)
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    if not allow_paths and not _within(path, root):
        raise ValidationError("controlnet", spec, f"must be a name in {root}, not a path outside it")
    if allow_paths and not Path(spec).is_absolute() and not path.exists():
        path = Path(spec)
    if not _is_local_model(path):
        choices = ", ".join(list_controlnets(models_dir))
        raise ValidationError(
            "controlnet", spec,
            f"must be one of {choices}, or a diffusers folder / .safetensors file in {root}",
        )
    return path


def _single_file_config(path: Path) -> Path | None:
    """A config for a single-file ControlNet: `<name>.json`, `config.json`, or a sibling folder `<name>/`."""
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            return candidate
    sibling = path.with_suffix("")
    if (sibling / "config.json").is_file():
        return sibling / "config.json"
    return None


def _load_single_file(path: Path, dtype: torch.dtype):
    """ControlNetModel.from_single_file with a local config (copied into a temp folder diffusers can read)."""
    from diffusers import ControlNetModel

    config = _single_file_config(path)
    if config is None:
        raise ModelError(
            f"{path.name} is a single-file ControlNet without a config; put its config.json next to it as "
            f"{path.with_suffix('.json').name} (or a folder {path.stem}/ with config.json), e.g. from the "
            "matching lllyasviel/control_v11* or diffusers/controlnet-* repo; it cannot be fetched offline"
        )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(config, Path(tmp) / "config.json")
        try:
            return ControlNetModel.from_single_file(str(path), config=tmp, dtype=dtype,
                                                    local_files_only=True)
        except Exception as err:  # diffusers raises many types for bad weights or configs
            raise ModelError(f"{path.name} could not be loaded as a ControlNet with {config.name} ({err})") from err


def _load_hub(repo: str, dtype: torch.dtype):
    """ControlNetModel.from_pretrained from the hub (or its local cache); network errors -> OfflineError."""
    from diffusers import ControlNetModel
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return ControlNetModel.from_pretrained(repo, dtype=dtype)
    except (OSError, HfHubHTTPError, ConnectionError) as err:
        raise OfflineError(
            f"could not download {repo} (offline?): {str(err).rstrip('.')}. Connect once to cache it, or save it as a "
            "diffusers folder in models/controlnet/"
        ) from err


def load_controlnet(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    models_dir: Path, allow_paths: bool = False, cache: LRUCache | None = None):
    """Load a ControlNet (catalogue name, hub id, local folder or .safetensors).

    `cache` (a manager's `caches.controlnets`) keeps it by resolved spec, mtime, device and dtype; without one it
    is loaded afresh and nothing keeps it.
    """
    resolved = resolve_controlnet(spec, models_dir, allow_paths=allow_paths)
    stamp = resolved.stat().st_mtime_ns if isinstance(resolved, Path) else 0
    key = (str(resolved), stamp, str(device), dtype)
    from pipelines.models.manager import LOAD_LOCK

    with LOAD_LOCK:  # workers on several devices load at once; from_pretrained is not thread-safe
        if cache is None:
            return _load_controlnet(resolved, spec, device, dtype)
        return cache.get(key, lambda: _load_controlnet(resolved, spec, device, dtype))


def _load_controlnet(resolved: str | Path, spec: str, device: torch.device | str, dtype: torch.dtype):
    if isinstance(resolved, str):
        model = _load_hub(resolved, dtype)
    elif resolved.is_dir():
        from diffusers import ControlNetModel

        try:
            model = ControlNetModel.from_pretrained(resolved, dtype=dtype)
        except Exception as err:  # diffusers raises many types for broken folders
            raise ModelError(f"{resolved.name} is not a loadable diffusers ControlNet folder ({err})") from err
    else:
        model = _load_single_file(resolved, dtype)
    model = model.to(device).eval()
    log.info("loaded ControlNet %s", spec)
    return model

