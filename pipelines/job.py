"""One run on a loaded model: its request, seeds and progress hooks (`Job`), and how each of its stages tiles the
UNet (`tile_spec`) and runs the VAE (`CodecOptions`) under the planner's decision and the out-of-memory retry.

The Engine builds a `Job` per attempt; the two-stage flow (`pipelines.hires`), inpainting (`pipelines.edit.run`) and
the outputs (`pipelines.outputs`) read it. docs/ARCHITECTURE.md, "A request's way through the code".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipelines.control.units import prepare_units
from pipelines.denoise.executor import SERIAL, TileExecutor
from pipelines.denoise.loop import ControlInput, LoopStats, StepInfo, TileSpec
from pipelines.denoise.stages import StageSpec, run_stage
from pipelines.lru import LRUCache
from pipelines.planner import Plan
from pipelines.request.schema import GenerationRequest, TileConfig
from pipelines.vae import io as vae_io

if TYPE_CHECKING:
    from pipelines.models.manager import LoadedModel, ModelManager
    from pipelines.prompts.embeddings import Embeddings
    from pipelines.stage_cache import Stage1Cache

Planner = Callable[..., Plan]
"""`Engine.plan`: (request, model, *, width, height) -> the stage's Plan; None sizes = the request's own."""

LOW_MEMORY_TILE = 64  # latent px: the UNet tile of the out-of-memory retry
LOW_MEMORY_VAE_TILE = 32  # latent px: the VAE tile of the out-of-memory retry


@dataclass(frozen=True)
class Job:
    """One attempt at a request on a loaded model (the out-of-memory retry is a second `Job`)."""

    model: LoadedModel
    """The loaded model it runs on."""
    req: GenerationRequest
    """The checked request, its seed resolved."""
    seeds: list[int]
    """One seed per image: seed, seed + 1, ..."""
    manager: ModelManager
    """The one owner of weights: the models folder and the ControlNet/upscaler caches the stages load through."""
    prompt_cache: LRUCache
    """Encoded prompts, shared across runs (and across the workers of one device type)."""
    stage1_cache: Stage1Cache
    """Stage-1 latents of recent two-stage runs (`pipelines.stage_cache`)."""
    embeddings: Embeddings | None
    """The textual inversions as they were when the run began (a snapshot: a new file mid-run changes nothing)."""
    planner: Planner
    """Plans a stage of this run at a size."""
    callback: Callable[[StepInfo], None] | None = None
    """Called after every denoising step of every stage."""
    cancel: Any = None
    """The run's cancel token (anything with `is_set()`)."""
    unet: Any = None
    """A stand-in for the model's UNet (tests' fakes); None = the model's."""
    executor: TileExecutor = SERIAL
    """Where each step's batches of tiles run: here, or over a split image's devices (`pipelines.serving`)."""
    low_memory: bool = False
    """The out-of-memory retry: small UNet tiles, tile batch 1, a tiled VAE (streamed on a CPU)."""
    save: bool = True
    """Save each image into the outputs folder as soon as it is decoded."""
    stats: LoopStats = field(default_factory=LoopStats)
    """What the loop did, summed over the stages."""
    report: vae_io.DecodeReport = field(default_factory=vae_io.DecodeReport)
    """The decoder's notes (fallbacks), written into the metadata."""
    started: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the attempt began (before the model loads): the result's "seconds"."""

    def run_stage(self, spec: StageSpec) -> torch.Tensor:
        """One stage's final latents, with this job's prompt cache, hooks and statistics."""
        return run_stage(self.model, spec, cache=self.prompt_cache, callback=self.callback, cancel=self.cancel,
                         stats=self.stats, unet=self.unet, executor=self.executor).latents

    def plan(self, req: GenerationRequest | None = None, *, width: int | None = None, height: int | None = None
             ) -> Plan:
        """The plan of a stage of this run (`req`: the stage's request, default the job's) at its size."""
        return self.planner(req or self.req, self.model, width=width, height=height)

    def control(self, req: GenerationRequest, width: int, height: int) -> tuple[ControlInput, ...]:
        """`req`'s ControlNet units prepared at this size (`pipelines.control.units.prepare_units`)."""
        if not req.control:
            return ()
        return prepare_units(self.model, req.control, width, height, self.manager.models_dir, self.manager.caches)


