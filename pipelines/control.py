"""ControlNet: control-image loading and preprocessing, and ControlNet model loading.

Preprocessors turn a user's image into a control map. "canny" (OpenCV) and "none" (the image already is
a control map) need nothing else; the others use controlnet-aux, imported only when chosen, with weights
read only from a local folder (``models/annotators`` by default, laid out like lllyasviel/Annotators).

ControlNet specs (`load_controlnet`) are one of: a catalogue key or its hub id (`CONTROLNET_CATALOGUE`),
a diffusers folder, or a single ``.safetensors`` file inside ``models_dir/"controlnet"`` (by name or by
a path that resolves inside it).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines.errors import ModelError, OfflineError, ValidationError
from pipelines.lru import LRUCache
from pipelines.optional import MissingDependencyError, require

log = logging.getLogger(__name__)

MAX_CONTROL_PIXELS = 64 * 1024 * 1024
"""Largest control image accepted (64 MP), checked from the header before any pixel is decoded."""
CONTROL_FORMATS = ("PNG", "JPEG", "WEBP")
ASPECT_TOLERANCE = 0.01

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


@dataclass(frozen=True)
class Annotator:
    """A controlnet-aux preprocessor: which detector class, its weight files and call options."""

    cls: str
    """Class name in `controlnet_aux`."""
    files: tuple[str, ...]
    """Weight files (lllyasviel/Annotators names) that must be in the annotators folder."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra keyword arguments for the detector call."""


