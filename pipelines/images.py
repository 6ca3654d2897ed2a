"""PIL images <-> image tensors [B, 3, H, W], the one conversion every stage uses.

Two value ranges: "signed" [-1, 1] is what the VAE reads and writes; "unit" [0, 1] is what ControlNet maps and
upscaler models take. Both read RGB as float32 (alpha dropped, greyscale expanded) and write uint8 rounded to the
nearest value, as diffusers' `VaeImageProcessor` does.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

ValueRange = Literal["signed", "unit"]
VALUE_RANGES: tuple[str, ...] = ("signed", "unit")


def from_pil(image: Image.Image, width: int | None = None, height: int | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
             value_range: ValueRange = "signed") -> torch.Tensor:
    """A PIL image -> [1, 3, H, W] in [-1, 1] ("signed") or [0, 1] ("unit"), resized (Lanczos) to (width, height)
    when both are given and differ, on `device` in `dtype` (unchanged where None)."""
    image = image.convert("RGB")
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32)
    if value_range == "signed":
        array = array / 127.5 - 1.0
    elif value_range == "unit":
        array = array / 255.0
    else:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def to_pil(images: torch.Tensor, *, value_range: ValueRange = "signed") -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] ("signed") or [0, 1] ("unit") -> RGB PIL images, rounded to nearest; in place
    on one float copy, so a 4096² image needs one extra 200 MB buffer, not four."""
    if value_range == "signed":
        arr = images.float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
    elif value_range == "unit":
        arr = images.float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    else:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]
