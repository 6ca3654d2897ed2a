"""Decide whether (and how) to tile a generation so it fits a device-memory budget.

The memory model is deliberately rough and stated here so it can be recalibrated:

* weights: parameter counts per family (below) x `dtype_bytes`;
* UNet activations: a per-family constant x latent pixels x samples in the UNet batch (x2 with CFG). SDPA
  attention is memory-linear in tokens, so a linear model is fair. Calibration: SD 1.5 at 512² (64² latent) with
  CFG in fp16 peaks around 0.6 GB above its weights -> ~80 KB per latent pixel per sample; SDXL at 1024² peaks
  around 2 GB above its weights -> ~64 KB;
* VAE decode: ~4.5 KB per output pixel at fp16 (SD 1.5's VAE needs ~1.2 GB of activations at 512²), one image
  at a time (sliced), so not multiplied by the batch; tiled, the device holds one tile's working set plus the
  latent-resolution mid-block (`pipelines.vae.tiling`);
* the UNet and the VAE never run at the same time, so the peak is weights + the larger of the two;
* a tiled VAE runs layer by layer ("exact") when its full-size stage canvases (`pipelines.vae.tiling.decode_splits`)
  fit the host budget (on a CPU that is the device budget minus the weights; on an accelerator, half the available
  RAM), else "stream": the low-resolution stages still layer by layer as far as the budget allows, the rest tile by
  tile (bounded memory, more compute the more stages stream: SD's VAE at 4096² with 128² tiles costs ~2.3x one
  decode streaming its last 9 stages, ~8.6x streaming all 25; `pipelines.vae.stream`). All are exact; only time
  and host memory differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pipelines.errors import ValidationError
from pipelines.families.registry import family as family_spec
from pipelines.tiling import Tile, plan_tiles
from pipelines.vae.stream import Split, choose

Switch = Literal["auto", "on", "off"]
VaeMode = Literal["auto", "exact", "stream"]

VAE_BYTES_PER_OUTPUT_PX = 4.5e3  # full decode, at 2 bytes per value
VAE_MID_BYTES_PER_LATENT_PX = 8e3  # whole-latent mid-block when the VAE is tiled, at 2 bytes per value
DEFAULT_OVERLAP = 32
DEFAULT_VAE_TILE = 64  # latent pixels = 512 px
STREAM_MARGIN = 13  # latent px of context a fully streamed VAE tile carries (SD's VAE), when the VAE is not known
STREAM_TILES = (128, 96, 64)  # streamed VAE tile candidates, largest first: the margin costs (1 + 2 margin / tile)²
MAX_TILE_BATCH = 8
SCALE = 8  # pixels per latent pixel


@dataclass(frozen=True)
class Plan:
    """How one generation will run."""

    width: int
    """Output width in pixels."""
    height: int
    """Output height in pixels."""
    batch: int
    """Images per generation."""
    tiled: bool
    """Whether the UNet runs on tiles (MultiDiffusion) instead of the whole latent."""
    tile_size: int
    """UNet tile edge in latent pixels (the whole latent's larger side when untiled)."""
    overlap: int
    """UNet tile overlap in latent pixels (0 when untiled)."""
    tile_batch: int
    """Tiles per UNet call."""
    tiles_per_step: int
    """Tiles covering the canvas (1 when untiled)."""
    vae_tiled: bool
    """Whether the VAE decodes tile by tile (`pipelines.vae.tiling`)."""
    vae_tile_size: int
    """VAE tile edge in latent pixels (0 when the VAE is not tiled)."""
    vae_mode: str
    """How a tiled VAE runs: exact (layer by layer, full-size canvases in host memory) | stream (the
    high-resolution stages tile by tile: bounded memory, more compute) | "" when the VAE is not tiled."""
    est_peak_bytes: int
    """Rough peak device memory, see the module docstring."""
    unet_evals_per_step: int
    """UNet calls per denoising step."""
    vae_host_budget: int | None = None
    """Bytes of canvases a streamed VAE may keep layer by layer (None: stream every stage)."""
    vae_split: Split | None = None
    """The hand-over a streamed decode will use, or the layer-wise run, with its host bytes (None: unknown)."""
    precision: str = ""
    """Which dtype runs, e.g. "bf16 (native bf16 on this CPU)" ("" when not known)."""

    def describe(self) -> str:
        """One human line: size, tiles, tile batches, UNet calls per step, VAE mode, estimated peak."""
        size = f"{self.width}×{self.height}"
        if self.tiled:
            unet = (
                f"{self.tiles_per_step} tiles of {self.tile_size}² latent (overlap {self.overlap}) in batches of "
                f"{self.tile_batch} → {self.unet_evals_per_step} UNet calls/step"
            )
        else:
            n = self.unet_evals_per_step
            unet = f"1 tile (untiled) → {n} UNet call{'' if n == 1 else 's'}/step"
        vae = f"VAE tiled {self.vae_tile_size}² latent ({self.vae_mode}{self._vae_detail()})" if self.vae_tiled \
            else "VAE whole"
        dtype = f"; {self.precision}" if self.precision else ""
        return f"{size}: {unet}; {vae}; est. peak {self.est_peak_bytes / 1e9:.1f} GB{dtype}"

    def _vae_detail(self) -> str:
        split = self.vae_split
        if split is None:
            return ""
        streamed = f"{split.streamed} of {split.stages} stages tile by tile, " if self.vae_mode == "stream" else ""
        return f": {streamed}~{split.host_bytes / 1e9:.1f} GB host"


def weight_bytes(family: str, dtype_bytes: int) -> int:
    """Bytes of UNet + VAE + text-encoder weights (the family's parameter counts, `pipelines.families`)."""
    return int(sum(family_spec(family).costs.params) * dtype_bytes)


def unet_activation_bytes(family: str, latent_px: int, samples: int, dtype_bytes: int) -> int:
    """UNet activation estimate: linear in latent pixels x samples per call (SDPA is memory-linear)."""
    return int(family_spec(family).costs.unet_bytes_per_latent_px * latent_px * samples * dtype_bytes / 2)


def vae_activation_bytes(width: int, height: int, dtype_bytes: int, tile: int | None = None) -> int:
    """VAE decode activations: whole image, or one tile of `tile` latent px plus the whole-latent mid-block."""
    if tile is None:
        return int(VAE_BYTES_PER_OUTPUT_PX * width * height * dtype_bytes / 2)
    side = tile * SCALE
    tile_px = min(side, width) * min(side, height)
    mid = VAE_MID_BYTES_PER_LATENT_PX * (width // SCALE) * (height // SCALE)
    return int((VAE_BYTES_PER_OUTPUT_PX * tile_px + mid) * dtype_bytes / 2)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    """Reject a value outside `choices`."""
    if value not in choices:
        raise ValidationError(field, value, f"must be one of {choices}")


def _validate(width: int, height: int, batch: int, budget_bytes: int | None, family: str, dtype_bytes: int) -> None:
    """Validate the scalar arguments of `plan_generation`."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < SCALE or value % SCALE:
            fix = f"must be a positive multiple of {SCALE}"
            if isinstance(value, int) and value > 0:
                fix += f"; try {value - value % SCALE or SCALE} or {value - value % SCALE + SCALE}"
            raise ValidationError(name, value, fix)
    if not isinstance(batch, int) or batch < 1:
        raise ValidationError("batch", batch, "must be an integer >= 1")
    if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes <= 0):
        raise ValidationError("budget_bytes", budget_bytes, "must be a positive integer (bytes), or None for no limit")
    family_spec(family)  # a known family id
    if dtype_bytes not in (1, 2, 4):
        raise ValidationError("dtype_bytes", dtype_bytes, "must be 1, 2 or 4")


@dataclass(frozen=True)
class TilingAsk:
    """What a request asks of the tiling; None and "auto" leave the choice to the planner (sizes in latent px)."""

    tile_size: int | None = None
    overlap: int | None = None
    tile_batch: int | None = None
    force: Switch = "auto"
    """UNet tiling: auto (when the whole latent does not fit the budget) | on | off."""
    vae_tiling: Switch = "auto"
    vae_tile_size: int | None = None
    vae_mode: VaeMode = "auto"


@dataclass(frozen=True)
class ModelFootprint:
    """What the loaded model takes: its weight bytes and activation scale, its tiled VAE's canvases."""

    weights: int | None = None
    """Bytes of the loaded weights; None = the family's constant (`PARAMS`)."""
    activation_scale: float = 1.0
    """Scales the per-pixel activation constants for models narrower than the real architecture (tiny models)."""
    vae_splits: Sequence[Split] | None = None
    """`pipelines.vae.tiling.decode_splits` at this size: the tiled VAE's canvases per hand-over of its runners."""
    host_budget_bytes: int | None = None
    """Host memory those canvases may take (None = no limit)."""


@dataclass(frozen=True)
class RegionLayout:
    """Regional prompts (`pipelines.request.regions.Region`s) over a `canvas`-sized stage 1."""

    regions: Sequence = ()
    base: str = "rest"
    canvas: tuple[int, int] | None = None


@dataclass(frozen=True)
class PlanInput:
    """One generation to plan: its size and batch, the device budget, the model, what the request asks."""

    width: int
    height: int
    family: str
    """The model family's id (`pipelines.families`): its constants when the model's own sizes are not known."""
    budget_bytes: int | None
    """Device memory the run may take; None = no limit."""
    batch: int = 1
    dtype_bytes: int = 2
    cond_rows: int = 2
    """UNet rows per sample and view: 2 with CFG, 1 + the parts of an AND prompt (`pipelines.prompts.composable`)."""
    tiling: TilingAsk = TilingAsk()
    model: ModelFootprint = ModelFootprint()
    regions: RegionLayout = RegionLayout()


def plan_generation(spec: PlanInput) -> Plan:
    """Choose UNet tiling (MultiDiffusion, Bar-Tal et al. 2023) and VAE tiling so the estimate fits the budget.

    The model's `weights` replace the family's constant. Its `vae_splits` against `host_budget_bytes` pick the
    tiled VAE's mode when `vae_mode` is auto, and how much of it streams; a forced "stream" streams every stage (the
    least host memory). Regions add their views to the UNet calls per step: each over the tiles it touches
    (`pipelines.denoise.regions.views_per_step`).
    """
    _check(spec)
    width, height, family, ask = spec.width, spec.height, spec.family, spec.tiling
    lw, lh = width // SCALE, height // SCALE
    base = _base_bytes(spec)
    unet_full = _unet_bytes(spec, lw * lh, 1)
    tiled = ask.force == "on" or (ask.force == "auto" and _over(base + unet_full, spec.budget_bytes))
    vae_fields, vae_act = _plan_vae(spec, base)
    common = dict(width=width, height=height, batch=spec.batch, **vae_fields)
    if not tiled:
        calls = _region_calls(spec.regions, [Tile(0, 0, lh, lw)], width, height, 1)
        return Plan(**common, tiled=False, tile_size=max(lw, lh), overlap=0, tile_batch=1, tiles_per_step=1,
                    est_peak_bytes=base + max(unet_full, vae_act), unet_evals_per_step=calls or 1)
    size = ask.tile_size if ask.tile_size is not None else family_spec(family).costs.default_tile
    ov = ask.overlap if ask.overlap is not None else min(DEFAULT_OVERLAP, size // 2)
    tiles = plan_tiles(lh, lw, size, ov)
    tile_px = tiles[0].h * tiles[0].w
    tb = min(ask.tile_batch or _pick_tile_batch(spec, tile_px, len(tiles), base), len(tiles))
    return Plan(**common, tiled=True, tile_size=size, overlap=ov, tile_batch=tb, tiles_per_step=len(tiles),
                est_peak_bytes=base + max(_unet_bytes(spec, tile_px, tb), vae_act),
                unet_evals_per_step=_region_calls(spec.regions, tiles, width, height, tb)
                or math.ceil(len(tiles) / tb))


def _check(spec: PlanInput) -> None:
    """Validate what `plan_generation` is given."""
    _validate(spec.width, spec.height, spec.batch, spec.budget_bytes, spec.family, spec.dtype_bytes)
    ask = spec.tiling
    _check_choice("force", ask.force, ("auto", "on", "off"))
    _check_choice("vae_tiling", ask.vae_tiling, ("auto", "on", "off"))
    _check_choice("vae_mode", ask.vae_mode, ("auto", "exact", "stream"))
    if ask.tile_batch is not None and (not isinstance(ask.tile_batch, int) or ask.tile_batch < 1):
        raise ValidationError("tile_batch", ask.tile_batch,
                              "must be an integer >= 1, or None to choose from the budget")


def _base_bytes(spec: PlanInput) -> int:
    """The weights: the loaded model's bytes, else the family's constant."""
    return spec.model.weights if spec.model.weights is not None else weight_bytes(spec.family, spec.dtype_bytes)


def _unet_bytes(spec: PlanInput, latent_px: int, tiles: int) -> int:
    """UNet activations of one call on `tiles` tiles of `latent_px` each, every row of every sample."""
    samples = spec.cond_rows * spec.batch * tiles
    return int(spec.model.activation_scale * unet_activation_bytes(spec.family, latent_px, samples, spec.dtype_bytes))


def _vae_bytes(spec: PlanInput, tile: int | None = None) -> int:
    """VAE decode activations: whole, or one device tile of `tile` latent px (`vae_activation_bytes`)."""
    raw = vae_activation_bytes(spec.width, spec.height, spec.dtype_bytes, tile)
    return int(spec.model.activation_scale * raw)


def _pick_tile_batch(spec: PlanInput, tile_px: int, n_tiles: int, base: int) -> int:
    """Largest tile batch (<= MAX_TILE_BATCH, <= tiles) whose UNet activations fit the budget; at least 1."""
    best = 1
    for tb in range(1, min(MAX_TILE_BATCH, n_tiles) + 1):
        if spec.budget_bytes is None or base + spec.model.activation_scale * unet_activation_bytes(
                spec.family, tile_px, spec.cond_rows * spec.batch * tb, spec.dtype_bytes) <= spec.budget_bytes:
            best = tb
    return best


def _plan_vae(spec: PlanInput, base: int) -> tuple[dict, int]:
    """(the Plan's VAE fields, the VAE's device activations): whole when it fits the budget, else tiled; a tiled
    VAE layer by layer or streamed (`_vae_mode`), a streamed tile as large as the budget allows."""
    ask, budget = spec.tiling, spec.budget_bytes
    lw, lh = spec.width // SCALE, spec.height // SCALE
    vae_full = _vae_bytes(spec)
    vae_tiled = ask.vae_tiling == "on" or (ask.vae_tiling == "auto" and _over(base + vae_full, budget))
    mode, split, host_budget = _vae_mode(vae_tiled, ask.vae_mode, spec.model.vae_splits, spec.model.host_budget_bytes)
    pad = (split.margin if split is not None else STREAM_MARGIN) if mode == "stream" else 0
    vae_tile = (ask.vae_tile_size or DEFAULT_VAE_TILE) if vae_tiled else 0
    if mode == "stream" and ask.vae_tile_size is None:
        # a streamed tile pays its margin on every side, so take the largest tile the budget allows
        fits = [t for t in STREAM_TILES if not _over(base + _vae_bytes(spec, t + 2 * pad), budget)]
        vae_tile = min(fits[0] if fits else DEFAULT_VAE_TILE, max(lw, lh))
    # a streamed tile also carries its context margin on both sides
    vae_act = _vae_bytes(spec, vae_tile + 2 * pad) if vae_tiled else vae_full
    fields = dict(vae_tiled=vae_tiled, vae_tile_size=vae_tile, vae_mode=mode, vae_host_budget=host_budget,
                  vae_split=split)
    return fields, vae_act


def _region_calls(layout: RegionLayout, tiles: list[Tile], width: int, height: int, tile_batch: int) -> int:
    """UNet calls per step of the base prompt and the regions over these tiles; 0 without regions."""
    if not layout.regions:
        return 0
    from pipelines.denoise.regions import views_per_step

    return views_per_step(layout.regions, tiles, width, height, layout.base, tile_batch, layout.canvas)


def _vae_mode(tiled: bool, asked: VaeMode, splits: Sequence[Split] | None, host_budget: int | None
              ) -> tuple[str, Split | None, int | None]:
    """(mode, the split it will use, the host budget to hand the streamed runner): layer by layer when its
    canvases fit the host budget, else streaming as few stages as fit; a forced stream streams them all."""
    if not tiled:
        return "", None, None
    layerwise = splits[-1] if splits else None
    if asked == "exact" or (asked == "auto" and (layerwise is None or not _over(layerwise.host_bytes, host_budget))):
        return "exact", layerwise, None
    budget = host_budget if asked == "auto" else None
    return "stream", choose(splits, budget) if splits else None, budget


def _over(estimate: int, budget: int | None) -> bool:
    """Whether an estimate exceeds the budget (None = no limit)."""
    return budget is not None and estimate > budget


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes: CUDA `mem_get_info`, available RAM on CPU (Linux); None where unknown (MPS, others)."""
    device = torch.device(device)
    if device.type == "cpu":
        return available_ram()
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
