"""Upscalers: Lanczos, latent interpolation, and Real-ESRGAN-class models loaded through spandrel.

Names come from one listing (`list_upscalers`): the built-ins below, then the file names (with their
suffix, e.g. ``RealESRGAN_x4plus.safetensors``) of ``*.safetensors`` / ``*.pth`` files directly in
``models_dir/"upscalers"``. The suffix keeps names unambiguous and can never collide with a built-in.
A name is never a path: anything else is rejected, so API users cannot point at arbitrary files.

Model tiling (pixel space): the image is cut into a grid of cores of at most ``tile`` x ``tile`` input
pixels (`pipelines.tiling.plan_cores`); each core is run with ``overlap`` pixels of context on every side
(clipped at the image border), so the model never sees more than ``(tile + 2 * overlap)`` pixels a side.
Outputs are blended with linear ramps ``overlap`` pixels wide centred on each seam (`pipelines.tiling.ramp_weights`;
they reach ``overlap / 2`` into the context), accumulated and divided by the summed weights with the latent
tiling's kernel (`pipelines.tiling.new_canvas`, `accumulate`, `finish`).
An output pixel is therefore exact when ``overlap / 2`` is at least the model's receptive-field radius;
for real models the ramp hides the small remaining difference.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.errors import ModelError, ValidationError
from pipelines.request.hires import LATENT_UPSCALERS, is_latent
from pipelines.images import from_pil, to_pil
from pipelines.lru import LRUCache
from pipelines.tiling import Tile, accumulate, finish, new_canvas, plan_cores, ramp_weights

log = logging.getLogger(__name__)

LATENT_MODES: dict[str, tuple[str, bool]] = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
"""Latent upscaler name -> (torch interpolate mode, antialias); A1111's "Latent (...)" family."""
assert tuple(LATENT_MODES) == LATENT_UPSCALERS, "one mode per latent upscaler name of the request layer"

AUTO = "auto"
"""The best pixel upscaler at hand: a model file in models/upscalers (`pick_upscaler`), else Lanczos."""
BUILTIN_UPSCALERS: tuple[str, ...] = (AUTO, "lanczos", *LATENT_MODES)
MODEL_SUFFIXES = (".safetensors", ".pth")

ProgressFn = Callable[[int, int], None]


def _model_files(models_dir: Path) -> list[str]:
    """File names of upscaler weights directly in `models_dir/upscalers`, sorted case-insensitively."""
    folder = Path(models_dir) / "upscalers"
    if not folder.is_dir():
        return []
    files = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES]
    return sorted(files, key=str.lower)


def list_upscalers(models_dir: Path) -> list[str]:
    """Built-in upscaler names followed by the model file names in `models_dir/upscalers`."""
    return [*BUILTIN_UPSCALERS, *_model_files(models_dir)]


def pick_upscaler(models_dir: Path, scale: float) -> str:
    """What `auto` means here: the model file whose name says this scale (``4x``/``x4``), then one that says
    ESRGAN, then any (sorted by name); Lanczos when models/upscalers is empty."""
    files = _model_files(models_dir)
    if not files:
        return "lanczos"
    n = round(scale)

    def rank(name: str) -> tuple[bool, bool, str]:
        low = name.lower()
        says_scale = re.search(rf"(^|[^0-9]){n}x|x{n}($|[^0-9])", low) is not None
        return (not says_scale, "esrgan" not in low, low)

    return min(files, key=rank)


def concrete_upscaler(name: str, models_dir: Path, scale: float) -> str:
    """`name`, with `auto` replaced by what it picks (so metadata and caches name the upscaler that ran)."""
    return pick_upscaler(models_dir, scale) if name == AUTO else name


def resolve_upscaler(name: str, models_dir: Path) -> Path | str:
    """The built-in name itself, or the Path of the model file called `name`; anything else is rejected."""
    if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name:
        raise ValidationError("hires_upscaler", name, "must be an upscaler name from the list, not a path")
    if name in BUILTIN_UPSCALERS:
        return name
    names = _model_files(models_dir)
    if name in names:
        return Path(models_dir) / "upscalers" / name
    choices = ", ".join([*BUILTIN_UPSCALERS, *names])
    raise ValidationError(
        "hires_upscaler", name, f"must be one of {choices} (model files go in {Path(models_dir) / 'upscalers'})"
    )