def loop_finished(cancel: Any) -> None:
    """Tell a run's cancel token that the last denoising step is done (`pipelines.serving.service.RunToken`).

    The loop checks the token before each step and each tile batch and once more when a step is computed,
    before it is reported (so a cancel during the last step counts), never after that: from here the decode
    and the saving run to the end whatever the token says; the token passes this on to the stream, which
    then delivers the images even to a caller that cancelled (README: "Stopping a run")."""
    finished = getattr(cancel, "loop_finished", None)
    if finished is not None:
        finished()


@dataclass(frozen=True)
class CodecOptions:
    """How one stage's VAE runs: whole or tiled, its tile, layer by layer ("exact") or streamed, the host budget.

    One set of values for both directions; `decode` and `encode` hand them to `pipelines.vae.io` under its names
    (the decoder's tile and overlap in latent pixels, the encoder's in image pixels)."""

    tiled: bool = False
    tile: int = 0
    """Tile edge in latent pixels (0: the plan does not tile the VAE)."""
    mode: str = "exact"
    """exact | stream (`pipelines.vae.stream`)."""
    host_budget: int | None = None
    """Bytes of canvases a streamed VAE may keep layer by layer (None: stream every stage)."""
    replicas: Any = None
    """A split image's VAE replicas (its executor's `vae_replicas`): the tiled VAE
    then runs across the same devices, with the same pixels. None: one device."""

    @classmethod
    def for_plan(cls, plan: Plan, low_memory: bool, device: torch.device, executor: TileExecutor = SERIAL
                 ) -> CodecOptions:
        """The plan's VAE settings; the low-memory retry tiles the VAE even where the plan did not. A split
        image's executor brings its VAE replicas."""
        tile = min(plan.vae_tile_size or LOW_MEMORY_VAE_TILE, LOW_MEMORY_VAE_TILE) if low_memory \
            else plan.vae_tile_size
        # out of memory on a CPU means out of host RAM, where the layer-wise canvases live: stream every stage then
        retry_stream = low_memory and device.type == "cpu"
        return cls(tiled=plan.vae_tiled or low_memory, tile=tile,
                   mode="stream" if retry_stream else plan.vae_mode or "exact",
                   host_budget=None if retry_stream else plan.vae_host_budget,
                   replicas=executor.vae_replicas)

    def decode_options(self) -> dict[str, Any]:
        """`pipelines.vae.io.decode`'s keywords: tile and overlap in latent pixels."""
        return {"tiled": self.tiled, "tile": self.tile, "overlap": max(4, self.tile // 4), "tile_mode": self.mode,
                "host_budget": self.host_budget, **self._replicas()}

    def encode_options(self) -> dict[str, Any]:
        """`pipelines.vae.io.encode`'s keywords: tile and overlap in image pixels."""
        return {"tiled": self.tiled, "tile_px": self.tile * 8, "overlap_px": max(32, self.tile * 2),
                "tile_mode": self.mode, "host_budget": self.host_budget, **self._replicas()}

    def _replicas(self) -> dict[str, Any]:
        return {} if self.replicas is None else {"replicas": self.replicas}

    def decode(self, model, latents: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Latents -> images in [-1, 1] (`kwargs`: the decoder's `mode` and `report`)."""
        return vae_io.decode(model, latents, **kwargs, **self.decode_options())

    def encode(self, model, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents."""
        return vae_io.encode(model, pixels, **self.encode_options())


def tile_spec(plan: Plan, tiling: TileConfig, low_memory: bool) -> TileSpec | None:
    """The UNet tiling of a stage: the plan's (None when untiled); the low-memory retry always tiles, smaller."""
    if low_memory:
        size = min(plan.tile_size, LOW_MEMORY_TILE)
        return TileSpec(size, min(plan.overlap, size // 4), tiling.blend, 1, tiling.shift)
    if not plan.tiled:
        return None
    return TileSpec(plan.tile_size, plan.overlap, tiling.blend, plan.tile_batch, tiling.shift)
