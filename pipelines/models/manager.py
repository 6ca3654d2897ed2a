"""The one owner of devices, dtypes and weights.

A model name resolves to one of: a built-in tiny model, an allow-listed hub id (the catalogue), a diffusers
folder or a single `.safetensors` checkpoint inside the local `models/` folder. Names coming from the UI or
API never reach the file system unless they are in that list (`allow_paths` is for the CLI only).
Nothing here runs at import time: no device probing, no downloads.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError, ValidationError
from pipelines.families.base import Family
from pipelines.families.registry import family as family_spec
from pipelines.models.caches import WeightCaches
from pipelines.models.loading import (
    DTYPES,
    Source,
    family_of_pipe,
    file_hash,
    hub_error,
    load_pipeline,
    load_taesd,
    load_tokenizer,
    offline,
    pick_device,
    warm_up,
)
from pipelines.models.tiny import TINY_MODELS
from pipelines.optional import require
from pipelines.request.schema import DEFAULT_MODEL
from pipelines.request.validation import parse_lora

log = logging.getLogger(__name__)

# Allow-listed hub models: short name or hub id -> (hub id, family).
CATALOGUE: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: (DEFAULT_MODEL, "sd1"),
    "Lykon/dreamshaper-8": ("Lykon/dreamshaper-8", "sd1"),
    "SimianLuo/LCM_Dreamshaper_v7": ("SimianLuo/LCM_Dreamshaper_v7", "sd1"),
    "stabilityai/stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1", "sd2"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
}
LORA_CATALOGUE = {
    "lcm-lora-sdv1-5": "latent-consistency/lcm-lora-sdv1-5",
    "lcm-lora-sdxl": "latent-consistency/lcm-lora-sdxl",
}
# One load at a time per process: managers of several workers (`pipelines.serving.workers`) loading at once crashed in
# from_pretrained ("Cannot copy out of meta tensor"): its empty-weights initialisation is process-wide state.
LOAD_LOCK = threading.RLock()


@dataclass
class LoadedModel:
    """A loaded pipeline's components plus what the engine needs to know about them."""

    name: str
    source: Source
    family: str  # sd1 | sd2 | sdxl
    pipe: Any  # the diffusers pipeline holding the components (used for LoRA, offload, baselines)
    device: Any
    dtype: Any
    taesd: Any = None
    loras: tuple[str, ...] = ()
    _hash: str | None = field(default=None, repr=False)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def spec(self) -> Family:
        """The family's interface (`pipelines.families`): conditioning, added conditioning, files, costs."""
        return family_spec(self.family)

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if t is not None]

    @property
    def native_size(self) -> int:
        """The training resolution in pixels (512 SD1, 768 SD2 v-prediction, 1024 SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def short_hash(self) -> str:
        """A1111-style model hash: first 10 hex digits of the sha256 of the weights file."""
        if self._hash is None:
            self._hash = file_hash(_weights_file(self))
        return self._hash


def _weights_file(model: LoadedModel) -> Path | None:
    if model.source.kind == "file":
        return Path(model.source.ref)
    folder = getattr(model.pipe, "name_or_path", None) or getattr(model.pipe.config, "_name_or_path", None)
    if folder and Path(folder).is_dir():
        files = sorted((Path(folder) / "unet").glob("*.safetensors"))
        return files[0] if files else None
    return None


class ModelManager:
    """Loads, caches and swaps models; holds at most one pipeline in device memory at a time."""

    def __init__(
        self,
        models_dir: Path | str = "models",
        *,
        device: str | None = None,
        dtype: str | None = None,
        attention: str = "sdpa",
        compile_unet: bool = False,
        offload: bool = False,
        warmup: bool = True,
    ):
        self.models_dir = Path(models_dir)
        self._device_arg, self._dtype_arg = device, dtype
        self.attention, self.compile_unet, self.offload = attention, compile_unet, offload
        if attention == "xformers":
            require("xformers")  # at startup: one line naming the package, never a traceback at the first request
        self.warmup = warmup
        self._current: LoadedModel | None = None
        self._tokenizers: dict[str, Any] = {}
        self.caches = WeightCaches()  # ControlNets, annotators, upscalers: bounded, freed by unload()
        self._lock = threading.RLock()
        self._device = None

    # ------------------------------------------------------------- devices
    @property
    def device_dtype(self):
        if self._device is None:
            self._device = pick_device(self._device_arg, self._dtype_arg)
        return self._device

    # ------------------------------------------------------------- names
    def local_models(self) -> list[str]:
        """Diffusers folders and .safetensors checkpoints directly inside models/."""
        if not self.models_dir.is_dir():
            return []
        out = []
        for p in sorted(self.models_dir.iterdir()):
            if p.is_dir() and (p / "model_index.json").exists() or p.is_file() and p.suffix == ".safetensors":
                out.append(p.name)
        return out

    def list_models(self) -> list[str]:
        """Every name the UI/API may pick: tiny models, the catalogue, and local models."""
        return [*TINY_MODELS, *CATALOGUE, *self.local_models()]

    def resolve(self, name: str, *, allow_paths: bool = False) -> Source:
        """Map a model name to its source, or raise a ValidationError listing the choices."""
        if not isinstance(name, str) or not name.strip():
            raise ValidationError("model", name, "must name a model")
        name = name.strip()
        if name in TINY_MODELS:
            return Source("tiny", name, "sdxl" if name.startswith("tiny-sdxl") else "sd1")
        if name in CATALOGUE:
            hub_id, family = CATALOGUE[name]
            return Source("hub", hub_id, family)
        if name in self.local_models():
            path = self.models_dir / name
            return Source("folder" if path.is_dir() else "file", str(path))
        if allow_paths:
            path = Path(name).expanduser()
            if path.is_dir() and (path / "model_index.json").exists():
                return Source("folder", str(path))
            if path.is_file():
                if path.suffix != ".safetensors":
                    raise ValidationError("model", name, "must be a .safetensors file (pickled .ckpt files are unsafe)")
                return Source("file", str(path))
            if path.exists():
                raise ValidationError("model", name, "is neither a diffusers folder nor a .safetensors file")
        choices = ", ".join(self.list_models())
        raise ValidationError("model", name, f"is not a known model; choose one of: {choices} (or put it in {self.models_dir}/)")

    # ------------------------------------------------------------- loading
    def get(self, name: str, *, loras: tuple[str, ...] = (), allow_paths: bool = False) -> LoadedModel:
        """The loaded model `name` with `loras` applied; loads (and evicts the previous one) if needed."""
        with self._lock:
            cur = self._current
            if cur is None or cur.name != name:
                self.unload()
                with LOAD_LOCK:
                    cur = self._current = self._load(name, self.resolve(name, allow_paths=allow_paths))
                self._tokenizers[name] = cur.tokenizers[0]  # the token counter keeps it after a switch
            if cur.loras != tuple(loras):
                with LOAD_LOCK:
                    self._apply_loras(cur, tuple(loras))
            return cur

    def unload(self) -> None:
        """Drop the current model and the cached ControlNets, annotators and upscalers; free their device memory."""
        import torch

        with self._lock:
            self._current = None
            self.caches.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load(self, name: str, src: Source) -> LoadedModel:
        device, dtype = self.device_dtype
        log.info("loading model %s (%s) on %s %s", name, src.kind, device, dtype)
        pipe = load_pipeline(name, src, self.models_dir, dtype)
        family = src.family or family_of_pipe(pipe)
        self._configure(pipe, device)
        taesd = load_taesd(src, family, self.models_dir, device, dtype)
        model = LoadedModel(name=name, source=src, family=family, pipe=pipe, device=device, dtype=dtype, taesd=taesd)
        if self.warmup:
            warm_up(model)
        return model

    def _configure(self, pipe, device) -> None:
        import torch

        pipe.set_progress_bar_config(disable=True)
        if self.offload and device.type == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
        if self.attention == "xformers":
            require("xformers")
            try:
                pipe.enable_xformers_memory_efficient_attention()
            except Exception as exc:  # installed but unsupported here (e.g. no CUDA): fall back, say so
                log.warning("xformers requested but unavailable (%s); using PyTorch SDPA", exc)
        if self.compile_unet:
            pipe.unet = torch.compile(pipe.unet, dynamic=False)

    def availability(self, name: str) -> str | None:
        """None when `name` can load without the network; otherwise a sentence saying what must be fetched."""
        try:
            src = self.resolve(name)
        except ValidationError as exc:
            return str(exc)
        if src.kind != "hub":
            return None
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(src.ref, "model_index.json"), str):
            return None
        where = "the hub is switched off (HF_HUB_OFFLINE)" if offline() else "it needs network access"
        return (f"{src.ref} is not downloaded yet and {where}: the first generation will fail with 'could not "
                f"download' unless it can be fetched. Use --model tiny to try the app, or put a model in "
                f"{self.models_dir}/.")

    def auxiliary_bytes(self) -> int:
        """Bytes of the cached ControlNets, annotators and upscalers on this manager's device (parameters and
        buffers), which the planner adds to the pipeline's own weights."""
        return self.caches.resident_bytes(self.device_dtype[0])

    @property
    def current(self) -> LoadedModel | None:
        """The loaded model, if any (for previews; never loads)."""
        return self._current

    def tokenizer(self, name: str):
        """The first tokenizer of model `name` without loading its weights; None where it cannot be had."""
        if self._current is not None and self._current.name == name:
            return self._current.tokenizers[0]
        if name in self._tokenizers:
            return self._tokenizers[name]
        tok = None
        try:
            tok = load_tokenizer(self.resolve(name), self.models_dir)
        except Exception as exc:  # the counter is advisory; say why once in the log
            log.info("no tokenizer for %s yet (%s)", name, str(exc).splitlines()[0][:120] if str(exc) else exc)
        self._tokenizers[name] = tok
        return tok

    # ------------------------------------------------------------- LoRA
    def lora_path(self, name: str) -> str:
        """Resolve a LoRA name: models/lora/<name>.safetensors, or an allow-listed hub LoRA."""
        local = self.models_dir / "lora" / f"{name}.safetensors"
        if "/" in name or "\\" in name or ".." in name:
            raise ValidationError("loras", name, "must be a LoRA name from models/lora or the catalogue, not a path")
        if local.is_file():
            return str(local)
        if name in LORA_CATALOGUE:
            return LORA_CATALOGUE[name]
        have = [p.stem for p in (self.models_dir / "lora").glob("*.safetensors")] + list(LORA_CATALOGUE)
        raise ValidationError("loras", name, f"is not a known LoRA; choose one of: {', '.join(have)}")

    def _apply_loras(self, model: LoadedModel, loras: tuple[str, ...]) -> None:
        pipe = model.pipe
        if model.loras:
            pipe.unload_lora_weights()
        model.loras = ()
        names, weights = [], []
        for i, spec in enumerate(loras):
            name, weight = parse_lora(spec)
            ref = self.lora_path(name)
            adapter = f"lora{i}"
            try:
                if os.path.isfile(ref):
                    pipe.load_lora_weights(os.path.dirname(ref), weight_name=os.path.basename(ref), adapter_name=adapter)
                else:
                    pipe.load_lora_weights(ref, adapter_name=adapter, local_files_only=offline())
            except Exception as exc:
                if os.path.isfile(ref):
                    raise ModelError(f"could not load LoRA {name}: {str(exc).splitlines()[0][:200]}") from exc
                raise hub_error(ref, exc) from exc
            names.append(adapter)
            weights.append(weight)
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        model.loras = loras

