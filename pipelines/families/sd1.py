"""SD 1.x: one CLIP ViT-L text encoder (768 wide), 4 latent channels, 512 px."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.families.base import Costs, Family


class SD1(Family):
    name = "sd1"
    label = "SD 1.x"
    single_file_config = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    costs = Costs((0.86e9, 84e6, 123e6), 80e3, 96)

    def matches_checkpoint(self, keys: Iterable[str]) -> bool:
        return any(k.startswith("model.diffusion_model.") for k in keys)

    def matches_pipeline(self, pipe: Any) -> bool:
        return getattr(pipe, "text_encoder", None) is not None


FAMILY = SD1()
