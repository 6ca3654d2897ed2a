"""The one description of a generation: frozen dataclasses whose fields carry their schema, and flat names.

Each field is declared once with `spec(...)` (`pipelines.request.fields`): its type (choices as `Literal[...]`), range,
unit and one help sentence. Validation (`pipelines.request.validation`), the UI's widgets, the CLI's options, the API's
parameters, preset keys and infotext keys are derived from these declarations.

Field names are shared by presets (`presets/*.json`), the CLI (`--hires-scale` = `hires_scale`), the Gradio
API and the PNG metadata, so one name means one thing everywhere. Nested configs group related fields;
`flatten`/`from_flat` convert between the nested form and the flat names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from pipelines.errors import ValidationError
from pipelines.request.fields import FieldSpec, hints, spec, spec_of
from pipelines.request.regions import Region

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

OnOffAuto = Literal["auto", "on", "off"]
TileBlend = Literal["average", "gaussian"]
VaeTileMode = Literal["auto", "exact", "stream"]
MaskedContent = Literal["original", "fill", "latent noise", "latent nothing"]
InpaintArea = Literal["whole picture", "only masked"]
MaskMode = Literal["inpaint masked", "inpaint not masked"]
VaeDecode = Literal["full", "taesd"]
Emphasis = Literal["a1111", "none"]
PromptTimeline = Literal["a1111", "legacy"]
FeatureCache = Literal["off", "on"]
FeatureCacheSchedule = Literal["uniform", "nonuniform"]
RegionBase = Literal["rest", "background"]

MASKED_CONTENT: tuple[str, ...] = get_args(MaskedContent)
INPAINT_AREAS: tuple[str, ...] = get_args(InpaintArea)
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
CANNY_RANGE = (1, 255)  # A1111's (sd-webui-controlnet's) canny threshold sliders; the preprocessor checks the same
SAMPLER = "a sampler name"
UPSCALER = "an upscaler name from the list"
MODEL = "a model name (see the model list)"


@dataclass(frozen=True)
class HiresConfig:
    """Two-stage generation: draft at (width, height), upscale, then img2img refine."""

    scale: float = spec(1.0, "Upscale factor of stage 2: final size = width/height × this; 1 = off.",
                        range=(1, "max_hires_scale"), step=0.25, unit="×", infotext="Hires upscale")
    upscaler: str = spec("lanczos", "auto (the best file in models/upscalers, else lanczos), lanczos, latent, "
                         "latent-bicubic, latent-nearest-exact, latent-antialiased or a file in models/upscalers.",
                         kind="name", what=UPSCALER, infotext="Hires upscaler")
    denoise: float | None = spec(None, "How much the refine pass changes, 0-1; empty = 0.35 (0.55 for latent).",
                                 range=(0, 1), step=0.05, infotext="Denoising strength")
    steps: int | None = spec(None, "Refine steps actually run; empty = the stage-1 step count.",
                             range=(1, "max_steps"), step=1, unit="steps", infotext="Hires steps")
    sampler: str | None = spec(None, "Sampler of the refine pass; empty = the stage-1 sampler.", kind="name",
                               what=SAMPLER, infotext="Hires sampler")
    prompt: str | None = spec(None, "Prompt of the refine pass; empty = the stage-1 prompt.", kind="text",
                              infotext="Hires prompt")
    negative_prompt: str | None = spec(None, "Negative prompt of the refine pass; empty = the stage-1 one.",
                                       kind="text", infotext="Hires negative prompt")
    cfg: str | None = spec(None, "Guidance schedule of the refine pass; empty = the stage-1 schedule.", kind="cfg",
                           infotext="Hires CFG Scale")
    control_tile: float = spec(0.0, "Scale of a tile ControlNet holding the draft's structure in the refine "
                               "(0 = off; needs tile-sd15 or a tile model in models/controlnet).",
                               range=(0, 2), step=0.05)

    @property
    def enabled(self) -> bool:
        return self.scale not in (0, 0.0, 1, 1.0)


@dataclass(frozen=True)
class TileConfig:
    """Tiled latent diffusion (MultiDiffusion / Mixture of Diffusers) and tiled VAE."""

    mode: OnOffAuto = spec("auto", "Tiled diffusion; auto tiles only when the image does not fit the memory "
                           "budget.", cli="tiling")
    size: int | None = spec(None, "Tile size in latent pixels (× 8 in the image); empty = the planner's choice "
                            "(96 for SD1, 128 for SDXL).", range=(8, 256), unit="latent px")
    overlap: int | None = spec(None, "Overlap between tiles in latent pixels, smaller than the tile; empty = the "
                               "planner's choice (32).", range=(0, 128), unit="latent px")
    blend: TileBlend = spec("gaussian", "average (MultiDiffusion) or gaussian (Mixture of Diffusers, hides seams "
                            "best).")
    batch: int | None = spec(None, "Tiles per UNet call; empty = as many as the memory budget allows.",
                             range=(1, 64), step=1)
    shift: bool = spec(False, "Shift the tile grid by a seeded random offset each step to hide seams further.")
    vae_tiling: OnOffAuto = spec("auto", "Decode/encode the VAE in tiles with whole-image GroupNorm statistics.")
    vae_tile_size: int | None = spec(None, "VAE tile size in latent pixels; empty = the planner's choice.",
                                     range=(16, 512), unit="latent px")
    vae_tile_mode: VaeTileMode = spec("auto", "exact: layer by layer, fastest, ~3 full-size layers in host RAM; "
                                      "stream: tile by tile, bounded memory, slower; auto: exact when it fits, else "
                                      "only the high-resolution stages tile by tile (same pixels).")
    memory_budget_gb: float | None = spec(None, "Memory budget the planner tiles to stay under; empty = free GPU "
                                          "memory (unlimited on CPU).", range=(0.1, 4096), unit="GB")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: a control image, its preprocessor, its model and when it acts."""

    image: Any = spec(dataclasses.MISSING, "A PIL image (the UI/API upload or CLI file).", kind="image")
    type: str = spec("canny", "Preprocessor: canny, none (the image already is a map), depth, openpose, lineart, "
                     "...", kind="name", what="a preprocessor name", infotext="Module")
    model: str | None = spec(None, "ControlNet model: a catalogue name or a folder in models/controlnet; empty = "
                             "the matching default.", kind="name", what="a ControlNet name from the list",
                             infotext="Model")
    scale: float = spec(1.0, "Conditioning scale; 0 = no effect.", range=(0, 2), step=0.05, infotext="Weight")
    start: float = spec(0.0, "Fraction of the steps where the unit starts acting.", range=(0, 1), step=0.05,
                        infotext="Guidance Start")
    end: float = spec(1.0, "Fraction of the steps after which the unit stops acting.", range=(0, 1), step=0.05,
                      infotext="Guidance End")
    low: int = spec(100, "Canny low threshold.", range=CANNY_RANGE, step=1, infotext="Threshold A")
    high: int = spec(200, "Canny high threshold.", range=CANNY_RANGE, step=1, infotext="Threshold B")
    guess_mode: bool = spec(False, "Apply the control to the conditional pass only (ControlNet guess mode).",
                            infotext="Control Mode")


