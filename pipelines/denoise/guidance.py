"""Dynamic classifier-free guidance: schedules over the denoising progress, their one textual form, CFG rescale.

Pure functions, no globals; the denoising loop asks `scale_at(progress_of(i, steps))` each step, skips the
unconditional pass where `needs_uncond` is False and combines the two predictions with `apply_cfg` once on the
full canvas (after tiles were blended).

Textual form (UI, CLI `--cfg`, API, PNG metadata), parsed by `parse_cfg` and written by `format_cfg`:
`7`, `7.5`, `linear(4,9)`, `cosine(9,4)`, `step(9,5,0.5)`, `interval(7.5,0.2,0.8)`, each optionally followed by
`, rescale=0.7`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import ValidationError

log = logging.getLogger(__name__)

Kind = Literal["constant", "linear", "cosine", "step", "interval"]
KINDS: tuple[str, ...] = get_args(Kind)
ARITY: dict[str, int] = {"constant": 1, "linear": 2, "cosine": 2, "step": 3, "interval": 3}
MAX_SCALE = 30.0
CFG_FORMS = (
    "must be a number or one of: 7 | linear(4,9) | cosine(9,4) | step(9,5,0.5) | interval(7.5,0.2,0.8), "
    "optionally followed by ', rescale=0.7'"
)

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_CFG_RE = re.compile(
    rf"^\s*(?:(?P<num>{_NUM})|(?P<kind>[a-z]+)\s*\(\s*(?P<args>{_NUM}(?:\s*,\s*{_NUM})*)\s*\))"
    rf"\s*(?:,\s*rescale\s*=\s*(?P<rescale>{_NUM})\s*)?$",
    re.IGNORECASE,
)


def _problem(kind: str, params: tuple[float, ...], rescale: float) -> str | None:
    """Why (kind, params, rescale) is not a usable schedule, or None when it is."""
    if kind not in KINDS:
        return f"unknown schedule {kind!r}"
    if len(params) != ARITY[kind]:
        return f"{kind} takes {ARITY[kind]} number(s), not {len(params)}"
    if not all(math.isfinite(p) for p in params) or not math.isfinite(rescale):
        return "numbers must be finite"
    scales = params[:2] if kind in ("linear", "cosine", "step") else params[:1]
    if not all(0.0 <= s <= MAX_SCALE for s in scales):
        return f"scales must be within [0, {MAX_SCALE:g}]"
    if kind == "step" and not 0.0 <= params[2] <= 1.0:
        return "the step point must be within [0, 1]"
    if kind == "interval" and not 0.0 <= params[1] < params[2] <= 1.0:
        return "interval bounds must satisfy 0 <= lo < hi <= 1"
    if not 0.0 <= rescale <= 1.0:
        return "rescale must be within [0, 1]"
    return None


@dataclass(frozen=True)
class GuidanceSchedule:
    """A CFG scale as a function of denoising progress, plus the CFG-rescale strength applied after combining."""

    kind: Kind
    """constant(s) | linear(a,b) | cosine(a,b) | step(a,b,at) | interval(s,lo,hi); see `scale_at`."""
    params: tuple[float, ...]
    """The numbers in the textual form, in order; scales within [0, 30], progress points within [0, 1]."""
    rescale: float = 0.0
    """CFG rescale phi in [0, 1] (Lin et al. 2023 suggest 0.7); 0 leaves plain CFG untouched."""

    def __post_init__(self) -> None:
        params = tuple(float(p) + 0.0 for p in self.params)  # floats, and -0.0 -> 0.0 so the text round-trips
        rescale = float(self.rescale) + 0.0
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "rescale", rescale)
        reason = _problem(self.kind, params, rescale)
        if reason is not None:
            raise ValidationError("cfg", f"{self.kind}{params}, rescale={rescale}", f"{CFG_FORMS} ({reason})")

    def scale_at(self, progress: float) -> float:
        """CFG scale at `progress` in [0, 1] (0 = first step); ramps after Wang et al. 2024, interval after Kynkäänniemi et al. 2024."""
        if not 0.0 <= progress <= 1.0:
            raise ValidationError("progress", progress, "must be within [0, 1] (0 = first step, 1 = last)")
        p = self.params
        if self.kind == "constant":
            return p[0]
        if self.kind == "step":
            return p[0] if progress < p[2] else p[1]
        if self.kind == "interval":
            return p[0] if p[1] <= progress <= p[2] else 1.0
        a, b = p
        t = progress if self.kind == "linear" else (1.0 - math.cos(math.pi * progress)) / 2.0
        return min(max(a * (1.0 - t) + b * t, min(a, b)), max(a, b))  # exact at the ends, never overshoots

    def __str__(self) -> str:
        return format_cfg(self)


def parse_cfg(text: str | float | GuidanceSchedule) -> GuidanceSchedule:
    """Parse the one textual CFG form (`7`, `linear(4,9), rescale=0.7`, ...); a plain number means constant."""
    if isinstance(text, GuidanceSchedule):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            return GuidanceSchedule("constant", (float(text),))
        except ValidationError as err:
            raise ValidationError("cfg", text, err.fix) from None
    if not isinstance(text, str):
        raise ValidationError("cfg", text, CFG_FORMS)
    m = _CFG_RE.match(text)
    if m is None:
        raise ValidationError("cfg", text, CFG_FORMS)
    params: tuple[float, ...]
    if m["num"] is not None:
        kind, params = "constant", (float(m["num"]),)
    else:
        kind, params = m["kind"].lower(), tuple(float(x) for x in m["args"].split(","))
    rescale = float(m["rescale"]) if m["rescale"] is not None else 0.0
    try:
        return GuidanceSchedule(kind, params, rescale)  # type: ignore[arg-type]  # kind checked in _problem
    except ValidationError as err:
        raise ValidationError("cfg", text, err.fix) from None


def _num(x: float) -> str:
    """Shortest text for `x` that reads back to the same float (`7`, `7.5`, `0.30000000000000004`)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def format_cfg(schedule: GuidanceSchedule) -> str:
    """Canonical text of a schedule: `parse_cfg(format_cfg(s)) == s`, and canonical text formats to itself."""
    args = ",".join(_num(p) for p in schedule.params)
    text = args if schedule.kind == "constant" else f"{schedule.kind}({args})"
    return f"{text}, rescale={_num(schedule.rescale)}" if schedule.rescale else text


