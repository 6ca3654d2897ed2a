"""Control images: open and check an upload, and resize it to the target (A1111's crop and resize)."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines.errors import ValidationError
from pipelines.image_info import IMAGE_FORMATS, MAX_IMAGE_PIXELS
from pipelines.images import from_pil

log = logging.getLogger(__name__)

MAX_CONTROL_PIXELS = MAX_IMAGE_PIXELS
"""Largest control image accepted (64 MP, as every upload), checked from the header before any pixel is decoded."""
CONTROL_FORMATS = IMAGE_FORMATS
ASPECT_TOLERANCE = 0.01



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
    return from_pil(image.resize((width, height), Image.Resampling.LANCZOS, box=box), value_range="unit")
