"""SDXL: two CLIP text encoders (ViT-L and OpenCLIP ViT-bigG, whose projection is the pooled embedding), the
time ids as added conditioning, 4 latent channels, 1024 px."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.families.base import Costs, Family


class SDXL(Family):
    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    single_file_config = "stabilityai/stable-diffusion-xl-base-1.0"
    taesd = ("madebyollin/taesdxl", "taesdxl")
    controlnet_suffix = "sdxl"
    tile_controlnet = None
    text_encoders = 2
    pooled = True
    costs = Costs((2.6e9, 84e6, 817e6), 64e3, 128)

    def matches_checkpoint(self, keys: Iterable[str]) -> bool:
        return any(k.startswith("conditioner.embedders.1") for k in keys)

    def matches_pipeline(self, pipe: Any) -> bool:
        return getattr(pipe, "text_encoder_2", None) is not None

    def added_conditioning(self, width: int, height: int) -> list[float]:
        """diffusers' `add_time_ids` with no crop: (original size, crop top-left, target size), height first."""
        return [height, width, 0, 0, height, width]

    def zeros_for_empty_negative(self, pipe_config: Mapping[str, Any], negative_prompt: str) -> bool:
        """diffusers' SDXL default call (`negative_prompt=None` with `force_zeros_for_empty_prompt`, set for SDXL
        base) and A1111 (`sd_models_xl.get_learned_conditioning`: an empty SDXL negative) both zero it."""
        return negative_prompt == "" and bool(pipe_config.get("force_zeros_for_empty_prompt", False))


FAMILY = SDXL()
