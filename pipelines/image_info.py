"""The `parameters` text in image files: PNG text chunks, and JPEG/WebP EXIF UserComment as A1111 writes them."""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from pipelines.errors import ValidationError

log = logging.getLogger(__name__)

PNG_KEY = "parameters"

def png_info(params: str) -> PngInfo:
    """PNG text chunks holding `params` under `parameters` (iTXt when not Latin-1), for `image.save(pnginfo=...)`."""
    info = PngInfo()
    info.add_text(PNG_KEY, params)
    return info


def write_png(image: Image.Image, params: str, fh: Any) -> None:
    """The one PNG writer: `image` with its `parameters` text into the open binary file `fh`."""
    image.save(fh, format="PNG", pnginfo=png_info(params))


def png_bytes(image: Image.Image, params: str) -> bytes:
    """`write_png` into memory (the Ray replicas send their images as PNG bytes)."""
    buf = io.BytesIO()
    write_png(image, params, buf)
    return buf.getvalue()


def exif_info(params: str) -> Image.Exif:
    """EXIF with `params` as UserComment (UTF-16 "UNICODE", as A1111 writes JPEG/WebP), for `image.save(exif=...)`."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + params.encode("utf-16-be")
    return exif


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment bytes -> text: 8-byte charset prefix, UTF-16 (either byte order) for "UNICODE"."""
    if isinstance(raw, str):
        return raw.strip("\0")
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:  # mostly-ASCII text has its zero bytes first in big-endian
            big = body[0::2].count(0) >= body[1::2].count(0)
            text = body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = bytes(raw).decode("utf-8", errors="replace")
    return text.strip("\0")


def _parameters_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        return text
    try:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception as err:  # PIL raises many types on corrupt EXIF; metadata is optional
        log.warning("unreadable EXIF, no parameters read: %s", err)
        return None
    if not comment:
        return None
    return _decode_user_comment(comment) or None


def read_parameters(image_or_path: Image.Image | str | os.PathLike | bytes) -> str | None:
    """The `parameters` text of an image (PNG text chunk, else JPEG/WebP EXIF UserComment); None if absent.

    A file PIL cannot identify raises ValidationError; a damaged image gives None (logged), never an exception.
    """
    if isinstance(image_or_path, Image.Image):
        return _parameters_of(image_or_path)
    source = io.BytesIO(image_or_path) if isinstance(image_or_path, bytes | bytearray) else image_or_path
    shown = "<bytes>" if isinstance(source, io.BytesIO) else str(source)
    try:
        with Image.open(source) as image:
            return _parameters_of(image)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValidationError("image", shown, "is not an existing image file") from None
    except UnidentifiedImageError:
        raise ValidationError("image", shown, "is not an image PIL can read (PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError:
        raise ValidationError("image", shown, "is too large to open safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        log.warning("damaged image %s, no parameters read: %s", shown, err)
        return None