CONTROL_FIELDS = tuple(f.name for f in fields(ControlUnit))


@dataclass(frozen=True)
class InpaintConfig:
    """Inpainting (a `mask` over `init_image`) and outpainting (extend the canvas); A1111's options. Used only with
    a mask or a nonzero outpaint side; `strength` is the denoising strength."""

    mask_blur: int = spec(4, "Gaussian blur radius of the mask: the feather of the paste-back.", range=(0, 64),
                          step=1, unit="px", infotext="Mask blur")
    masked_content: MaskedContent = spec("original", "What the masked area starts from (fill = blurred "
                                         "surroundings).", infotext="Masked content")
    inpaint_area: InpaintArea = spec("whole picture", "only masked: inpaint the mask's box plus padding at "
                                     "inpaint_size, then paste it back.", infotext="Inpaint area")
    inpaint_padding: int = spec(32, "Only masked: pixels of context around the mask's box.", range=(0, 1024),
                                ui_range=(0, 256), step=4, unit="px", infotext="Masked area padding")
    inpaint_size: int | None = spec(None, "Only masked: long side of the crop while it is inpainted; empty = the "
                                    "model's native size.", range=(64, 2048), step=8, multiple_of=8, unit="px")
    mask_mode: MaskMode = spec("inpaint masked", "inpaint masked: white = repaint; inpaint not masked: black = "
                               "repaint.", infotext="Mask mode")
    soft_inpainting: bool = spec(False, "Grey mask levels are per-pixel change strengths (Differential "
                                 "Diffusion) instead of being thresholded at 50%.", infotext="Soft inpainting enabled")
    outpaint_left: int = spec(0, "Pixels added on the left; the new area is pre-filled and repainted.",
                              range=(0, "max_side"), step=8, multiple_of=8, unit="px", cli="")
    outpaint_right: int = spec(0, "Pixels added on the right.", range=(0, "max_side"), step=8, multiple_of=8,
                               unit="px", cli="")
    outpaint_top: int = spec(0, "Pixels added at the top.", range=(0, "max_side"), step=8, multiple_of=8, unit="px",
                             cli="")
    outpaint_bottom: int = spec(0, "Pixels added at the bottom.", range=(0, "max_side"), step=8, multiple_of=8,
                                unit="px", cli="")

    @property
    def outpaint(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom)."""
        return self.outpaint_left, self.outpaint_right, self.outpaint_top, self.outpaint_bottom


_SIZE = dict(range=("min_side", "max_side"), ui_range=(64, 4096), step=8, multiple_of=8, unit="px")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines an image. Same request + same seed = same image."""

    prompt: str = spec("", "What the image shows; A1111 syntax: (word:1.3), ((word)), [word], BREAK, [a:b:0.5], "
                       "[a|b], AND.", kind="text")
    negative_prompt: str = spec("", "What the image should not show.", kind="text")
    model: str = spec(DEFAULT_MODEL, "A catalogue name, a local folder or .safetensors file in models/, a Hub id, "
                      "or tiny.", kind="name", what=MODEL, infotext="Model")
    width: int = spec(512, "Stage-1 width in pixels, a multiple of 8; hires multiplies it.", **_SIZE)
    height: int = spec(512, "Stage-1 height in pixels, a multiple of 8.", **_SIZE)
    steps: int = spec(25, "Denoising steps of stage 1.", range=(1, "max_steps"), step=1, unit="steps",
                      infotext="Steps")
    cfg: str = spec("7", "Guidance schedule: 7, linear(4,9), cosine(9,4), step(9,5,0.5) or interval(7.5,0.2,0.8), "
                    "optionally with , rescale=0.7.", kind="cfg", infotext="CFG scale")
    sampler: str = spec("DPM++ 2M Karras", "DPM++ 2M Karras is a good default; LCM needs an LCM model or LoRA.",
                        kind="name", what=SAMPLER, infotext="Sampler")
    seed: int = spec(-1, "-1 = random; image i of a batch uses seed + i.", range=(-1, 2**32 - 1), step=1,
                     infotext="Seed")
    batch_size: int = spec(1, "Images per run.", range=(1, "max_batch"), step=1, cli="batch")
    init_image: Any = spec(None, "img2img source image; empty = text-to-image.", kind="image", cli="init-image")
    strength: float = spec(1.0, "img2img denoise strength: 0 keeps the image, 1 replaces it entirely.",
                           range=(0, 1), step=0.05, infotext="Denoising strength")
    loras: tuple[str, ...] = spec((), "LoRAs as comma-separated name:weight (files in models/loras or catalogue "
                                  "names; weight defaults to 1).", kind="loras", cli="", infotext="Loras")
    vae_decode: VaeDecode = spec("full", "taesd: the Tiny AutoEncoder, much faster, slightly softer (drafts).")
    emphasis: Emphasis = spec("a1111", "How (word:1.3) weights apply: a1111 scales, then restores the mean; none "
                              "only scales.")
    clip_skip: int = spec(1, "Use the N-th last CLIP layer: 2 for many anime models, 1 otherwise.", range=(1, 12),
                          step=1, infotext="Clip skip")
    prompt_timeline: PromptTimeline = spec(
        "a1111", "[a:b:N]: a1111 = N with a '.' is a fraction (1..2 = the hires pass), else a step; legacy = N < 1 "
        "is a fraction, else a step (A1111's old prompt editing timelines).",
        infotext="Old prompt editing timelines")
    feature_cache: FeatureCache = spec("off", "DeepCache (Ma et al. 2024): between full UNet passes only the "
                                       "shallow branch runs, on cached deep features; not with tile_shift.")
    feature_cache_interval: int = spec(3, "A full UNet pass every N steps while caching (1 = the same image as "
                                       "off).", range=(1, 20), step=1, unit="steps")
    feature_cache_branch: int = spec(0, "Cached skip branch, DeepCache's cache_branch_id: 0 = shallowest and "
                                     "fastest; higher keeps more of the UNet (SD 1.5 ≤ 11, SDXL ≤ 8).", range=(0, 15),
                                     step=1)
    feature_cache_schedule: FeatureCacheSchedule = spec("uniform", "uniform: a full pass every N steps; "
                                                        "nonuniform: as many, denser early.")
    hires: HiresConfig = spec(help="Stage 2 (hires fix).", factory=HiresConfig, kind="group")
    tiling: TileConfig = spec(help="Tiled diffusion and tiled VAE.", factory=TileConfig, kind="group")
    control: tuple[ControlUnit, ...] = spec((), "ControlNet units.", kind="units", cli="", api=False)
    regions: tuple[Region, ...] = spec((), "Regional prompts (at most 16): rectangles with their own prompt, negative "
                                    "prompt, weight, feather and seed, as JSON text or a list.", kind="regions",
                                    cli="", infotext="Regions")
    region_base: RegionBase = spec("rest", "rest: the base prompt only where no region is; background: everywhere, "
                                   "regions blended over it.")
    mask: Any = spec(None, "Inpainting mask over init_image, the same size: white = repaint (grey = partial with "
                     "soft inpainting).", kind="image")
    inpaint: InpaintConfig = spec(help="Inpainting and outpainting.", factory=InpaintConfig, kind="group")

    @property
    def inpainting(self) -> bool:
        """A mask or an outpaint side is set: the run goes through `pipelines.edit.run`."""
        return self.mask is not None or any(self.inpaint.outpaint)


