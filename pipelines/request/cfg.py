"""CFG schedules as the user writes them: `GuidanceSchedule`, its one textual form and the scale at each step.

Pure Python (no torch), so the request layer checks the `cfg` field with it; `pipelines.denoise.guidance` applies
the scale to the model's predictions.

Textual form (UI, CLI `--cfg`, API, PNG metadata), parsed by `parse_cfg` and written by `format_cfg`:
`7`, `7.5`, `linear(4,9)`, `cosine(9,4)`, `step(9,5,0.5)`, `interval(7.5,0.2,0.8)`, each optionally followed by
`, rescale=0.7`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

from pipelines.errors import ValidationError

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
