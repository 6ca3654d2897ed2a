"""Regional prompts as the user writes them: the `Region` dataclass, its validation, its JSON text (API, PNG
metadata), the CLI form `x,y,w,h:prompt[:weight]`, the UI table's rows, and a preview of the boxes.

Pure Python and PIL (no torch), so the UI and the request module can use it; `pipelines.denoise.regions` turns regions
into latent masks for the loop.

Units: a rectangle whose x, y, w and h are all <= 1 is in fractions of the canvas; otherwise in pixels of the
stage-1 image (width x height). Either way it scales with the image in the hires refine. `feather` is in pixels
of the stage-1 image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import ValidationError
from pipelines.request.checks import check_and_parts

MAX_REGIONS = 16
MAX_WEIGHT = 10.0
MAX_FEATHER = 1024.0
REGION_BASES = ("rest", "background")
MIN_SIDE_PX = 8  # one latent pixel
COLUMNS = ("x", "y", "w", "h", "prompt", "negative_prompt", "weight", "feather", "seed")
CLI_FORM = "x,y,w,h:prompt[:weight] (fractions if x, y, w, h are all <= 1, else pixels)"


@dataclass(frozen=True)
class Region:
    """One regional prompt (MultiDiffusion region control, Bar-Tal et al. 2023, sec. 4.2)."""

    x: float
    """Left edge: a fraction of the width when x, y, w, h are all <= 1, else pixels."""
    y: float
    """Top edge, in the same unit."""
    w: float
    """Width, in the same unit (> 0)."""
    h: float
    """Height, in the same unit (> 0)."""
    prompt: str = ""
    """What the region shows; A1111 syntax (emphasis, scheduling, BREAK, AND) works."""
    negative_prompt: str | None = None
    """The region's negative prompt; None = the base negative prompt."""
    weight: float = 1.0
    """Strength against overlapping regions and in the feather, in (0, 10]."""
    feather: float = 0.0
    """Soft edge in pixels of the stage-1 image: the mask ramps from 0 to 1 over this width inside the box."""
    seed: int = -1
    """Seed of the region's initial noise (Tiled Diffusion's seed per region); -1 = the image's noise."""

    @property
    def in_fractions(self) -> bool:
        return all(v <= 1.0 for v in (self.x, self.y, self.w, self.h))

    def fractions(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of a `width` x `height` (stage-1) canvas."""
        if self.in_fractions:
            return self.x, self.y, self.x + self.w, self.y + self.h
        return self.x / width, self.y / height, (self.x + self.w) / width, (self.y + self.h) / height


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ValidationError(field, value, "must be a number")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError(field, value, "must be a number") from None
    if not math.isfinite(out):
        raise ValidationError(field, value, "must be a finite number")
    return out + 0.0


def _seed(field: str, value: Any) -> int:
    number = _number(field, value)
    if not number.is_integer() or not -1 <= number <= 2**32 - 1:
        raise ValidationError(field, value, "must be a whole number from -1 (the image's noise) to 4294967295")
    return int(number)


def _text(field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be text")
    if len(value) > max_chars:
        raise ValidationError(field, f"<{len(value)} characters>", f"must be at most {max_chars} characters")
    return value


def _box(p: str, r: Region, width: int, height: int) -> None:
    """The rectangle lies on the canvas and is at least one latent pixel in each direction."""
    frac = r.in_fractions
    size = {"x": 1.0 if frac else width, "y": 1.0 if frac else height}
    unit = "fractions" if frac else "pixels"
    for corner, side, name in (("x", "w", "width"), ("y", "h", "height")):
        start, extent, limit = getattr(r, corner), getattr(r, side), size[corner]
        if start < 0:
            raise ValidationError(p + corner, start, f"must be >= 0 (the region lies outside the canvas; {unit})")
        if extent <= 0:
            raise ValidationError(p + side, extent, "must be > 0 (a region of zero size)")
        if start + extent > limit * (1 + 1e-9):
            raise ValidationError(p + side, extent, f"takes the region outside the canvas: {corner} + {side} = "
                                  f"{start + extent:g} > {limit:g} ({unit}); make it at most {limit - start:g}")
        px = extent * ((width if corner == "x" else height) if frac else 1)
        if px < MIN_SIDE_PX:
            raise ValidationError(p + side, extent, f"is {px:g} px of the {name}: zero size in latent pixels; "
                                  f"make it at least {MIN_SIDE_PX} px")


def validate_region(r: Region | dict, i: int, width: int, height: int, max_chars: int = 10_000) -> Region:
    """One region with its numbers normalised; errors name regions[i].field."""
    p = f"regions[{i}]."
    if isinstance(r, dict):
        unknown = sorted(set(r) - set(COLUMNS))
        if unknown:
            raise ValidationError(f"regions[{i}]", unknown[0], f"has a key that is not a region key; known: "
                                  f"{', '.join(COLUMNS)}")
        missing = [k for k in ("x", "y", "w", "h") if r.get(k) is None]
        if missing:
            raise ValidationError(p + missing[0], None, "is required (x, y, w, h give the rectangle)")
        r = Region(**{k: v for k, v in r.items() if v is not None or k == "negative_prompt"})
    if not isinstance(r, Region):
        raise ValidationError(f"regions[{i}]", r, 'must be an object like {"x":0,"y":0,"w":0.5,"h":1,"prompt":"..."}')
    x, y, w, h = (_number(p + k, getattr(r, k)) for k in ("x", "y", "w", "h"))
    weight, feather = _number(p + "weight", r.weight), _number(p + "feather", r.feather)
    if not 0 < weight <= MAX_WEIGHT:
        raise ValidationError(p + "weight", r.weight, f"must be > 0 and at most {MAX_WEIGHT:g}")
    if not 0 <= feather <= MAX_FEATHER:
        raise ValidationError(p + "feather", r.feather, f"must be between 0 and {MAX_FEATHER:g} pixels")
    prompt = _text(p + "prompt", "" if r.prompt is None else r.prompt, max_chars)
    check_and_parts(p + "prompt", prompt)
    negative = None if r.negative_prompt is None else _text(p + "negative_prompt", r.negative_prompt, max_chars)
    out = Region(x, y, w, h, prompt, negative, weight, feather, _seed(p + "seed", r.seed))
    _box(p, out, width, height)
    return out


def validate_regions(value: Any, width: int, height: int, max_chars: int = 10_000) -> tuple[Region, ...]:
    """Regions from a tuple of Region, a list of objects, or their JSON text; () for None or ""."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        value = regions_from_json(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, Sequence):
        raise ValidationError("regions", value, "must be a list of regions (JSON text: [{\"x\":0,...}])")
    if len(value) > MAX_REGIONS:
        raise ValidationError("regions", f"<{len(value)} regions>", f"may hold at most {MAX_REGIONS} regions")
    return tuple(validate_region(r, i, width, height, max_chars) for i, r in enumerate(value))


def regions_from_json(text: str) -> list[dict]:
    """The JSON text form: a list of objects with the keys of `COLUMNS` (x, y, w, h required)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValidationError("regions", text, 'must be JSON: [{"x":0,"y":0,"w":0.5,"h":1,"prompt":"a cat"}]') from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValidationError("regions", text, 'must be a JSON list of objects: [{"x":0,"y":0,"w":0.5,"h":1,...}]')
    return value


_DEFAULTS = {f.name: f.default for f in fields(Region) if f.name not in ("x", "y", "w", "h")}


def regions_to_json(regions: Sequence[Region]) -> str:
    """Compact JSON of regions (defaults left out); `validate_regions(regions_to_json(r), ...) == r`."""
    items = [{k: v for k, v in asdict(r).items() if k in ("x", "y", "w", "h") or v != _DEFAULTS[k]} for r in regions]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def parse_region_cli(text: str) -> dict:
    """The CLI form `x,y,w,h:prompt[:weight]` -> a region object (validated later with the request)."""
    box, sep, rest = str(text).partition(":")
    numbers = [s.strip() for s in box.split(",")]
    if not sep or len(numbers) != 4:
        raise ValidationError("--region", text, f"must be written {CLI_FORM}")
    head, colon, tail = rest.rpartition(":")
    out: dict[str, Any] = dict(zip(("x", "y", "w", "h"), numbers, strict=True))
    try:
        out["weight"] = float(tail) if colon and tail.strip() else 1.0
        out["prompt"] = head if colon and tail.strip() else rest
    except ValueError:
        out["prompt"] = rest
    for key in ("x", "y", "w", "h"):
        try:
            out[key] = float(out[key])
        except ValueError:
            raise ValidationError("--region", text, f"must be written {CLI_FORM}; {key} is not a number") from None
    return out


def rows_from_regions(regions: Sequence[Region]) -> list[list[Any]]:
    """Regions as the UI table's rows (`COLUMNS`; no negative prompt = "", no seed = -1)."""
    return [[r.x, r.y, r.w, r.h, r.prompt, r.negative_prompt or "", r.weight, r.feather, r.seed] for r in regions]


def regions_from_rows(rows: Any) -> list[dict]:
    """The UI table's rows -> region objects; rows without a rectangle and a prompt are skipped (blank rows)."""
    out = []
    for row in rows or []:
        cells = list(row) + [None] * (len(COLUMNS) - len(row))
        item = {k: (None if _blank(v) else v) for k, v in zip(COLUMNS, cells, strict=False)}
        if all(item[k] in (None, 0) for k in ("x", "y", "w", "h")) and not item["prompt"]:
            continue  # a blank row (a table shows empty number cells as 0 or nothing)
        if item["negative_prompt"] is not None and not str(item["negative_prompt"]).strip():
            item["negative_prompt"] = None
        out.append({k: v for k, v in item.items() if v is not None or k in ("x", "y", "w", "h")})
    return out


def _blank(value: Any) -> bool:
    """An empty table cell: None, "" (or only spaces) or NaN."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def preview_regions(regions: Sequence[Region], width: int, height: int, max_side: int = 384) -> Image.Image:
    """The canvas with each region's box drawn and labelled "i: prompt" (the UI's Regions preview)."""
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = Image.new("RGB", size, (236, 238, 242))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(120, 120, 120))
    for i, r in enumerate(regions):
        x0, y0, x1, y1 = r.fractions(width, height)
        box = (x0 * size[0], y0 * size[1], x1 * size[0] - 1, y1 * size[1] - 1)
        colour = _COLOURS[i % len(_COLOURS)]
        draw.rectangle(box, outline=colour, width=2)
        label = f"{i + 1}: {r.prompt[:40]}" + (f" ×{r.weight:g}" if r.weight != 1.0 else "")
        draw.text((box[0] + 4, box[1] + 3), label, fill=colour, font=font)
    return img
