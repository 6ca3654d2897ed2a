"""The one owner of devices, dtypes and weights.

A model name resolves to one of: a built-in tiny model, an allow-listed hub id (the catalogue), a diffusers
folder or a single `.safetensors` checkpoint inside the local `models/` folder. Names coming from the UI or
API never reach the file system unless they are in that list (`allow_paths` is for the CLI only).
Nothing here runs at import time: no device probing, no downloads.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError, OfflineError, ValidationError
from pipelines.optional import require
from pipelines.request import DEFAULT_MODEL, parse_lora
from pipelines.models.tiny import TINY_MODELS, ensure_tiny

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
TAESD_CATALOGUE = {"sd1": "madebyollin/taesd", "sd2": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
# Single-file checkpoints need component configs; these hub ids provide them (from the local HF cache offline).
SINGLE_FILE_CONFIGS = {"sd1": DEFAULT_MODEL, "sd2": "stabilityai/stable-diffusion-2-1",
                       "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# One load at a time per process: managers of several workers (`pipelines.serving.workers`) loading at once crashed in
# from_pretrained ("Cannot copy out of meta tensor"): its empty-weights initialisation is process-wide state.
LOAD_LOCK = threading.RLock()


@dataclass(frozen=True)
class Source:
    """Where a model comes from: kind is tiny | hub | folder | file."""

    kind: str
    ref: str
    family: str | None = None


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
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

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
            self._hash = _file_hash(_weights_file(self))
        return self._hash


def _weights_file(model: LoadedModel) -> Path | None:
    if model.source.kind == "file":
        return Path(model.source.ref)
    folder = getattr(model.pipe, "name_or_path", None) or getattr(model.pipe.config, "_name_or_path", None)
    if folder and Path(folder).is_dir():
        files = sorted((Path(folder) / "unet").glob("*.safetensors"))
        return files[0] if files else None
    return None


def _file_hash(path: Path | None) -> str:
    if path is None or not path.exists():
        return "unknown"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:10]


def pick_device(device: str | None = None, dtype: str | None = None):
    """Choose (torch.device, torch.dtype): CUDA fp16, MPS fp16, else CPU fp32; either can be overridden."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dtype in (None, "auto"):
        dtype = "fp32" if dev.type == "cpu" else "fp16"
    if dtype not in DTYPES:
        raise ValidationError("dtype", dtype, f"must be one of {', '.join(DTYPES)} or auto")
    return dev, getattr(torch, DTYPES[dtype])


