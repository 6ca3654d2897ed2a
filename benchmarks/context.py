"""The loaded model shared by the app and its baselines, and helpers that build the diffusers baselines from it."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import NotMeasured, UNetCounter
from benchmarks.realsize import REAL_MODELS, ensure_real, ensure_taesd
from benchmarks.settings import NEGATIVE, PROMPT, SAMPLER, SEED, Settings, Sizes, sizes_for
from pipelines.denoise.schedulers import make_scheduler
from pipelines.denoise.stages import initial_noise
from pipelines.engine import Engine
from pipelines.models.manager import LoadedModel, ModelManager
from pipelines.models.tiny import TINY_MODELS
from pipelines.request.schema import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Everything a variant needs: the settings, the one loaded model, an engine on it, the UNet counter."""

    settings: Settings
    manager: ModelManager
    engine: Engine
    model: LoadedModel
    model_ref: str  # what requests name as their model (a name, or a folder path)
    sizes: Sizes
    counter: UNetCounter
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eager_unet(self) -> torch.nn.Module:
        """The UNet module itself (inside torch.compile's wrapper when the app compiled it)."""
        return getattr(self.model.unet, "_orig_mod", self.model.unet)

    def cached(self, key: str, make):
        """A value computed once per context (reference decodes, latents)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def request(self, **kw) -> GenerationRequest:
        """A request on the benchmark model with the shared prompt, sampler, CFG and seed; `kw` overrides."""
        base = dict(model=self.model_ref, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=SAMPLER, cfg="7.5",
                    seed=SEED)
        base.update(kw)
        return GenerationRequest(**base)

    def noise(self, width: int, height: int) -> torch.Tensor:
        """The app's initial noise for SEED (`pipelines.denoise.stages.initial_noise`), handed to diffusers as `latents`."""
        shape = (self.model.unet.config.in_channels, height // self.model.vae_scale, width // self.model.vae_scale)
        return initial_noise([SEED], shape, self.device, self.model.dtype)[0]

    def pipeline(self, cls: type, sampler: str = SAMPLER, **more):
        """A diffusers pipeline `cls` built from the loaded components (+ `more`, e.g. a controlnet), with a fresh
        scheduler `sampler`."""
        params = inspect.signature(cls.__init__).parameters
        parts = {k: v for k, v in self.model.pipe.components.items() if k in params}
        parts["unet"] = self.eager_unet  # plain diffusers: never the app's --compile'd UNet
        parts.update(more)
        parts["scheduler"] = make_scheduler(sampler, self.model.pipe.scheduler.config)
        for optional in ("safety_checker", "feature_extractor", "image_encoder"):
            if optional in params:
                parts.setdefault(optional, None)
        missing = [k for k, p in params.items() if k not in parts and k != "self" and p.default is inspect._empty]
        if missing:
            raise NotMeasured(f"{cls.__name__} needs {', '.join(missing)}, which {self.model.name} does not have")
        extra = {"requires_safety_checker": False, "add_watermarker": False}
        pipe = cls(**parts, **{k: v for k, v in extra.items() if k in params})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def family_pipeline(self, sd: type, sdxl: type, sampler: str = SAMPLER):
        """The SD or SDXL flavour of a diffusers pipeline, matching the loaded model."""
        return self.pipeline(sdxl if self.model.spec.pooled else sd, sampler)


@contextlib.contextmanager
def diffusers_vae_tiling(vae, latent_tile: int, overlap_factor: float = 0.25):
    """`vae.enable_tiling()` with `latent_tile` latent px (x8 image px) tiles; restores the VAE afterwards."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = latent_tile, latent_tile * 8
    vae.tile_overlap_factor = overlap_factor
    try:
        yield vae
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


def _locate(settings: Settings) -> tuple[Path, str, bool]:
    """(ModelManager models folder, what requests name as the model, whether that is a path)."""
    root = settings.resolved_cache() / "models"
    if settings.model in TINY_MODELS:
        return root / "tiny", settings.model, False
    if settings.model in REAL_MODELS:
        models_dir = root / settings.model
        ensure_real(settings.model, models_dir)  # models_dir/<name> is a local model: loads by its name
        return models_dir, settings.model, False
    path = Path(settings.model).expanduser()
    if not (path / "model_index.json").exists():
        raise SystemExit(f"error: `--model` must be tiny, tiny-sdxl, sd15-random, sdxl-random or a diffusers "
                         f"folder (with model_index.json), got {settings.model!r}")
    models_dir = root / "local"
    # A random-weight TAESD where ModelManager looks, so the TAESD row runs offline (speed only).
    ensure_taesd(models_dir, sdxl="text_encoder_2" in json.loads((path / "model_index.json").read_text()))
    return models_dir, str(path.resolve()), True


def load_context(settings: Settings) -> Context:
    """Load the benchmark model once through the app's ModelManager, with the requested dtype/attention/compile."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    models_dir, ref, is_path = _locate(settings)
    device = "cuda" if settings.device == "auto" and torch.cuda.is_available() else settings.device
    device = "cpu" if device == "auto" else device
    app_compile = settings.compile and settings.compile_mode == "default"  # the app's own --compile path
    manager = ModelManager(models_dir, device=device, dtype=settings.dtype, attention=settings.attention,
                           compile_unet=app_compile)
    model = manager.get(ref, allow_paths=is_path)
    unet = getattr(model.unet, "_orig_mod", model.unet)
    if settings.channels_last:  # module-level options apply to both sides (they share the modules)
        unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if settings.fuse_qkv:
        unet.fuse_qkv_projections()
        model.vae.fuse_qkv_projections()
    if settings.compile and not app_compile:  # other modes: compiled here, for the app side only, like --compile
        model.pipe.unet = torch.compile(unet, mode=settings.compile_mode, dynamic=False)
    engine = Engine(manager, None, allow_paths=is_path)
    return Context(settings=settings, manager=manager, engine=engine, model=model, model_ref=ref,
                   sizes=sizes_for(settings, model.family), counter=UNetCounter(model.unet))
