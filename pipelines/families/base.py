"""The interface of a model family (`Family`) and the constants the planner reads from it (`Costs`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Costs:
    """The planner's per-family constants (`pipelines.planner`), used before the weights are loaded."""

    params: tuple[float, float, float]
    """(UNet, VAE, text encoders) parameter counts."""
    unet_bytes_per_latent_px: float
    """UNet activation bytes per latent pixel and sample, at 2 bytes per value."""
    default_tile: int
    """Latent pixels of a tile when the request names none (the family's native scale)."""


class Family:
    """One model family: its names and files, its text encoders' conditioning, its added conditioning and what it
    costs. Subclasses override what differs; a new family is a new module with a subclass and a registry line."""

    name: str = ""
    """The family's id in catalogues, metadata and configs folders (`sd1`, `sdxl`)."""
    label: str = ""
    """For people (errors, the plan line)."""
    pipeline_class: str = "StableDiffusionPipeline"
    """The diffusers pipeline class its components load into."""
    single_file_config: str = ""
    """The hub model whose component configs an original-format checkpoint of this family loads with."""
    taesd: tuple[str, str] = ("madebyollin/taesd", "taesd")
    """(hub id, folder under models/) of its tiny preview decoder."""
    controlnet_suffix: str = "sd15"
    """ControlNet catalogue names are `<type>-<suffix>` (`canny-sd15`)."""
    tile_controlnet: str | None = "tile-sd15"
    """The catalogue's tile ControlNet for the hires refine, or None when the catalogue has none."""
    text_encoders: int = 1
    """How many CLIP text encoders (and tokenizers) the family's pipelines hold."""
    pooled: bool = False
    """Whether the conditioning carries a pooled text embedding (the last encoder's projection)."""
    costs: Costs = Costs((0.86e9, 84e6, 123e6), 80e3, 96)

    # ------------------------------------------------------------ recognising a model
    def matches_checkpoint(self, keys: Iterable[str]) -> bool:
        """Whether an original-format checkpoint with these tensor names is of this family."""
        return False

    def matches_pipeline(self, pipe: Any) -> bool:
        """Whether a loaded diffusers pipeline is of this family."""
        return False

    # ------------------------------------------------------------ conditioning
    def added_conditioning(self, width: int, height: int) -> list[float] | None:
        """The UNet's added conditioning besides the text (SDXL's time ids) at this output size; None: none."""
        return None

    def zeros_for_empty_negative(self, pipe_config: Mapping[str, Any], negative_prompt: str) -> bool:
        """Whether an empty negative prompt is zero embeddings instead of the encoded "" (SDXL base, diffusers'
        `force_zeros_for_empty_prompt`)."""
        return False

    def __repr__(self) -> str:
        return f"<family {self.name}>"
