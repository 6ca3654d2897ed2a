"""The `parameters` text in image files: PNG text chunks, and JPEG/WebP EXIF UserComment as A1111 writes them."""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import IO, Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo, PngStream

from pipelines.errors import ValidationError

log = logging.getLogger(__name__)

PNG_KEY = "parameters"
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest uploaded image accepted (64 MP), checked from the header before any pixel is decoded."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The formats uploads may have (checked from the header)."""
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt", b"eXIf")
_MAX_TEXT_CHUNK = 1 << 20  # a chunk of text larger than this is skipped, not read (a prompt is far smaller)


def check_header(image: Image.Image, name: str) -> None:
    """Refuse an opened (not decoded) image that is not PNG/JPEG/WebP or is over MAX_IMAGE_PIXELS, from its header."""
    limit = f"must be a PNG/JPEG/WebP image of at most {MAX_IMAGE_PIXELS // 2**20} MP"
    w, h = image.size
    if image.format not in IMAGE_FORMATS:
        raise ValidationError(name, "upload", f"{limit} (it is {image.format or 'an unknown format'})")
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise ValidationError(name, "upload", f"{limit} (it is {w}x{h} = {w * h / 1e6:.0f} MP)")


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


def _png_late_chunks(fp: IO[bytes]) -> dict:
    """The text and EXIF chunks of a whole PNG file (also those after the pixel data, which PIL reads only when it
    decodes the pixels), read with PIL's own chunk parsers while the pixel chunks are skipped, never decoded."""
    start = fp.tell()
    try:
        fp.seek(8)  # the PNG signature
        stream = PngStream(fp)
        while True:
            head = fp.read(8)
            if len(head) < 8:
                break
            length, cid = int.from_bytes(head[:4], "big"), head[4:]
            if cid == b"IEND":
                break
            if cid in _TEXT_CHUNKS and length <= _MAX_TEXT_CHUNK:
                stream.call(cid, fp.tell(), length)
                fp.read(4)  # the CRC
            else:
                fp.seek(length + 4, os.SEEK_CUR)
            if PNG_KEY in stream.im_info:
                break
        return stream.im_info
    finally:
        fp.seek(start)


def _parameters_of(image: Image.Image) -> str | None:
    info = image.info
    fp = getattr(image, "fp", None)
    if image.format == "PNG" and PNG_KEY not in info and fp is not None:
        try:  # PIL's getexif() would decode the whole image to reach chunks after the pixels
            info = {**info, **_png_late_chunks(fp)}
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            log.warning("damaged PNG, no parameters read: %s", err)
            return None
    text = info.get(PNG_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        return text
    try:
        if image.format == "PNG":  # from the chunks read above; getexif() would decode the pixels
            exif = Image.Exif()
            if info.get("exif"):
                exif.load(info["exif"])
        else:  # JPEG and WebP carry EXIF in their header
            exif = image.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception as err:  # PIL raises many types on corrupt EXIF; metadata is optional
        log.warning("unreadable EXIF, no parameters read: %s", err)
        return None
    if not comment:
        return None
    return _decode_user_comment(comment) or None


def read_parameters(image_or_path: Image.Image | str | os.PathLike | bytes, *, upload: str | None = None) -> str | None:
    """The `parameters` text of an image (PNG text chunk, else JPEG/WebP EXIF UserComment); None if absent.

    No pixel is decoded. `upload`: the file is a user's upload of that field name, held to `check_header` first.
    A file PIL cannot identify raises ValidationError; a damaged image gives None (logged), never an exception.
    """
    if isinstance(image_or_path, Image.Image):
        if upload:
            check_header(image_or_path, upload)
        return _parameters_of(image_or_path)
    source = io.BytesIO(image_or_path) if isinstance(image_or_path, bytes | bytearray) else image_or_path
    shown = "<bytes>" if isinstance(source, io.BytesIO) else "upload" if upload else str(source)
    field = upload or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked, never decoded
            with Image.open(source) as image:
                if upload:
                    check_header(image, upload)
                return _parameters_of(image)
    except ValidationError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValidationError(field, shown, "is not an existing image file") from None
    except UnidentifiedImageError:
        raise ValidationError(field, shown, "is not an image PIL can read (PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError:
        raise ValidationError(field, shown, "is too large to open safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        log.warning("damaged image %s, no parameters read: %s", shown, err)
        return None
