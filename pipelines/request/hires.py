"""The hires fix's request-side rules: which upscalers work on latents, and the refine strength they get.

`pipelines.models.upscalers` does the upscaling itself; the names and the rules live here so that validation, the
metadata and the UI agree without importing the models.
"""

from __future__ import annotations

from typing import Any

LATENT_UPSCALERS: tuple[str, ...] = ("latent", "latent-antialiased", "latent-bicubic", "latent-bicubic-antialiased",
                                     "latent-nearest", "latent-nearest-exact")
"""The upscalers that work on latents (A1111's "Latent (...)" family); the rest work on pixels."""
LATENT_MIN_DENOISE = 0.5
"""Below this hires denoising strength a latent upscale stays blurry; the UI warns."""
DEFAULT_DENOISE = 0.35
"""The refine strength when the request names none (pixel upscalers)."""


def is_latent(name: str) -> bool:
    """True for the upscalers that work on latents (`upscale_latents`) rather than pixels."""
    return name in LATENT_UPSCALERS


def hires_denoise(req: Any) -> float:
    """The refine strength: the request's, else 0.35 (0.55 for latent upscalers, which blur below 0.5)."""
    if req.hires.denoise is not None:
        return req.hires.denoise
    return max(LATENT_MIN_DENOISE + 0.05, DEFAULT_DENOISE) if is_latent(req.hires.upscaler) else DEFAULT_DENOISE


def hires_warning(req: Any) -> str | None:
    """A user-facing warning for settings known to give poor results."""
    if req.hires.enabled and is_latent(req.hires.upscaler) and hires_denoise(req) < LATENT_MIN_DENOISE:
        return (f"latent upscaling with denoise {hires_denoise(req):g} < {LATENT_MIN_DENOISE} gives blurry images; "
                f"raise hires_denoise or use a pixel upscaler")
    return None
