"""Value checks shared by every request field: numbers, ranges, choices, texts and names, each raising
`ValidationError(field, value, fix)`; `check_field` applies the ones a field's schema (`pipelines.request.fields`) asks for.
"""

from __future__ import annotations

import math
import re
from typing import Any, cast

from pipelines.errors import ValidationError
from pipelines.request.fields import FieldSpec, bounds, choices, is_optional, kind_of
from pipelines.request.limits import Limits

MAX_AND_PARTS = 8  # each AND part is one more UNet evaluation per step and tile
AND_RE = re.compile(r"\bAND\b")  # A1111 re_AND: the word that joins composable parts


def check_field(name: str, value: Any, tp: Any, fs: FieldSpec, limits: Limits) -> Any:
    """`value` checked and normalised as the schema of field `name` (type `tp`, spec `fs`) says; kinds with rules
    of their own (LoRAs, regions, images, ControlNet units, groups) are returned unchanged."""
    if value is None and is_optional(tp):
        return None
    kind = kind_of(tp, fs)
    if kind == "choice":
        return _choice(name, value, cast("tuple[str, ...]", choices(tp)))  # kind "choice" <=> choices(tp) is not None
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValidationError(name, value, "must be true or false")
        return value
    if kind in ("int", "float"):
        v = _int(name, value) if kind == "int" else _float(name, value)
        if fs.multiple_of and v % fs.multiple_of:
            lo = v - v % fs.multiple_of
            raise ValidationError(name, v, f"must be a multiple of {fs.multiple_of}; try {lo} or {lo + fs.multiple_of}")
        rng = bounds(fs, limits)
        if rng is not None:
            _in_range(name, v, *rng)
        return v
    if kind == "text":
        return _text(name, value, limits)
    if kind == "name":
        return check_name(name, value, fs.what or "a name from the list")
    if kind == "cfg":
        return _cfg_text(name, value)
    return value


_MAX_INT_BITS = 64  # no setting needs bigger whole numbers; far bigger ones cannot even be formatted


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValidationError(name, value, "must be a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if not isinstance(value, int):
        raise ValidationError(name, value, "must be a whole number")
    if value.bit_length() > _MAX_INT_BITS:
        raise ValidationError(name, value, "is out of range")
    return value


def _float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValidationError(name, value, "must be a number") from None
    except OverflowError:  # an int too big for a float
        raise ValidationError(name, value, "must be a finite number") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValidationError(name, value, "must be a finite number")
    return out


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValidationError(name, value, f"must be between {lo:g} and {hi:g}")




def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValidationError(name, value, f"must be one of {', '.join(choices)}")
    return value


def _text(name: str, value: Any, limits: Limits) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(name, value, "must be text")
    if len(value) > limits.max_prompt_chars:
        raise ValidationError(name, f"<{len(value)} characters>", f"must be at most {limits.max_prompt_chars} characters")
    _unicode(name, value)
    return value


# One file-name component may have 255 bytes (NAME_MAX); names get suffixes such as ".safetensors" appended.
_MAX_NAME_BYTES = 240
_MAX_PATH_CHARS = 4096  # PATH_MAX, for the CLI's model paths


def _unicode(name: str, value: str) -> None:
    """Text that encodes as UTF-8. A lone surrogate (U+D800-DFFF; JSON "\\ud800", or bytes that are not UTF-8 in
    a command line) makes the tokenizer raise TypeError and file names fail to encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(name, value, f"has an unpaired surrogate U+{ord(value[exc.start]):04X} at character "
                                           f"{exc.start}, which is not valid Unicode text; remove it") from None


def check_text(name: str, value: Any, limits: Limits | None = None) -> str:
    """A prompt-like text field ("" for None): a string of at most `max_prompt_chars` valid Unicode characters."""
    return _text(name, value, limits or Limits())


def check_name(name: str, value: Any, what: str = "a name from the list") -> str:
    """A name that is looked up in a table or on disk (model, LoRA, sampler, upscaler, ControlNet): valid Unicode,
    no control characters, each path component short enough for a file name (else the lookup raises OSError)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(name, value, f"must be {what}")
    _unicode(name, value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError(name, value, f"must not contain control characters (NUL, newline, ...); use {what}")
    longest = max(len(part.encode("utf-8")) for part in re.split(r"[/\\]", value))
    if longest > _MAX_NAME_BYTES or len(value) > _MAX_PATH_CHARS:
        raise ValidationError(name, value, f"is too long for a name ({len(value)} characters, at most "
                                           f"{_MAX_NAME_BYTES} bytes per file name); use {what}")
    return value


def _cfg_text(name: str, value: Any) -> str:
    """A guidance schedule (number or text) checked by `parse_cfg`, as its text; errors name `name`."""
    from pipelines.request.cfg import parse_cfg

    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValidationError(name, value, "must be a number or a schedule like linear(4,9)")
    if not isinstance(value, str):
        _float(name, value)  # nan, inf and ints too big for a float stop here
    text = str(value).strip()
    try:
        parse_cfg(text)
    except ValidationError as err:
        raise ValidationError(name, value, err.fix) from None
    return text


def check_and_parts(field: str, text: str, limit: int = MAX_AND_PARTS) -> None:
    """Refuse a prompt with more AND parts than `limit` (each costs one UNet evaluation per step)."""
    if not isinstance(text, str):
        return
    n = len(AND_RE.split(text))
    if n > limit:
        raise ValidationError(field, f"<prompt with {n} AND parts>",
                              f"may have at most {limit} parts joined by AND; merge some parts or drop some")