ANNOTATORS: dict[str, Annotator] = {
    "depth": Annotator("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "openpose": Annotator("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
    "lineart": Annotator("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "lineart-anime": Annotator("LineartAnimeDetector", ("netG.pth",)),
    "softedge": Annotator("HEDdetector", ("ControlNetHED.pth",)),
    "softedge-pidinet": Annotator("PidiNetDetector", ("table5_pidinet.pth",)),
    "scribble": Annotator("HEDdetector", ("ControlNetHED.pth",), (("scribble", True),)),
    "normal": Annotator("NormalBaeDetector", ("scannet.pt",)),
    "mlsd": Annotator("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
}
PREPROCESSORS: tuple[str, ...] = ("none", "canny", *ANNOTATORS)

_CACHE_SIZE = 2
_controlnets = LRUCache(_CACHE_SIZE)
_annotators: dict[tuple, Any] = {}


# ----- control images -------------------------------------------------------------------------------


def _image_error(name: str, reason: str) -> ValidationError:
    """The one error for an unusable control image."""
    limit = MAX_CONTROL_PIXELS // (1024 * 1024)
    return ValidationError("control image", name, f"must be a PNG/JPEG/WebP image of at most {limit} MP ({reason})")


def _check_pixels(image: Image.Image, name: str) -> None:
    """Reject images over MAX_CONTROL_PIXELS or with an empty side."""
    w, h = image.size
    if w < 1 or h < 1:
        raise _image_error(name, f"it is {w}x{h}")
    if w * h > MAX_CONTROL_PIXELS:
        raise _image_error(name, f"it is {w}x{h} = {w * h / 1e6:.0f} MP")


def _open_image(source: str | Path | bytes, name: str) -> Image.Image:
    """Open, check and fully decode an image file or bytes, with our own pixel limit (not PIL's global)."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                if image.format not in CONTROL_FORMATS:
                    raise _image_error(name, f"it is {image.format or 'an unknown format'}")
                _check_pixels(image, name)  # header only: nothing decoded yet
                image.load()
                return ImageOps.exif_transpose(image).convert("RGB")
    except ValidationError:
        raise
    except Image.DecompressionBombError as err:
        raise _image_error(name, "it is far too large") from err
    except FileNotFoundError as err:
        raise _image_error(name, "the file does not exist") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, zlib.error... for bad data
        raise _image_error(name, "it is not an image, or it is truncated") from err


def load_control_image(path_or_image: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from an upload (path, bytes, PIL image or HxWxC uint8 array), validated."""
    if isinstance(path_or_image, Image.Image):
        _check_pixels(path_or_image, "<image>")
        return path_or_image.convert("RGB")
    if isinstance(path_or_image, np.ndarray):
        if path_or_image.ndim not in (2, 3) or path_or_image.dtype != np.uint8:
            raise _image_error("<array>", f"got a {path_or_image.dtype} array of shape {path_or_image.shape}")
        h, w = path_or_image.shape[:2]
        if w * h > MAX_CONTROL_PIXELS:
            raise _image_error("<array>", f"it is {w}x{h}")
        return Image.fromarray(path_or_image).convert("RGB")
    if isinstance(path_or_image, bytes):
        return _open_image(path_or_image, "<upload>")
    if isinstance(path_or_image, str | Path):
        return _open_image(Path(path_or_image), Path(path_or_image).name)
    raise _image_error(type(path_or_image).__name__, "unsupported input type")


def crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The source box to resize to width x height: whole image if aspects agree within 1%, else centre crop."""
    src_aspect, aspect = src_w / src_h, width / height
    if abs(src_aspect / aspect - 1) <= ASPECT_TOLERANCE:
        return 0.0, 0.0, float(src_w), float(src_h)
    if src_aspect > aspect:  # source is wider: keep full height, crop the sides
        crop_w = src_h * aspect
        left = (src_w - crop_w) / 2
        return left, 0.0, left + crop_w, float(src_h)
    crop_h = src_w / aspect
    top = (src_h - crop_h) / 2
    return 0.0, top, float(src_w), top + crop_h


def prepare_control_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Control image -> [1, 3, height, width] float tensor in [0, 1].

    Resize rule: if the image's aspect ratio matches width/height within 1% it is resized directly
    (a tiny stretch); otherwise it is "crop and resize" (A1111's default): scaled to cover the target,
    then centre-cropped, so nothing is distorted and the edges of the longer side are lost. Resampling
    is Lanczos, done in one step from the crop box of the original.
    """
    for field, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 1:
            raise ValidationError(field, value, "must be a positive integer")
    image = image.convert("RGB")
    box = crop_box(image.width, image.height, width, height)
    resized = image.resize((width, height), Image.Resampling.LANCZOS, box=box)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


# ----- preprocessors --------------------------------------------------------------------------------


def _threshold(field: str, value: object) -> int:
    """A canny threshold as an int in [0, 1000]; whole floats (from UI sliders) are accepted."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= 1000:
        raise ValidationError(field, value, "must be an integer threshold between 0 and 1000")
    return int(value)


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV) of the greyscale image: white edges on black, 3-channel RGB."""
    import cv2

    low, high = _threshold("canny_low", low), _threshold("canny_high", high)
    if low > high:
        raise ValidationError("canny_low", low, f"must not exceed canny_high ({high})")
    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1), "RGB")


def _missing_message(kind: str, package: bool, files: list[str], folder: Path) -> str:
    """Say what `kind` lacks (the controlnet-aux package and/or weight files) and where to put it."""
    needs = []
    if package:
        needs.append("the controlnet-aux package (pip install controlnet-aux)")
    if files:
        needs.append(", ".join(str(folder / f) for f in files) + " (from lllyasviel/Annotators)")
    fix = "install it / put the files there" if package else "put the files there"
    return f"{kind} needs {' and '.join(needs)}; {fix}, or pick canny or none"


def _load_annotator(kind: str, annotators_dir: Path, device: torch.device | str):
    """The controlnet-aux detector for `kind`, loaded from local weights once and cached."""
    spec = ANNOTATORS[kind]
    folder = Path(annotators_dir)
    key = (spec.cls, str(folder.resolve()), str(device))
    if key in _annotators:
        return _annotators[key]
    missing = [f for f in spec.files if not (folder / f).is_file()]
    try:
        controlnet_aux = require("controlnet_aux", kind)
    except MissingDependencyError as err:
        if isinstance(err.__cause__, ImportError):
            raise ModelError(_missing_message(kind, True, missing, folder)) from err
        raise ModelError(f"{kind}: {err}") from err  # installed but broken (e.g. an incompatible dependency)
    if missing:
        raise ModelError(_missing_message(kind, False, missing, folder))
    detector_cls = getattr(controlnet_aux, spec.cls, None)
    if detector_cls is None:
        raise ModelError(f"{kind} needs controlnet_aux.{spec.cls}, which this controlnet-aux version lacks")
    try:
        detector = detector_cls.from_pretrained(str(folder))
    except Exception as err:  # annotator code raises anything from a bad file
        raise ModelError(f"{kind}: could not load {spec.files} from {folder} ({err})") from err
    if hasattr(detector, "to"):
        detector = detector.to(device)
    _annotators[key] = detector
    return detector


def preprocess(kind: str, image: Image.Image, *, low: int = 100, high: int = 200,
               annotators_dir: Path = Path("models/annotators"),
               device: torch.device | str = "cpu", resolution: int = 512) -> Image.Image:
    """Turn `image` into a control map with preprocessor `kind` (one of PREPROCESSORS); RGB, same size out.

    `low`/`high` are the canny thresholds; `resolution` is the short side annotators detect at.
    """
    if kind not in PREPROCESSORS:
        raise ValidationError("control preprocessor", kind, f"must be one of {', '.join(PREPROCESSORS)}")
    if kind == "none":
        return image.convert("RGB")
    if kind == "canny":
        return canny(image, low, high)
    detector = _load_annotator(kind, annotators_dir, device)
    image = image.convert("RGB")
    side = min(image.size)
    out = detector(image, detect_resolution=min(side, resolution), image_resolution=side,
                   **dict(ANNOTATORS[kind].kwargs))
    return out.convert("RGB").resize(image.size, Image.Resampling.BILINEAR)


# ----- ControlNet models ----------------------------------------------------------------------------


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
                    models_dir: Path, allow_paths: bool = False):
    """Load a ControlNet (catalogue name, hub id, local folder or .safetensors); cached by spec, device, dtype."""
    resolved = resolve_controlnet(spec, models_dir, allow_paths=allow_paths)
    stamp = resolved.stat().st_mtime_ns if isinstance(resolved, Path) else 0
    key = (str(resolved), stamp, str(device), dtype)
    from pipelines.models import LOAD_LOCK

    with LOAD_LOCK:  # workers on several devices load at once; from_pretrained is not thread-safe
        return _controlnets.get(key, lambda: _load_controlnet(resolved, spec, device, dtype))


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


def clear_cache() -> None:
    """Forget cached ControlNets and annotators."""
    _controlnets.clear()
    _annotators.clear()