@dataclass(frozen=True)
class UpscaleRequest:
    """An existing image upscaled by a pixel upscaler, then (denoise > 0) refined with img2img."""

    image: Any = spec(None, "The image to upscale.", kind="image", cli="")  # the CLI's --image is required
    upscaler: str = spec("lanczos", "lanczos is built in; Real-ESRGAN-class files go in models/upscalers.",
                         kind="name", what=UPSCALER, infotext="Hires upscaler")
    scale: float = spec(2.0, "Upscale factor.", range=(1, "max_hires_scale"), ui_range=(1.25, 8), step=0.25,
                        unit="×", infotext="Hires upscale")
    denoise: float = spec(0.0, "Refine strength: 0 = upscale only; 0.2-0.4 adds detail with an img2img pass.",
                          range=(0, 1), step=0.05, infotext="Denoising strength")
    prompt: str = spec("", "Prompt of the refine pass.", kind="text")
    negative_prompt: str = spec("", "Negative prompt of the refine pass.", kind="text")
    model: str | None = spec(None, "Model of the refine pass; empty = the default model.", kind="name", what=MODEL,
                             infotext="Model")
    steps: int = spec(20, "Refine steps.", range=(1, "max_steps"), step=1, unit="steps", infotext="Steps")
    seed: int = spec(-1, "Seed of the refine pass; -1 = random.", range=(-1, 2**32 - 1), step=1, infotext="Seed")
    cfg: str = spec("7", "Guidance schedule of the refine pass.", kind="cfg", api=False, cli="")
    sampler: str = spec("DPM++ 2M Karras", "Sampler of the refine pass.", kind="name", what=SAMPLER, api=False,
                        cli="")


