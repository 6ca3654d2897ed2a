"""Loading what `ModelManager.resolve` names: pipelines (tiny, folder, single file, hub), TAESD, tokenizers;
the architecture family of a checkpoint; hub errors; the device/dtype choice; the post-load warm-up.

Pure loaders: no caches and no state here (the manager keeps what is loaded). Nothing runs at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.families.registry import family as family_spec
from pipelines.families.registry import family_of_checkpoint, family_of_pipeline
from pipelines.errors import ModelError, OfflineError, ValidationError
from pipelines.models.tiny import ensure_tiny
from pipelines.request.schema import DEFAULT_MODEL

log = logging.getLogger(__name__)

# Single-file checkpoints need component configs; these hub ids provide them (from the local HF cache offline).
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Source:
    """Where a model comes from: kind is tiny | hub | folder | file."""

    kind: str
    ref: str
    family: str | None = None


def native_bf16() -> bool:
    """Whether torch reports native bf16 matmuls on this CPU: oneDNN present and AVX512-BF16 or AMX tiles."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):  # a torch without these probes: assume none
        return False


def pick_device(device: str | None = None, dtype: str | None = None):
    """Choose (torch.device, torch.dtype): CUDA fp16, MPS fp16, a CPU with native bf16 (`native_bf16`) bf16, else
    CPU fp32; either can be overridden."""
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
        dtype = ("bf16" if native_bf16() else "fp32") if dev.type == "cpu" else "fp16"
    if dtype not in DTYPES:
        raise ValidationError("dtype", dtype, f"must be one of {', '.join(DTYPES)} or auto")
    return dev, getattr(torch, DTYPES[dtype])


def precision_label(device, dtype, vae_dtype=None) -> str:
    """The plan line's dtype note, e.g. "bf16 (native bf16 on this CPU)" or "UNet + text bf16, VAE fp32"."""
    names = {v: k for k, v in DTYPES.items()}
    name = names.get(str(dtype).removeprefix("torch."), str(dtype))
    vae = names.get(str(vae_dtype).removeprefix("torch."), name) if vae_dtype is not None else name
    text = name if vae == name else f"UNet + text {name}, VAE {vae}"
    if getattr(device, "type", device) == "cpu":
        text += " (native bf16 on this CPU)" if native_bf16() else " (no native bf16 on this CPU)"
    return text


def file_hash(path: Path | None) -> str:
    """A1111-style model hash: the first 10 hex digits of the file's sha256 ("unknown" without a file)."""
    if path is None or not path.exists():
        return "unknown"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:10]


def family_of_file(path: Path) -> str:
    """The family id of an original-format checkpoint, from its tensor names (`pipelines.families`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises several types for a broken file
        raise ModelError(f"could not read model file {path.name}: not a valid .safetensors checkpoint ({exc})") from exc
    return family_of_checkpoint(keys, path.name).name


def family_of_pipe(pipe) -> str:
    """The family id of a loaded pipeline (`pipelines.families`)."""
    return family_of_pipeline(pipe).name


def is_download_error(exc: BaseException) -> bool:
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


def hub_error(name: str, exc: Exception) -> OfflineError:
    """The one-line error for a hub model that could not be fetched."""
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return OfflineError(
        f"could not download {name} (offline?): {reason}. Put the model in models/ or choose 'tiny' to try the app."
    )


def offline() -> bool:
    """True when HF_HUB_OFFLINE switches the hub off."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_pipeline(name: str, src: Source, models_dir: Path, dtype) -> Any:
    """The diffusers pipeline of `src` in `dtype` on the CPU; every failure is a ModelError or OfflineError."""
    from diffusers import DiffusionPipeline

    try:
        if src.kind == "tiny":
            return DiffusionPipeline.from_pretrained(ensure_tiny(src.ref), dtype=dtype, local_files_only=True)
        if src.kind == "folder":
            return DiffusionPipeline.from_pretrained(src.ref, dtype=dtype, local_files_only=True)
        if src.kind == "file":
            return load_single_file(Path(src.ref), models_dir, dtype)
        try:
            return DiffusionPipeline.from_pretrained(src.ref, dtype=dtype, local_files_only=offline())
        except Exception as exc:
            raise hub_error(src.ref, exc) from exc
    except (ModelError, ValidationError):
        raise
    except Exception as exc:
        raise ModelError(f"could not load model {name}: {str(exc).splitlines()[0][:300]}") from exc


