"""The one description of a generation: frozen dataclasses, flat field names, and validation.

Field names are shared by presets (`presets/*.json`), the CLI (`--hires-scale` = `hires_scale`), the Gradio
API and the PNG metadata, so one name means one thing everywhere. Nested configs group related fields;
`flatten`/`from_flat` convert between the nested form and the flat names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pipelines.denoise.region_spec import REGION_BASES, Region, validate_regions
from pipelines.errors import ValidationError
from pipelines.prompts.composable import check_and_parts

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Limits:
    """Server-side input limits, enforced for every entry point (UI, API, CLI)."""

    min_side: int = 64
    max_side: int = 8192  # tiled diffusion makes large sizes possible; keep a sane upper bound
    max_pixels: int = 8192 * 8192
    max_steps: int = 150
    max_batch: int = 16
    max_prompt_chars: int = 10_000
    max_hires_scale: float = 8.0
    max_loras: int = 32


@dataclass(frozen=True)
class HiresConfig:
    """Two-stage generation: draft at (width, height), upscale, then img2img refine."""

    scale: float = 1.0
    """Upscale factor of stage 2; 1 (or 0) switches stage 2 off; otherwise in (1, 8]."""
    upscaler: str = "lanczos"
    """auto (the best model file in models/upscalers, else lanczos) | lanczos | latent | latent-bicubic |
    latent-nearest-exact | latent-antialiased | a file in models/upscalers."""
    denoise: float | None = None
    """img2img strength of the refine pass in [0, 1]; None = 0.35 (0.55 for latent upscalers)."""
    steps: int | None = None
    """Refine steps actually run; None = the stage-1 step count."""
    sampler: str | None = None
    """Sampler of the refine pass; None = the stage-1 sampler."""
    prompt: str | None = None
    """Prompt of the refine pass; None = the stage-1 prompt."""
    negative_prompt: str | None = None
    """Negative prompt of the refine pass; None = the stage-1 negative prompt."""
    cfg: str | None = None
    """Guidance schedule text of the refine pass; None = the stage-1 schedule."""
    control_tile: float = 0.0
    """Scale of a tile ControlNet holding the draft's structure during the refine (0 = off). Uses `tile-sd15`
    (or models/controlnet/tile*) when available; without one the refine runs uncontrolled, with a warning."""

    @property
    def enabled(self) -> bool:
        return self.scale not in (0, 0.0, 1, 1.0)


@dataclass(frozen=True)
class TileConfig:
    """Tiled latent diffusion (MultiDiffusion / Mixture of Diffusers) and tiled VAE."""

    mode: str = "auto"
    """auto (tile when the planner says the image does not fit the memory budget) | on | off."""
    size: int | None = None
    """Tile size in latent pixels (x8 in image pixels); None = planner's choice (96 for SD1, 128 for SDXL)."""
    overlap: int | None = None
    """Overlap between tiles in latent pixels; None = planner's choice (32)."""
    blend: str = "gaussian"
    """average (MultiDiffusion) | gaussian (Mixture of Diffusers)."""
    batch: int | None = None
    """Tiles per UNet call; None = as many as the memory budget allows."""
    shift: bool = False
    """Shift the tile grid by a seed-derived random offset each step to hide seams further."""
    vae_tiling: str = "auto"
    """auto | on | off: decode/encode the VAE in tiles with whole-image GroupNorm statistics."""
    vae_tile_size: int | None = None
    """VAE tile size in latent pixels; None = planner's choice."""
    vae_tile_mode: str = "auto"
    """auto | exact (layer by layer: fastest, holds ~3 full-size layer activations in host RAM) | stream (tile by
    tile: bounded memory at any size, several times the compute). auto: exact when its canvases fit the host,
    else only the high-resolution stages tile by tile. All equal the full decode."""
    memory_budget_gb: float | None = None
    """Memory budget for planning; None = free device memory (CUDA) or unlimited (CPU)."""


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: a control image, its preprocessor, its model and when it acts."""

    image: Any
    """A PIL image (the UI/API upload or CLI file)."""
    type: str = "canny"
    """Preprocessor: canny | none (image already a control map) | depth | openpose | lineart | ..."""
    model: str | None = None
    """ControlNet model: catalogue name, local folder name in models/controlnet; None = matching default."""
    scale: float = 1.0
    """conditioning scale in [0, 2]; 0 = no effect."""
    start: float = 0.0
    """First fraction of the steps where the unit acts."""
    end: float = 1.0
    """Fraction of the steps after which the unit stops acting."""
    low: int = 100
    """Canny low threshold."""
    high: int = 200
    """Canny high threshold."""
    guess_mode: bool = False
    """Apply the control only to the conditional pass (ControlNet "guess mode")."""


MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")
INPAINT_AREAS = ("whole picture", "only masked")
MASK_MODES = ("inpaint masked", "inpaint not masked")


@dataclass(frozen=True)
class InpaintConfig:
    """Inpainting (a `mask` over `init_image`) and outpainting (extend the canvas); A1111's options. Used only with
    a mask or a nonzero outpaint side; `strength` is the denoising strength."""

    mask_blur: int = 4
    """Gaussian blur radius of the mask in pixels (0-64): the feather of the paste-back."""
    masked_content: str = "original"
    """What the masked area starts from: original | fill (blurred surroundings) | latent noise | latent nothing."""
    inpaint_area: str = "whole picture"
    """whole picture | only masked (crop the mask's box + padding, inpaint it at `inpaint_size`, paste it back)."""
    inpaint_padding: int = 32
    """Only masked: pixels of context around the mask's bounding box (0-1024)."""
    inpaint_size: int | None = None
    """Only masked: long side of the crop while it is inpainted, multiple of 8; None = the model's native size."""
    mask_mode: str = "inpaint masked"
    """inpaint masked (white = repaint) | inpaint not masked (black = repaint)."""
    soft_inpainting: bool = False
    """Grey levels are per-pixel change strengths (Differential Diffusion) instead of being thresholded at 50%."""
    outpaint_left: int = 0
    """Pixels added on the left (multiple of 8; the result within the size limits); the new area is pre-filled and repainted."""
    outpaint_right: int = 0
    """Pixels added on the right."""
    outpaint_top: int = 0
    """Pixels added at the top."""
    outpaint_bottom: int = 0
    """Pixels added at the bottom."""

    @property
    def outpaint(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom)."""
        return self.outpaint_left, self.outpaint_right, self.outpaint_top, self.outpaint_bottom


# The UI and the API offer this many ControlNet units, with flat names per unit (`control_name`); the engine and
# the CLI (`--control`, repeatable) take any number.
UI_CONTROL_UNITS = 3
CONTROL_FIELDS = ("image", *(f.name for f in fields(ControlUnit) if f.name != "image"))


def control_name(unit: int, field: str) -> str:
    """Flat name of a ControlNet unit's field: control_scale for the first unit (0), control2_scale, ..."""
    return f"control{unit + 1 if unit else ''}_{field}"


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines an image. Same request + same seed = same image."""

    prompt: str = ""
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg: str = "7"
    """Guidance schedule text: 7 | linear(4,9) | cosine(9,4) | step(9,5,0.5) | interval(7.5,0.2,0.8)[, rescale=0.7]."""
    sampler: str = "DPM++ 2M Karras"
    seed: int = -1
    """-1 = random; image i of a batch uses seed + i."""
    batch_size: int = 1
    init_image: Any = None
    """img2img source (PIL image); None = txt2img."""
    strength: float = 1.0
    """img2img denoise strength in [0, 1]: the tail fraction of a longer schedule that is run."""
    loras: tuple[str, ...] = ()
    """LoRAs as "name:weight" (weight defaults to 1)."""
    vae_decode: str = "full"
    """full | taesd (Tiny AutoEncoder: much faster, lower quality; for drafts)."""
    emphasis: str = "a1111"
    """a1111 (scale, then restore the mean) | none (scale only)."""
    clip_skip: int = 1
    prompt_timeline: str = "a1111"
    """How N in [a:b:N] is read. a1111 (A1111's default): with a "." a fraction of the steps, else a step
    number; in a two-stage run 1..2 (or steps past the first pass) address the hires pass. legacy (A1111's
    "Old prompt editing timelines"): N < 1 a fraction, else a step number, in each pass alike."""
    feature_cache: str = "off"
    """off | on: DeepCache feature caching (Ma et al. 2024). Between full UNet passes only the shallow branch (first
    down block, last up block) runs, on the deep features cached at the last full pass: fewer UNet FLOPs per step,
    slightly softer detail."""
    feature_cache_interval: int = 3
    """A full UNet pass every N steps while caching, 1-20 (1 = every step full: the same image as off)."""
    feature_cache_branch: int = 0
    """Skip branch whose feature is cached, 0-15 (the model's down-path ops bound it: 0-10 for SD 1.5, 0-7 for
    SDXL). 0 = DeepCache's default, the shallowest and fastest; higher keeps more of the UNet live."""
    feature_cache_schedule: str = "uniform"
    """uniform (a full pass every N steps) | nonuniform (as many full passes, denser early in the run)."""
    hires: HiresConfig = field(default_factory=HiresConfig)
    tiling: TileConfig = field(default_factory=TileConfig)
    control: tuple[ControlUnit, ...] = ()
    regions: tuple[Region, ...] = ()
    """Regional prompts (at most 16): rectangles with their own prompt, negative prompt, weight, feather, seed
    (`pipelines.denoise.region_spec`); a list of objects or its JSON text is accepted and normalised."""
    region_base: str = "rest"
    """rest (the base prompt only where no region is) | background (the base prompt everywhere, regions blended
    over it)."""
    mask: Any = None
    """Inpainting mask over `init_image` (PIL image of the same size; white = repaint, grey = partial with
    soft inpainting); None = no inpainting."""
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)

    @property
    def inpainting(self) -> bool:
        """A mask or an outpaint side is set: the run goes through `pipelines.edit.run`."""
        return self.mask is not None or any(self.inpaint.outpaint)


# Flat names: nested fields get a prefix (hires.scale -> hires_scale, tiling.size -> tile_size).
_PREFIX = {"hires": "hires_", "tiling": "tile_", "inpaint": ""}
_FLAT_EXCEPTIONS = {"tile_vae_tiling": "vae_tiling", "tile_vae_tile_size": "vae_tile_size",
                    "tile_vae_tile_mode": "vae_tile_mode",
                    "tile_memory_budget_gb": "memory_budget_gb"}
_NESTED_TYPES = {"hires": HiresConfig, "tiling": TileConfig, "inpaint": InpaintConfig}


def _flat_name(group: str, name: str) -> str:
    flat = _PREFIX[group] + name
    return _FLAT_EXCEPTIONS.get(flat, flat)


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Map every flat field name to (group or None, dataclass field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in fields(GenerationRequest):
        if f.name in _NESTED_TYPES:
            for sub in fields(_NESTED_TYPES[f.name]):
                out[_flat_name(f.name, sub.name)] = (f.name, sub)
        elif f.name not in ("control", "init_image", "mask"):
            out[f.name] = (None, f)
    return out


def flatten(req: GenerationRequest) -> dict[str, Any]:
    """The request as flat {name: value} (without images and ControlNet units)."""
    out: dict[str, Any] = {}
    for name, (group, f) in flat_fields().items():
        src = getattr(req, group) if group else req
        out[name] = getattr(src, f.name)
    return out


def from_flat(values: dict[str, Any], base: GenerationRequest | None = None, *, source: str = "request") -> GenerationRequest:
    """Build a request from flat names over `base`; unknown keys raise, naming `source` and the key."""
    known = flat_fields()
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {g: {} for g in _NESTED_TYPES}
    for key, value in values.items():
        if key in ("control", "init_image", "mask"):
            top[key] = value
            continue
        if key not in known:
            raise ValidationError(key, value, f"is not a known setting in {source}; known settings: {', '.join(sorted(known))}")
        group, f = known[key]
        if group:
            nested[group][f.name] = value
        else:
            top[key] = value
    base = base or GenerationRequest()
    for group, vals in nested.items():
        if vals:
            top[group] = replace(getattr(base, group), **vals)
    if isinstance(top.get("loras"), list):
        top["loras"] = tuple(top["loras"])
    return replace(base, **top)


# ---------------------------------------------------------------- validation

_MAX_INT_BITS = 64  # no setting needs bigger whole numbers; far bigger ones cannot even be formatted


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValidationError(name, value, "must be a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if not isinstance(value, int):
        raise ValidationError(name, value, "must be a whole number")
    if value.bit_length() > _MAX_INT_BITS:
        raise ValidationError(name, value, "is out of range")
    return value


def _float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValidationError(name, value, "must be a number") from None
    except OverflowError:  # an int too big for a float
        raise ValidationError(name, value, "must be a finite number") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValidationError(name, value, "must be a finite number")
    return out


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValidationError(name, value, f"must be between {lo:g} and {hi:g}")


def _side(name: str, value: Any, limits: Limits) -> int:
    v = _int(name, value)
    if v % 8:
        lo, hi = v - v % 8, v - v % 8 + 8
        raise ValidationError(name, v, f"must be a multiple of 8; try {lo} or {hi}")
    _in_range(name, v, limits.min_side, limits.max_side)
    return v


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValidationError(name, value, f"must be one of {', '.join(choices)}")
    return value


def _text(name: str, value: Any, limits: Limits) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(name, value, "must be text")
    if len(value) > limits.max_prompt_chars:
        raise ValidationError(name, f"<{len(value)} characters>", f"must be at most {limits.max_prompt_chars} characters")
    _unicode(name, value)
    return value


# One file-name component may have 255 bytes (NAME_MAX); names get suffixes such as ".safetensors" appended.
_MAX_NAME_BYTES = 240
_MAX_PATH_CHARS = 4096  # PATH_MAX, for the CLI's model paths


def _unicode(name: str, value: str) -> None:
    """Text that encodes as UTF-8. A lone surrogate (U+D800-DFFF; JSON "\\ud800", or bytes that are not UTF-8 in
    a command line) makes the tokenizer raise TypeError and file names fail to encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(name, value, f"has an unpaired surrogate U+{ord(value[exc.start]):04X} at character "
                                           f"{exc.start}, which is not valid Unicode text; remove it") from None


def check_text(name: str, value: Any, limits: Limits | None = None) -> str:
    """A prompt-like text field ("" for None): a string of at most `max_prompt_chars` valid Unicode characters."""
    return _text(name, value, limits or Limits())


def check_name(name: str, value: Any, what: str = "a name from the list") -> str:
    """A name that is looked up in a table or on disk (model, LoRA, sampler, upscaler, ControlNet): valid Unicode,
    no control characters, each path component short enough for a file name (else the lookup raises OSError)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(name, value, f"must be {what}")
    _unicode(name, value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError(name, value, f"must not contain control characters (NUL, newline, ...); use {what}")
    longest = max(len(part.encode("utf-8")) for part in re.split(r"[/\\]", value))
    if longest > _MAX_NAME_BYTES or len(value) > _MAX_PATH_CHARS:
        raise ValidationError(name, value, f"is too long for a name ({len(value)} characters, at most "
                                           f"{_MAX_NAME_BYTES} bytes per file name); use {what}")
    return value


def _optional_positive_int(name: str, value: Any, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    v = _int(name, value)
    _in_range(name, v, lo, hi)
    return v


def validate_hires(h: HiresConfig, width: int, height: int, limits: Limits) -> HiresConfig:
    """Check the stage-2 settings; sampler/upscaler names are checked by their owners."""
    scale = _float("hires_scale", h.scale)
    if scale not in (0.0, 1.0) and not 1.0 < scale <= limits.max_hires_scale:
        raise ValidationError("hires_scale", h.scale, f"must be 1 (off) or in (1, {limits.max_hires_scale:g}]")
    denoise = None if h.denoise is None else _float("hires_denoise", h.denoise)
    if denoise is not None:
        _in_range("hires_denoise", denoise, 0.0, 1.0)
    steps = _optional_positive_int("hires_steps", h.steps, 1, limits.max_steps)
    control_tile = _float("hires_control_tile", h.control_tile)
    _in_range("hires_control_tile", control_tile, 0.0, 2.0)
    if h.sampler is not None:
        check_name("hires_sampler", h.sampler, "a sampler name")
    check_name("hires_upscaler", h.upscaler, "an upscaler name from the list")
    prompt = None if h.prompt is None else _text("hires_prompt", h.prompt, limits)
    check_and_parts("hires_prompt", prompt)
    negative = None if h.negative_prompt is None else _text("hires_negative_prompt", h.negative_prompt, limits)
    cfg = None if h.cfg is None else _cfg_text("hires_cfg", h.cfg)
    if scale > 1:
        tw, th = hires_target(width, height, scale)
        if max(tw, th) > limits.max_side or tw * th > limits.max_pixels:
            raise ValidationError("hires_scale", scale, f"makes {tw}x{th}, over the {limits.max_side}px limit; lower it")
    return replace(h, scale=scale, denoise=denoise, steps=steps, prompt=prompt, negative_prompt=negative, cfg=cfg)


def validate_tiling(t: TileConfig) -> TileConfig:
    """Check the tiling settings."""
    _choice("tile_mode", t.mode, ("auto", "on", "off"))
    _choice("tile_blend", t.blend, ("average", "gaussian"))
    _choice("vae_tiling", t.vae_tiling, ("auto", "on", "off"))
    _choice("vae_tile_mode", t.vae_tile_mode, ("auto", "exact", "stream"))
    if not isinstance(t.shift, bool):
        raise ValidationError("tile_shift", t.shift, "must be true or false")
    size = _optional_positive_int("tile_size", t.size, 8, 256)
    overlap = _optional_positive_int("tile_overlap", t.overlap, 0, 128)
    if size is not None and overlap is not None and overlap >= size:
        raise ValidationError("tile_overlap", overlap, f"must be smaller than tile_size ({size})")
    batch = _optional_positive_int("tile_batch", t.batch, 1, 64)
    vae = _optional_positive_int("vae_tile_size", t.vae_tile_size, 16, 512)
    budget = None if t.memory_budget_gb is None else _float("memory_budget_gb", t.memory_budget_gb)
    if budget is not None:
        _in_range("memory_budget_gb", budget, 0.1, 4096)
    return replace(t, size=size, overlap=overlap, batch=batch, vae_tile_size=vae, memory_budget_gb=budget)


def validate_control(u: ControlUnit, i: int) -> ControlUnit:
    """Check one ControlNet unit's numbers (images and names are checked when loaded)."""
    p = f"control[{i}]."
    scale = _float(p + "scale", u.scale)
    _in_range(p + "scale", scale, 0.0, 2.0)
    start, end = _float(p + "start", u.start), _float(p + "end", u.end)
    _in_range(p + "start", start, 0.0, 1.0)
    _in_range(p + "end", end, 0.0, 1.0)
    if start > end:
        raise ValidationError(p + "start", start, f"must not be after end ({end:g})")
    low, high = _int(p + "low", u.low), _int(p + "high", u.high)
    _in_range(p + "low", low, 0, 255)
    _in_range(p + "high", high, 0, 255)
    if u.image is None:
        raise ValidationError(p + "image", None, "is required: upload a control image")
    check_name(p + "type", u.type, "a preprocessor name")
    if u.model is not None:
        check_name(p + "model", u.model, "a ControlNet name from the list")
    return replace(u, scale=scale, start=start, end=end, low=low, high=high)


def _cfg_text(name: str, value: Any) -> str:
    """A guidance schedule (number or text) checked by `parse_cfg`, as its text; errors name `name`."""
    from pipelines.denoise.guidance import parse_cfg

    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValidationError(name, value, "must be a number or a schedule like linear(4,9)")
    if not isinstance(value, str):
        _float(name, value)  # nan, inf and ints too big for a float stop here
    text = str(value).strip()
    try:
        parse_cfg(text)
    except ValidationError as err:
        raise ValidationError(name, value, err.fix) from None
    return text


def validate(req: GenerationRequest, limits: Limits | None = None) -> GenerationRequest:
    """Check every field once, at the boundary; return the request with values normalised to their types."""
    limits = limits or Limits()
    width, height = _side("width", req.width, limits), _side("height", req.height, limits)
    if width * height > limits.max_pixels:
        raise ValidationError("width", width, f"x height {height} exceeds {limits.max_pixels} pixels")
    steps = _int("steps", req.steps)
    _in_range("steps", steps, 1, limits.max_steps)
    batch = _int("batch_size", req.batch_size)
    _in_range("batch_size", batch, 1, limits.max_batch)
    seed = _int("seed", req.seed)
    _in_range("seed", seed, -1, 2**32 - 1)
    strength = _float("strength", req.strength)
    _in_range("strength", strength, 0.0, 1.0)
    clip_skip = _int("clip_skip", req.clip_skip)
    _in_range("clip_skip", clip_skip, 1, 12)
    cfg = _cfg_text("cfg", req.cfg)
    check_name("model", req.model, "a model name (see the model list)")
    check_name("sampler", req.sampler, "a sampler name")
    check_and_parts("prompt", req.prompt)
    loras = req.loras or ()
    if isinstance(loras, str):  # the text form "name:weight, name2:weight" (API, infotext)
        loras = [spec.strip() for spec in loras.split(",") if spec.strip()]
    if not isinstance(loras, tuple | list):
        raise ValidationError("loras", loras, "must be a list of name:weight")
    loras = tuple(loras)
    if len(loras) > limits.max_loras:
        raise ValidationError("loras", f"<{len(loras)} LoRAs>", f"must list at most {limits.max_loras} LoRAs")
    for spec in loras:
        parse_lora(spec)
    return replace(
        req,
        prompt=_text("prompt", req.prompt, limits),
        negative_prompt=_text("negative_prompt", req.negative_prompt, limits),
        width=width, height=height, steps=steps, batch_size=batch, seed=seed, strength=strength,
        clip_skip=clip_skip, cfg=cfg, loras=loras,
        vae_decode=_choice("vae_decode", req.vae_decode, ("full", "taesd")),
        emphasis=_choice("emphasis", req.emphasis, ("a1111", "none")),
        prompt_timeline=_choice("prompt_timeline", req.prompt_timeline, ("a1111", "legacy")),
        regions=validate_regions(req.regions, width, height, limits.max_prompt_chars),
        region_base=_choice("region_base", req.region_base, REGION_BASES),
        hires=validate_hires(req.hires, width, height, limits),
        tiling=validate_tiling(req.tiling),
        control=tuple(validate_control(u, i) for i, u in enumerate(req.control)),
        **validate_feature_cache(req),
        inpaint=validate_inpaint(req, width, height, limits),
    )


def validate_feature_cache(req: GenerationRequest) -> dict[str, Any]:
    """The feature-cache fields, checked and normalised (as keyword arguments for `replace`)."""
    mode = _choice("feature_cache", req.feature_cache, ("off", "on"))
    interval = _int("feature_cache_interval", req.feature_cache_interval)
    _in_range("feature_cache_interval", interval, 1, 20)
    branch = _int("feature_cache_branch", req.feature_cache_branch)
    _in_range("feature_cache_branch", branch, 0, 15)
    schedule = _choice("feature_cache_schedule", req.feature_cache_schedule, ("uniform", "nonuniform"))
    if mode == "on" and req.tiling.shift is True:
        raise ValidationError("feature_cache", mode, "cannot be on with tile_shift on (the grid moves every step, so "
                              "no cached tile feature could be reused); set tile_shift off or feature_cache off")
    return dict(feature_cache=mode, feature_cache_interval=interval, feature_cache_branch=branch,
                feature_cache_schedule=schedule)


def validate_inpaint(req: GenerationRequest, width: int, height: int, limits: Limits) -> InpaintConfig:
    """Check the inpainting settings, and the mask and outpaint sizes when they are used."""
    c = req.inpaint
    blur, padding = _int("mask_blur", c.mask_blur), _int("inpaint_padding", c.inpaint_padding)
    _in_range("mask_blur", blur, 0, 64)
    _in_range("inpaint_padding", padding, 0, 1024)
    size = _optional_positive_int("inpaint_size", c.inpaint_size, 64, 2048)
    if size is not None and size % 8:
        raise ValidationError("inpaint_size", size, f"must be a multiple of 8; try {size - size % 8}")
    _choice("masked_content", c.masked_content, MASKED_CONTENT)
    _choice("inpaint_area", c.inpaint_area, INPAINT_AREAS)
    _choice("mask_mode", c.mask_mode, MASK_MODES)
    if not isinstance(c.soft_inpainting, bool):
        raise ValidationError("soft_inpainting", c.soft_inpainting, "must be true or false")
    sides = {}
    for side in ("left", "right", "top", "bottom"):
        name = f"outpaint_{side}"
        v = sides[name] = _int(name, getattr(c, name))
        _in_range(name, v, 0, limits.max_side)
        if v % 8:
            raise ValidationError(name, v, f"must be a multiple of 8; try {v - v % 8} or {v - v % 8 + 8}")
    out = replace(c, mask_blur=blur, inpaint_padding=padding, inpaint_size=size, **sides)
    if req.mask is None and not any(out.outpaint):
        return out
    if req.regions and (out.inpaint_area != "whole picture" or any(out.outpaint) or req.hires.scale not in (0, 1)):
        raise ValidationError("regions", f"<{len(req.regions)} regions>", "work with inpainting only on the whole "
                              "picture without outpainting or hires yet; set inpaint_area to 'whole picture' or "
                              "drop the regions")
    if req.init_image is None:
        if req.mask is not None:
            raise ValidationError("init_image", None, "is required to inpaint: upload the image the mask is for")
        side = next(n for n, v in sides.items() if v)
        raise ValidationError(side, sides[side], "needs an init_image to extend: upload the image to outpaint")
    if req.mask is not None:
        from pipelines.edit.inpaint import check_mask

        check_mask(req.mask, req.init_image, out.soft_inpainting)
    ow, oh = width + out.outpaint_left + out.outpaint_right, height + out.outpaint_top + out.outpaint_bottom
    if max(ow, oh) > limits.max_side or ow * oh > limits.max_pixels:
        side = next(n for n, v in sides.items() if v)
        raise ValidationError(side, sides[side], f"makes {ow}x{oh}, over the {limits.max_side}px / "
                                                 f"{limits.max_pixels} pixel limit; extend by less")
    scale = _float("hires_scale", req.hires.scale)
    if scale not in (0.0, 1.0):  # the refine repaints under the same mask, scaled (`pipelines.edit.run`)
        from pipelines.models.upscalers import is_latent

        if is_latent(req.hires.upscaler):
            raise ValidationError("hires_upscaler", req.hires.upscaler, "must be a pixel upscaler (lanczos or a "
                                                                        "model file) when inpainting")
        tw, th = hires_target(ow, oh, scale)
        if max(tw, th) > limits.max_side or tw * th > limits.max_pixels:
            raise ValidationError("hires_scale", scale, f"makes {tw}x{th} after outpainting, over the "
                                                        f"{limits.max_side}px limit; lower it")
    return out


def parse_lora(spec: str) -> tuple[str, float]:
    """"name:0.8" -> ("name", 0.8); weight defaults to 1.0 and must be in [-4, 4]."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError("loras", spec, "must be written name:weight, e.g. lcm-lora-sdv1-5:1.0")
    name, _, weight = spec.strip().rpartition(":") if ":" in spec else (spec.strip(), "", "1")
    w = _float("loras", weight) if weight else 1.0
    _in_range("loras", w, -4.0, 4.0)
    if not name:
        raise ValidationError("loras", spec, "must be written name:weight, e.g. lcm-lora-sdv1-5:1.0")
    check_name("loras", name, "a LoRA name from models/lora or the catalogue")
    return name, w


def hires_target(width: int, height: int, scale: float) -> tuple[int, int]:
    """Stage-2 size: the stage-1 size times `scale`, rounded to a multiple of 8."""
    return int(round(width * scale / 8)) * 8, int(round(height * scale / 8)) * 8


def resolve_seed(seed: int) -> int:
    """-1 -> a fresh random seed; any other seed unchanged."""
    import secrets

    return secrets.randbelow(2**32) if seed == -1 else seed