def _family_of_file(path: Path) -> str:
    """Guess the architecture of an original-format checkpoint from its tensor names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises several types for a broken file
        raise ModelError(f"could not read model file {path.name}: not a valid .safetensors checkpoint ({exc})") from exc
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    raise ModelError(f"{path.name} is not a Stable Diffusion checkpoint (no UNet weights found)")


def _family_of_pipe(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    hidden = getattr(getattr(pipe, "text_encoder", None), "config", None)
    return "sd2" if hidden is not None and getattr(hidden, "hidden_size", 768) == 1024 else "sd1"


def _is_download_error(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it came from) is a failed or refused hub download."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    seen: BaseException | None = exc
    for _ in range(8):  # walk __cause__/__context__, bounded
        if seen is None:
            return False
        if isinstance(seen, kinds) or type(seen).__module__.split(".")[0] in ("httpx", "requests", "urllib3"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_error(name: str, exc: Exception) -> OfflineError:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return OfflineError(
        f"could not download {name} (offline?): {reason}. Put the model in models/ or choose 'tiny' to try the app."
    )


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
        """Drop the current model and free its device memory."""
        import torch

        with self._lock:
            self._current = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load(self, name: str, src: Source) -> LoadedModel:
        from diffusers import DiffusionPipeline

        device, dtype = self.device_dtype
        log.info("loading model %s (%s) on %s %s", name, src.kind, device, dtype)
        try:
            if src.kind == "tiny":
                folder = ensure_tiny(src.ref)
                pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
            elif src.kind == "folder":
                pipe = DiffusionPipeline.from_pretrained(src.ref, dtype=dtype, local_files_only=True)
            elif src.kind == "file":
                pipe = self._load_single_file(Path(src.ref), dtype)
            else:
                pipe = self._from_hub(src.ref, dtype)
        except (ModelError, ValidationError):
            raise
        except Exception as exc:
            raise ModelError(f"could not load model {name}: {str(exc).splitlines()[0][:300]}") from exc
        family = src.family or _family_of_pipe(pipe)
        self._configure(pipe, device)
        taesd = self._load_taesd(src, family, device, dtype)
        model = LoadedModel(name=name, source=src, family=family, pipe=pipe, device=device, dtype=dtype, taesd=taesd)
        if self.warmup:
            warm_up(model)
        return model

    def _from_hub(self, hub_id: str, dtype):
        from diffusers import DiffusionPipeline

        try:
            return DiffusionPipeline.from_pretrained(hub_id, dtype=dtype, local_files_only=_offline())
        except Exception as exc:
            raise _hub_error(hub_id, exc) from exc

    def _load_single_file(self, path: Path, dtype):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        family = _family_of_file(path)
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        local_cfg = self.models_dir / "configs" / family
        config = str(local_cfg) if local_cfg.is_dir() else SINGLE_FILE_CONFIGS[family]
        try:
            return cls.from_single_file(str(path), config=config, dtype=dtype, local_files_only=_offline())
        except Exception as exc:
            if not local_cfg.is_dir() and _is_download_error(exc):
                raise OfflineError(
                    f"could not load {path.name}: its {family} component configs come from {config} "
                    f"(could not download, offline?). Put a diffusers config folder at {local_cfg}."
                ) from exc
            raise ModelError(f"could not load {path.name}: {str(exc).splitlines()[0][:300]}") from exc

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

    def _load_taesd(self, src: Source, family: str, device, dtype):
        """TAESD for previews and draft decodes: tiny models ship one; real ones look in models/ then the hub."""
        from diffusers import AutoencoderTiny

        candidates: list[tuple[str, dict]] = []
        if src.kind == "tiny":
            candidates.append((str(ensure_tiny(src.ref) / "taesd"), {"local_files_only": True}))
        else:
            local = self.models_dir / ("taesdxl" if family == "sdxl" else "taesd")
            if local.is_dir():
                candidates.append((str(local), {"local_files_only": True}))
            candidates.append((TAESD_CATALOGUE[family], {"local_files_only": _offline()}))
        for ref, kwargs in candidates:
            try:
                return AutoencoderTiny.from_pretrained(ref, dtype=dtype, **kwargs).to(device)
            except Exception as exc:
                log.warning("TAESD not available from %s (%s); previews and taesd decode are off", ref, exc)
        return None

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
        where = "the hub is switched off (HF_HUB_OFFLINE)" if _offline() else "it needs network access"
        return (f"{src.ref} is not downloaded yet and {where}: the first generation will fail with 'could not "
                f"download' unless it can be fetched. Use --model tiny to try the app, or put a model in "
                f"{self.models_dir}/.")

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
        from transformers import CLIPTokenizer

        tok = None
        try:
            src = self.resolve(name)
            if src.kind == "tiny":
                tok = CLIPTokenizer.from_pretrained(ensure_tiny(src.ref) / "tokenizer")
            elif src.kind == "folder":
                tok = CLIPTokenizer.from_pretrained(Path(src.ref) / "tokenizer")
            elif src.kind == "hub":
                tok = CLIPTokenizer.from_pretrained(src.ref, subfolder="tokenizer", local_files_only=_offline())
            elif src.kind == "file":  # the tokenizer of the configs the file will be loaded with
                family = _family_of_file(Path(src.ref))
                local_cfg = self.models_dir / "configs" / family
                if local_cfg.is_dir():
                    tok = CLIPTokenizer.from_pretrained(local_cfg / "tokenizer")
                else:
                    tok = CLIPTokenizer.from_pretrained(SINGLE_FILE_CONFIGS[family], subfolder="tokenizer",
                                                        local_files_only=_offline())
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
                    pipe.load_lora_weights(ref, adapter_name=adapter, local_files_only=_offline())
            except Exception as exc:
                if os.path.isfile(ref):
                    raise ModelError(f"could not load LoRA {name}: {str(exc).splitlines()[0][:200]}") from exc
                raise _hub_error(ref, exc) from exc
            names.append(adapter)
            weights.append(weight)
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        model.loras = loras


def warm_up(model: LoadedModel) -> None:
    """One tiny UNet + VAE call after loading: CUDA kernels, cuDNN plans and allocator pools get set up before the
    user's first request (and a torch.compile'd UNet compiles its smallest graph)."""
    import torch

    with torch.no_grad():
        _warm_up(model)


def _warm_up(model: LoadedModel) -> None:
    import torch

    unet, vae = model.unet, model.vae
    h = w = 8
    x = torch.zeros(2, unet.config.in_channels, h, w, device=model.device, dtype=model.dtype)
    enc = torch.zeros(2, 77, unet.config.cross_attention_dim, device=model.device, dtype=model.dtype)
    added = None
    if model.is_sdxl:
        pooled = model.pipe.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.zeros(2, pooled, device=model.device, dtype=model.dtype),
                 "time_ids": torch.zeros(2, 6, device=model.device, dtype=model.dtype)}
    t0 = time.perf_counter()
    t = torch.tensor(999.0, device=model.device)  # a tensor, like the loop passes: a compiled UNet compiles once
    unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added)
    vae.decode(x[:1, :vae.config.latent_channels].to(vae.dtype))  # an inpainting UNet takes 9 channels
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    log.info("warm-up of %s took %.2fs", model.name, time.perf_counter() - t0)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
