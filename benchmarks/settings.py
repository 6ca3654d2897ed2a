"""What one benchmark run measures: the command-line settings and the image sizes / steps of every case."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

CASES = ("txt2img", "tiled", "vae", "taesd", "prompt-cache", "guidance", "ultra", "feature-cache", "throughput")
BUILTIN_MODELS = ("tiny", "tiny-sdxl", "sd15-random", "sdxl-random")
PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, detailed"  # no A1111 weights: diffusers reads it alike
NEGATIVE = "blurry, lowres"
SAMPLER = "DPM++ 2M"
CFG = 7.5
INTERVAL_CFG = "interval(7.5,0.25,0.65)"
SEED = 1234


@dataclass(frozen=True)
class Settings:
    """One `python -m benchmarks` invocation (picklable: memory children rebuild everything from it)."""

    device: str = "auto"
    """auto | cpu | cuda (auto: cuda when available)."""
    model: str = "tiny"
    """tiny | tiny-sdxl | sd15-random | sdxl-random | a local diffusers folder."""
    dtype: str = "auto"
    """auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32; app and baselines share the weights, so the dtype."""
    attention: str = "sdpa"
    """sdpa | xformers (set on the shared components, so on both sides)."""
    quick: bool = False
    """Small sizes, few steps and repeats: a few minutes on 2 CPU cores with the tiny model."""
    size_scale: float = 1.0
    """Multiplies every image size (and tile size) after quick/full sizes are chosen; for the test suite."""
    cases: tuple[str, ...] = CASES
    """Which case groups to run (see CASES)."""
    warmup: int = 1
    """Warm-up runs per measurement (with at most 2 steps: same shapes, so same kernels/graphs)."""
    repeats: int = 5
    """Timed runs per measurement; the median is reported."""
    budget_s: float = 120.0
    """Stop repeating a measurement once its timed runs took this long (at least one timed run)."""
    memory: str = "auto"
    """auto | subprocess | inprocess | off. auto: CUDA max_memory_allocated in process; CPU: a fresh process each."""
    channels_last: bool = False
    """UNet and VAE in channels_last memory format (both sides share them)."""
    compile: bool = False
    """torch.compile the app's UNet (as `app.py --compile` does); baselines keep the eager module ("plain
    diffusers"). Warm-up runs absorb the compilation."""
    compile_mode: str = "default"
    """default (the app's ModelManager path) | reduce-overhead (CUDA graphs) | max-autotune."""
    fuse_qkv: bool = False
    """`fuse_qkv_projections()` on the UNet and VAE (both sides share them)."""
    tile_batch: int | None = None
    """Tiles per UNet call in the tiled case; None = 4 (the issue's setting)."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default (one per core). On a CPU shared with other jobs, 1 thread gives steadier
    figures: with 2 OpenMP threads every small op waits for a thread the OS may have descheduled."""
    cache_dir: str = ""
    """Where random-weight real-size models are written; default TESSERA_CACHE or ~/.cache/tessera, + /benchmarks."""

    def resolved_cache(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera") / "benchmarks"


@dataclass(frozen=True)
class Sizes:
    """Image sizes in pixels, tile sizes in latent pixels, step counts for each case."""

    native: int
    steps: int
    tiled: int
    tiled_steps: int
    tile: int | None  # None = the planner's default (96 SD1, 128 SDXL)
    overlap: int | None
    tile_batch: int
    vae: int
    vae_tile: int
    ultra: int  # final size of the two-stage ultra run (the draft is ultra / hires_scale)
    ultra_steps: int | None  # None = the preset's
    ultra_hires_steps: int | None
    ultra_tile: int | None
    ultra_overlap: int | None

    def for_warmup(self) -> Sizes:
        """Same shapes, at most 2 steps: warms kernels, caches and compiled graphs without the full cost."""
        def few(n):
            return None if n is None else min(n, 2)

        return replace(self, steps=few(self.steps), tiled_steps=few(self.tiled_steps),
                       ultra_steps=few(self.ultra_steps) or 2, ultra_hires_steps=few(self.ultra_hires_steps) or 2)


def _px(value: float, scale: float, minimum: int = 64) -> int:
    return max(minimum, int(round(value * scale / 8)) * 8)


def _lat(value: int | None, scale: float) -> int | None:
    return None if value is None else max(16, int(round(value * scale)))


def sizes_for(settings: Settings, family: str) -> Sizes:
    """Full sizes follow the issue (512²/1024² native, 2048² tiled and VAE, 4096² ultra); quick ones fit a CPU."""
    sdxl = family == "sdxl"
    if settings.quick:
        base = Sizes(native=256, steps=6, tiled=576, tiled_steps=2, tile=48, overlap=16, tile_batch=4, vae=768,
                     vae_tile=32, ultra=512, ultra_steps=4, ultra_hires_steps=2, ultra_tile=48, ultra_overlap=16)
    else:
        base = Sizes(native=1024 if sdxl else 512, steps=20, tiled=2048, tiled_steps=20, tile=None, overlap=None,
                     tile_batch=4, vae=2048, vae_tile=64, ultra=4096, ultra_steps=None, ultra_hires_steps=None,
                     ultra_tile=None, ultra_overlap=None)
    if settings.tile_batch:
        base = replace(base, tile_batch=settings.tile_batch)
    s = settings.size_scale
    if s == 1.0:
        return base
    return replace(
        base, native=_px(base.native, s), tiled=_px(base.tiled, s), vae=_px(base.vae, s),
        ultra=max(_px(base.ultra, s), 256),  # the draft (ultra / 4) must stay >= 64 px
        tile=_lat(base.tile, s), overlap=None if base.overlap is None else max(4, int(base.overlap * s)),
        vae_tile=_lat(base.vae_tile, s), ultra_tile=_lat(base.ultra_tile, s),
        ultra_overlap=None if base.ultra_overlap is None else max(4, int(base.ultra_overlap * s)),
    )
