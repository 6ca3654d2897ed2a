"""Server-side input limits (`Limits`): the named highs of the schema's ranges (`spec(range=(64, "max_side"))`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Server-side input limits, enforced for every entry point (UI, API, CLI)."""

    min_side: int = 64
    max_side: int = 8192  # tiled diffusion makes large sizes possible; keep a sane upper bound
    max_pixels: int = 8192 * 8192
    max_steps: int = 150
    max_batch: int = 16
    max_prompt_chars: int = 10_000
    max_hires_scale: float = 8.0
    max_loras: int = 32