def _check_descriptor(model: Any, path: Path) -> None:
    """Raise ModelError unless `model` is an RGB image-to-image spandrel model."""
    from spandrel import ImageModelDescriptor

    if not isinstance(model, ImageModelDescriptor):
        kind = type(model).__name__
        raise ModelError(f"{path.name} is a {kind} ({model.purpose}), not an image-to-image upscaler")
    if model.purpose == "FaceSR":
        raise ModelError(f"{path.name} is a face restoration model ({model.architecture.name}), not an upscaler")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise ModelError(
            f"{path.name} maps {model.input_channels} to {model.output_channels} channels; only RGB models work"
        )


def _read_model(path: Path):
    """Load `path` with spandrel on the CPU (safetensors, or .pth through its restricted unpickler)."""
    from spandrel import ModelLoader, UnsupportedModelError

    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelError(f"{path.name}: upscalers must be .safetensors or .pth files")
    expected = "a Real-ESRGAN-class upscaler (any architecture spandrel knows) as .safetensors or .pth"
    try:
        return ModelLoader("cpu").load_from_file(path)
    except UnsupportedModelError as err:
        raise ModelError(f"{path.name} is not a model architecture spandrel knows; expected {expected}") from err
    except FileNotFoundError as err:
        raise ModelError(f"{path} does not exist; put {expected} in models/upscalers") from err
    except Exception as err:  # safetensors/pickle/zip errors have no common base class
        raise ModelError(f"{path.name} could not be read as a model ({err}); expected {expected}") from err


def _pick_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """`dtype` if the model supports it, else float32 (logged)."""
    if dtype == torch.float16 and not model.supports_half:
        log.info("%s does not support float16; running it in float32", model.architecture.name)
        return torch.float32
    if dtype == torch.bfloat16 and not model.supports_bfloat16:
        log.info("%s does not support bfloat16; running it in float32", model.architecture.name)
        return torch.float32
    return dtype


