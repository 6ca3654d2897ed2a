"""Dynamic classifier-free guidance on the model's predictions: `apply_cfg` (with CFG rescale) and a plot of a
schedule. The schedules themselves, and their textual form, are the request's (`pipelines.request.cfg`).

Pure functions, no globals; the denoising loop asks `scale_at(progress_of(i, steps))` each step, skips the
unconditional pass where `needs_uncond` is False and combines the two predictions with `apply_cfg` once on the
full canvas (after tiles were blended).
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import ValidationError
from pipelines.request.cfg import GuidanceSchedule, format_cfg, needs_uncond, scales_for_steps


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