# ---------------------------------------------------------------- flat names

# Nested fields get a prefix (hires.scale -> hires_scale, tiling.size -> tile_size).
_PREFIX = {"hires": "hires_", "tiling": "tile_", "inpaint": ""}
_FLAT_EXCEPTIONS = {"tile_vae_tiling": "vae_tiling", "tile_vae_tile_size": "vae_tile_size",
                    "tile_vae_tile_mode": "vae_tile_mode",
                    "tile_memory_budget_gb": "memory_budget_gb"}
_NESTED_TYPES = {"hires": HiresConfig, "tiling": TileConfig, "inpaint": InpaintConfig}
NOT_FLAT = ("control", "init_image", "mask")  # set through their own routes (uploads, --control), not flat values


@dataclass(frozen=True)
class FlatField:
    """One flat request field: its public name, its group (None at the top), the dataclass field, its resolved
    annotation and its spec."""

    name: str
    group: str | None
    field: dataclasses.Field
    type: Any
    spec: FieldSpec


def _flat_name(group: str, name: str) -> str:
    flat = _PREFIX[group] + name
    return _FLAT_EXCEPTIONS.get(flat, flat)


def schema_fields(cls: type = GenerationRequest, *, images: bool = False) -> dict[str, FlatField]:
    """Every field of `cls` by flat name, nested groups expanded, in declaration order; `images` keeps the image
    fields (init_image, mask), which are not flat values. ControlNet units are never included (`unit_fields`)."""
    out: dict[str, FlatField] = {}
    types = hints(cls)
    for f in fields(cls):
        if f.name in _NESTED_TYPES and issubclass(cls, GenerationRequest):
            sub_types = hints(_NESTED_TYPES[f.name])
            for sub in fields(_NESTED_TYPES[f.name]):
                name = _flat_name(f.name, sub.name)
                out[name] = FlatField(name, f.name, sub, sub_types[sub.name], spec_of(sub))
        elif f.name == "control" or (f.name in NOT_FLAT and not images):
            continue
        else:
            out[f.name] = FlatField(f.name, None, f, types[f.name], spec_of(f))
    return out


