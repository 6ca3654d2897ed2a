"""Preprocessors turn a user's image into a control map.

"canny" (OpenCV) and "none" (the image already is a control map) need nothing else; the others use
controlnet-aux, imported only when chosen, with weights read only from a local folder
(``models/annotators`` by default, laid out like lllyasviel/Annotators).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import ModelError, ValidationError
from pipelines.lru import LRUCache
from pipelines.optional import MissingDependencyError, require

log = logging.getLogger(__name__)

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


def _threshold(field: str, value: object) -> int:
    """A canny threshold as an int in the request's range (`CANNY_RANGE`, A1111's 1-255); whole floats (from UI
    sliders) are accepted."""
    from pipelines.request.schema import CANNY_RANGE

    lo, hi = CANNY_RANGE
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValidationError(field, value, f"must be an integer threshold between {lo} and {hi}")
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


def _annotator(kind: str, annotators_dir: Path, device: torch.device | str, cache: LRUCache | None):
    """The controlnet-aux detector for `kind`: from `cache` (by class, folder and device) or loaded afresh."""
    folder = Path(annotators_dir)
    if cache is None:
        return _load_annotator(kind, folder, device)
    key = (ANNOTATORS[kind].cls, str(folder.resolve()), str(device))
    from pipelines.models.manager import LOAD_LOCK

    with LOAD_LOCK:  # a UI preview and a job may ask at once: one load, one cache update at a time
        return cache.get(key, lambda: _load_annotator(kind, folder, device))


def _load_annotator(kind: str, folder: Path, device: torch.device | str):
    """The controlnet-aux detector for `kind`, loaded from the local weights in `folder`."""
    spec = ANNOTATORS[kind]
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
    return detector


def preprocess(kind: str, image: Image.Image, *, low: int = 100, high: int = 200,
               annotators_dir: Path = Path("models/annotators"),
               device: torch.device | str = "cpu", resolution: int = 512,
               cache: LRUCache | None = None) -> Image.Image:
    """Turn `image` into a control map with preprocessor `kind` (one of PREPROCESSORS); RGB, same size out.

    `low`/`high` are the canny thresholds; `resolution` is the short side annotators detect at; `cache` (a
    manager's `caches.annotators`) keeps the detector, which is otherwise loaded for this call only.
    """
    if kind not in PREPROCESSORS:
        raise ValidationError("control preprocessor", kind, f"must be one of {', '.join(PREPROCESSORS)}")
    if kind == "none":
        return image.convert("RGB")
    if kind == "canny":
        return canny(image, low, high)
    detector = _annotator(kind, annotators_dir, device, cache)
    image = image.convert("RGB")
    side = min(image.size)
    out = detector(image, detect_resolution=min(side, resolution), image_resolution=side,
                   **dict(ANNOTATORS[kind].kwargs))
    return out.convert("RGB").resize(image.size, Image.Resampling.BILINEAR)