def load_upscaler(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  cache: LRUCache | None = None):
    """Load an upscaler file as a spandrel ImageModelDescriptor; `cache` (a manager's `caches.upscalers`) keeps it
    by path, mtime, device and dtype, else it is loaded afresh and nothing keeps it."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as err:
        raise ModelError(f"upscaler {path} does not exist or cannot be read ({err})") from err
    if cache is None:
        return _load_checked(path, device, dtype)
    key = (str(path.resolve()), mtime, str(device), dtype)
    from pipelines.models.manager import LOAD_LOCK

    with LOAD_LOCK:  # the Upscale tab and a hires job may ask at once: one load, one cache update at a time
        return cache.get(key, lambda: _load_checked(path, device, dtype))


def _load_checked(path: Path, device: torch.device | str, dtype: torch.dtype):
    model = _read_model(path)
    _check_descriptor(model, path)
    model = model.to(device=torch.device(device), dtype=_pick_dtype(model, dtype)).eval()
    log.info("loaded upscaler %s (%s, %dx)", path.name, model.architecture.name, model.scale)
    return model


def upscale_tensor(model, x: torch.Tensor, *, tile: int = 512, overlap: int = 32,
                   progress: ProgressFn | None = None) -> torch.Tensor:
    """Run `model` over [1, 3, H, W] `x` in overlapping tiles; returns [1, 3, H*s, W*s] float32 on the CPU."""
    from spandrel import ModelTiling

    _, _, h, w = x.shape
    s = model.scale
    if model.tiling == ModelTiling.INTERNAL:
        tile = max(h, w)  # the model needs the whole image (it tiles itself, or is global)
    rows, cols = plan_cores(h, tile), plan_cores(w, tile)
    total, done = len(rows) * len(cols), 0
    if total == 1:
        with torch.inference_mode():
            out = model(x).float().cpu()
        if progress:
            progress(1, 1)
        return out
    canvas, wsum = new_canvas(1, 3, h * s, w * s)  # the latent tiling's kernel: accumulate, then finish
    with torch.inference_mode():
        for top, bottom in rows:
            y0, y1 = max(0, top - overlap), min(h, bottom + overlap)
            wy = ramp_weights(top, bottom, y0, y1, overlap, s)
            for left, right in cols:
                x0, x1 = max(0, left - overlap), min(w, right + overlap)
                wx = ramp_weights(left, right, x0, x1, overlap, s)
                out = model(x[:, :, y0:y1, x0:x1]).float().cpu()
                window = Tile(y0 * s, x0 * s, (y1 - y0) * s, (x1 - x0) * s)
                accumulate(canvas, wsum, window, out, wy[:, None] * wx[None, :])
                done += 1
                if progress:
                    progress(done, total)
    return finish(canvas, wsum)


def upscale_with_model(model, image: Image.Image, *, tile: int = 512, overlap: int = 32,
                       progress: ProgressFn | None = None) -> Image.Image:
    """Upscale `image` by `model.scale` with tiling (see module docstring); RGB out, exact size in x scale."""
    if tile < 8 or overlap < 0:
        raise ValidationError("upscale_tile", (tile, overlap), "needs tile >= 8 and overlap >= 0")
    x = from_pil(image, device=model.device, dtype=model.dtype, value_range="unit")
    return to_pil(upscale_tensor(model, x, tile=tile, overlap=overlap, progress=progress), value_range="unit")[0]


def _target_size(image: Image.Image, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """The (width, height) to produce from exactly one of `scale` or `size`."""
    if (scale is None) == (size is None):
        raise ValidationError("upscale", (scale, size), "needs exactly one of scale or size")
    if size is not None:
        width, height = (int(v) for v in size)
    elif scale is not None and scale > 0:  # not None: exactly one of the two is given
        width, height = round(image.width * scale), round(image.height * scale)
    else:
        raise ValidationError("hires_scale", scale, "must be > 0")
    if width < 1 or height < 1:
        raise ValidationError("upscale size", (width, height), "must be at least 1x1 pixels")
    return width, height


def upscale_image(image: Image.Image, name: str, *, scale: float | None = None,
                  size: tuple[int, int] | None = None, models_dir: Path,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  tile: int = 512, overlap: int = 32, progress: ProgressFn | None = None,
                  cache: LRUCache | None = None) -> Image.Image:
    """Upscale `image` with pixel upscaler `name` to `size` (width, height) or by `scale`; exact size out.

    A model runs up to three times until the image covers the target (A1111 behaviour, e.g. 8x with a
    4x model), then Lanczos resizes to the exact target. Latent upscalers are rejected: use
    `upscale_latents`. `cache` (a manager's `caches.upscalers`) keeps the model between calls.
    """
    target = _target_size(image, scale, size)
    resolved = resolve_upscaler(name, models_dir)
    if isinstance(resolved, str) and is_latent(resolved):
        raise ValidationError("hires_upscaler", name, "is a latent upscaler; use upscale_latents on latents")
    image = image.convert("RGB")
    if isinstance(resolved, Path):
        model = load_upscaler(resolved, device, dtype, cache)
        for _ in range(3):
            if image.width >= target[0] and image.height >= target[1]:
                break
            image = upscale_with_model(model, image, tile=tile, overlap=overlap, progress=progress)
            if model.scale == 1:
                break
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return image


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str = "latent") -> torch.Tensor:
    """Interpolate [B, C, h, w] latents to `size` = (latent height, latent width) with latent upscaler `mode`."""
    if mode not in LATENT_MODES:
        raise ValidationError("hires_upscaler", mode, f"must be a latent upscaler: {', '.join(LATENT_MODES)}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValidationError("latent size", size, "must be at least 1x1")
    torch_mode, antialias = LATENT_MODES[mode]
    kwargs = {"antialias": antialias, "align_corners": False} if torch_mode in ("bilinear", "bicubic") else {}
    # interpolate has no half-precision kernels for every mode on the CPU; compute in float32.
    out = F.interpolate(latents.float(), size=(height, width), mode=torch_mode, **kwargs)
    return out.to(latents.dtype)