def unit_fields() -> dict[str, FlatField]:
    """ControlUnit's fields by name."""
    types = hints(ControlUnit)
    return {f.name: FlatField(f.name, None, f, types[f.name], spec_of(f)) for f in fields(ControlUnit)}


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Map every flat field name to (group or None, dataclass field)."""
    return {n: (ff.group, ff.field) for n, ff in schema_fields().items()}


def flatten(req: GenerationRequest) -> dict[str, Any]:
    """The request as flat {name: value} (without images and ControlNet units)."""
    out: dict[str, Any] = {}
    for name, ff in schema_fields().items():
        src = getattr(req, ff.group) if ff.group else req
        out[name] = getattr(src, ff.field.name)
    return out


def from_flat(values: dict[str, Any], base: GenerationRequest | None = None, *, source: str = "request") -> GenerationRequest:
    """Build a request from flat names over `base`; unknown keys raise, naming `source` and the key."""
    known = schema_fields(type(base) if base is not None else GenerationRequest)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {g: {} for g in _NESTED_TYPES}
    for key, value in values.items():
        if key in NOT_FLAT:
            top[key] = value
            continue
        if key not in known:
            raise ValidationError(key, value, f"is not a known setting in {source}; known settings: {', '.join(sorted(known))}")
        ff = known[key]
        if ff.group:
            nested[ff.group][ff.field.name] = value
        else:
            top[key] = value
    base = base or GenerationRequest()
    for group, vals in nested.items():
        if vals:
            top[group] = replace(getattr(base, group), **vals)
    if isinstance(top.get("loras"), list):
        top["loras"] = tuple(top["loras"])
    return replace(base, **top)