def load_single_file(path: Path, models_dir: Path, dtype) -> Any:
    """An original-format checkpoint, with component configs from models/configs/<family> or the hub."""
    import diffusers

    family = family_of_file(path)
    cls = getattr(diffusers, family_spec(family).pipeline_class)
    local_cfg = models_dir / "configs" / family
    config = str(local_cfg) if local_cfg.is_dir() else family_spec(family).single_file_config
    try:
        return cls.from_single_file(str(path), config=config, dtype=dtype, local_files_only=offline())
    except Exception as exc:
        if not local_cfg.is_dir() and is_download_error(exc):
            raise OfflineError(
                f"could not load {path.name}: its {family} component configs come from {config} "
                f"(could not download, offline?). Put a diffusers config folder at {local_cfg}."
            ) from exc
        raise ModelError(f"could not load {path.name}: {str(exc).splitlines()[0][:300]}") from exc


def load_taesd(src: Source, family: str, models_dir: Path, device, dtype) -> Any:
    """TAESD for previews and draft decodes: tiny models ship one; real ones look in models/ then the hub."""
    from diffusers import AutoencoderTiny

    candidates: list[tuple[str, dict]] = []
    if src.kind == "tiny":
        candidates.append((str(ensure_tiny(src.ref) / "taesd"), {"local_files_only": True}))
    else:
        hub, folder = family_spec(family).taesd
        local = models_dir / folder
        if local.is_dir():
            candidates.append((str(local), {"local_files_only": True}))
        candidates.append((hub, {"local_files_only": offline()}))
    for ref, kwargs in candidates:
        try:
            return AutoencoderTiny.from_pretrained(ref, dtype=dtype, **kwargs).to(device)
        except Exception as exc:
            log.warning("TAESD not available from %s (%s); previews and taesd decode are off", ref, exc)
    return None


def load_tokenizer(src: Source, models_dir: Path) -> Any:
    """The first CLIP tokenizer of `src` without its weights (a file model: that of the configs it loads with)."""
    from transformers import CLIPTokenizer

    if src.kind == "tiny":
        return CLIPTokenizer.from_pretrained(ensure_tiny(src.ref) / "tokenizer")
    if src.kind == "folder":
        return CLIPTokenizer.from_pretrained(Path(src.ref) / "tokenizer")
    if src.kind == "hub":
        return CLIPTokenizer.from_pretrained(src.ref, subfolder="tokenizer", local_files_only=offline())
    if src.kind == "file":
        family = family_of_file(Path(src.ref))
        local_cfg = models_dir / "configs" / family
        if local_cfg.is_dir():
            return CLIPTokenizer.from_pretrained(local_cfg / "tokenizer")
        return CLIPTokenizer.from_pretrained(family_spec(family).single_file_config, subfolder="tokenizer",
                                             local_files_only=offline())
    return None


def warm_up(model) -> None:
    """One tiny UNet + VAE call after loading: CUDA kernels, cuDNN plans and allocator pools get set up before the
    user's first request (and a torch.compile'd UNet compiles its smallest graph)."""
    import torch

    with torch.no_grad():
        _warm_up(model)


def _warm_up(model) -> None:
    import torch

    unet, vae = model.unet, model.vae
    h = w = 8
    x = torch.zeros(2, unet.config.in_channels, h, w, device=model.device, dtype=model.dtype)
    enc = torch.zeros(2, 77, unet.config.cross_attention_dim, device=model.device, dtype=model.dtype)
    added = None
    ids = model.spec.added_conditioning(w * 8, h * 8)
    if model.spec.pooled:
        pooled = model.text_encoders[-1].config.projection_dim
        added = {"text_embeds": torch.zeros(2, pooled, device=model.device, dtype=model.dtype),
                 "time_ids": torch.zeros(2, len(ids or ()), device=model.device, dtype=model.dtype)}
    t0 = time.perf_counter()
    t = torch.tensor(999.0, device=model.device)  # a tensor, like the loop passes: a compiled UNet compiles once
    unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added)
    vae.decode(x[:1, :vae.config.latent_channels].to(vae.dtype))  # an inpainting UNet takes 9 channels
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    log.info("warm-up of %s took %.2fs", model.name, time.perf_counter() - t0)