def progress_of(step_index: int, steps: int) -> float:
    """Progress of step `step_index` of `steps`: step_index / max(steps - 1, 1), so 0 at the first step, 1 at the last."""
    if steps < 1:
        raise ValidationError("steps", steps, "must be at least 1")
    if not 0 <= step_index < steps:
        raise ValidationError("step_index", step_index, f"must be within [0, {steps - 1}]")
    return step_index / max(steps - 1, 1)


def scales_for_steps(schedule: GuidanceSchedule, steps: int) -> list[float]:
    """The CFG scale of every step of a `steps`-step run."""
    return [schedule.scale_at(progress_of(i, steps)) for i in range(steps)]


def needs_uncond(scale: float) -> bool:
    """Whether the unconditional pass is needed: not at scale 1.0, where CFG reduces to the conditional prediction."""
    return scale != 1.0


def unet_evaluations(schedule: GuidanceSchedule, steps: int, batch_tiles: int = 1) -> int:
    """UNet passes for a run: 2 per step (and tile) with guidance, 1 where the scale is 1.0 (Kynkäänniemi et al. 2024)."""
    if batch_tiles < 1:
        raise ValidationError("batch_tiles", batch_tiles, "must be at least 1")
    return batch_tiles * sum(2 if needs_uncond(s) else 1 for s in scales_for_steps(schedule, steps))


def apply_cfg(uncond: torch.Tensor | None, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, optionally rescaled to the conditional std (Lin et al. 2023, eq. 15-16)."""
    if uncond is None:
        if needs_uncond(scale):
            raise ValidationError("uncond", None, f"is required when the CFG scale is not 1.0 (scale={scale:g})")
        return cond
    if uncond.shape != cond.shape:
        raise ValidationError("uncond", tuple(uncond.shape), f"must have the shape of cond {tuple(cond.shape)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValidationError("rescale", rescale, "must be within [0, 1]")
    cfg = uncond + scale * (cond - uncond)
    if rescale == 0.0:
        return cfg
    if cfg.ndim < 2:
        raise ValidationError("cond", tuple(cond.shape), "must have a batch dimension and at least one more to rescale")
    dims = tuple(range(1, cfg.ndim))
    std_cond = cond.float().std(dim=dims, keepdim=True, correction=0)
    std_cfg = cfg.float().std(dim=dims, keepdim=True, correction=0)
    factor = torch.where(std_cfg > 0, std_cond / std_cfg.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    rescaled = cfg * factor.to(cfg.dtype)
    return rescale * rescaled + (1.0 - rescale) * cfg


def plot_schedule(schedule: GuidanceSchedule, steps: int, size: tuple[int, int] = (360, 160)) -> Image.Image:
    """A small RGB plot of the CFG scale per step; steps with guidance off (scale 1.0) are shaded."""
    width, height = size
    if width < 120 or height < 80:
        raise ValidationError("size", size, "must be at least (120, 80)")
    scales = scales_for_steps(schedule, steps)
    smin, smax = min(scales), max(scales)
    lo, hi = (smin, smax) if smax - smin > 1e-9 else (smin - 1.0, smax + 1.0)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 40, width - 10, 22, height - 18
    draw.text((left, 4), format_cfg(schedule), fill=(20, 20, 20), font=font)

    def x_of(i: float) -> float:
        return (left + right) / 2 if steps == 1 else left + (right - left) * i / (steps - 1)

    def y_of(s: float) -> float:
        return bottom - 6 - (bottom - top - 12) * (s - lo) / (hi - lo)  # 6 px clear of the axes

    half = (right - left) / max(steps - 1, 1) / 2
    for i, s in enumerate(scales):
        if not needs_uncond(s):
            x0, x1 = max(left, x_of(i) - half), min(right, x_of(i) + half)
            draw.rectangle((x0, top, x1, bottom), fill=(225, 228, 235))
    draw.line((left, top, left, bottom, right, bottom), fill=(60, 60, 60), width=1)
    for value in sorted({smin, smax}):
        y = y_of(value)
        draw.line((left - 3, y, left, y), fill=(60, 60, 60))
        draw.text((4, y - 6), f"{value:.3g}", fill=(60, 60, 60), font=font)
    draw.text((left, bottom + 4), "step 1", fill=(90, 90, 90), font=font)
    draw.text((right - 40, bottom + 4), f"step {steps}", fill=(90, 90, 90), font=font)
    points = [(x_of(i), y_of(s)) for i, s in enumerate(scales)]
    if len(points) > 1:
        draw.line(points, fill=(40, 90, 200), width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(40, 90, 200))
    return img
