"""SD 2.x: one OpenCLIP ViT-H text encoder (1024 wide), 4 latent channels, 768 px (v-prediction)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.families.sd1 import SD1


class SD2(SD1):
    name = "sd2"
    label = "SD 2.x"
    single_file_config = "stabilityai/stable-diffusion-2-1"

    def matches_checkpoint(self, keys: Iterable[str]) -> bool:
        return any(k.startswith("cond_stage_model.model.") for k in keys)

    def matches_pipeline(self, pipe: Any) -> bool:
        config = getattr(getattr(pipe, "text_encoder", None), "config", None)
        return config is not None and getattr(config, "hidden_size", 768) == 1024


FAMILY = SD2()
