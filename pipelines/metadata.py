"""A1111-compatible `parameters` infotext: written into every image, parsed back into a request.

The text is AUTOMATIC1111's (`modules/processing.py create_infotext`, parsed like
`modules/infotext_utils.py parse_generation_parameters`), so A1111, Forge, Civitai and friends read our images
and we read theirs:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ..., Tessera: "{...}"

Whatever the A1111 keys cannot say (a CFG schedule's exact form, tiling, TAESD decoding, ...) goes into our own
`Tessera` key as a JSON object of flat request fields, so `request_from_infotext(infotext(req, seed=s, ...))`
gives back `replace(req, seed=s)` exactly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from typing import Any

from pipelines.a1111 import (
    CONTROL_KEYS,
    CORE_KEYS,
    EXTRA_KEY_RE,
    HIRES_DENOISE_KEY,
    INFOTEXT_KEYS,
    INPAINT_KEYS,
    KNOWN_KEYS,
    MODULE_ALIASES,
    OLD_TIMELINES_KEY,
    PARAM_RE,
    SETTING_KEYS,
    SIZE_RE,
    TESSERA_KEY,
    UPSCALE_KEYS,
    UPSCALER_FROM_A1111,
    UPSCALER_NAMES,
    base_sampler,
    number,
    param_pairs,
    parse_infotext,
    quote,
    sampler_of,
)
from pipelines.denoise.schedulers import schedule_type
from pipelines.errors import ValidationError
from pipelines.image_info import PNG_KEY, exif_info, png_info, read_parameters
from pipelines.request.cfg import GuidanceSchedule, format_cfg, parse_cfg
from pipelines.request.regions import regions_to_json, validate_regions
from pipelines.request.schema import ControlUnit, GenerationRequest, UpscaleRequest, flatten, from_flat

log = logging.getLogger(__name__)

# tessera-0.2: "Size" of an only-masked run is its processing size, an img2img/inpaint run with hires writes its
# own strength as "Denoising strength" and the hires one as HIRES_DENOISE_KEY, the decoder's notes are "VAE notes",
# and feature_cache_branch k is DeepCache's cache_branch_id k (0.1's k was k+1). tessera-0.1 texts are read as they
# were written.
VERSION = "tessera-0.2"
OLD_VERSIONS = frozenset({"tessera-0.1"})
K = INFOTEXT_KEYS

__all__ = ["OLD_TIMELINES_KEY", "PARAM_RE", "PNG_KEY", "TESSERA_KEY", "UPSCALER_NAMES", "VERSION", "control_settings",
           "exif_info", "infotext", "param_pairs", "parse_infotext", "png_info", "read_parameters",
           "request_from_infotext", "upscale_infotext"]


# ---------------------------------------------------------------- writing

def _max_scale(schedule: GuidanceSchedule) -> float:
    """The plain `CFG scale` number of a schedule: its value when constant, else its largest scale."""
    return max(schedule.params[:2]) if schedule.kind in ("linear", "cosine", "step") else schedule.params[0]


def _img2img(req: GenerationRequest) -> bool:
    """Made from an init image (img2img, inpainting, outpainting): A1111's img2img tab."""
    return req.init_image is not None or req.inpainting


def _a1111_fields(req: GenerationRequest, model_hash: str, size: tuple[int, int] | None = None) -> dict[str, str]:
    """The A1111 keys for `req` (seed already the image's), unquoted, in A1111's order; `size` is what A1111's
    `Size` means when it is not the output size (only masked: the processing size)."""
    cfg = parse_cfg(req.cfg)
    size_w, size_h = size or (req.width, req.height)
    out = {
        K["steps"]: number(req.steps),
        K["sampler"]: base_sampler(req.sampler),
        "Schedule type": schedule_type(req.sampler),
        K["cfg"]: number(_max_scale(cfg)),
        K["seed"]: number(req.seed),
        "Size": f"{size_w}x{size_h}",
    }
    if model_hash:
        out["Model hash"] = model_hash
    if req.model:
        out[K["model"]] = req.model
    h = req.hires
    if h.enabled and not _img2img(req):  # A1111's txt2img: "Denoising strength" is the hires pass's
        if h.denoise is not None:
            out[K["hires_denoise"]] = number(h.denoise)
    elif req.strength != 1.0 or h.enabled:  # A1111's img2img: the strength the image itself was made with
        out[K["strength"]] = number(req.strength)
    if req.clip_skip != 1:
        out[K["clip_skip"]] = number(req.clip_skip)
    if h.enabled:
        out[K["hires_scale"]] = number(h.scale)
        if h.steps:
            out[K["hires_steps"]] = number(h.steps)
        out[K["hires_upscaler"]] = UPSCALER_NAMES.get(h.upscaler, h.upscaler)
        if h.sampler:
            out[K["hires_sampler"]] = base_sampler(h.sampler)
            out["Hires schedule type"] = schedule_type(h.sampler)
        if h.prompt is not None:
            out[K["hires_prompt"]] = h.prompt
        if h.negative_prompt is not None:
            out[K["hires_negative_prompt"]] = h.negative_prompt
        if h.cfg is not None:
            out[K["hires_cfg"]] = number(_max_scale(parse_cfg(h.cfg)))
        if _img2img(req) and h.denoise is not None:
            out[HIRES_DENOISE_KEY] = number(h.denoise)
    if cfg.kind != "constant" or cfg.rescale:
        out["CFG schedule"] = format_cfg(cfg)
    if req.loras:
        out[K["loras"]] = ", ".join(req.loras)
    if req.prompt_timeline == "legacy":
        out[OLD_TIMELINES_KEY] = "True"
    if req.regions:
        out[K["regions"]] = regions_to_json(req.regions)
    out.update(_inpaint_fields(req))
    for i, unit in enumerate(req.control):
        out[f"ControlNet {i}"] = _control_text(unit)
    return out


def _inpaint_fields(req: GenerationRequest) -> dict[str, str]:
    """A1111's inpainting keys, for an image made with a mask or outpainting ("Masked area padding" only with
    "Inpaint area: Only masked", "Soft inpainting enabled" only when on, as A1111 writes them)."""
    if not req.inpainting:
        return {}
    c = req.inpaint
    out = {K["mask_blur"]: number(c.mask_blur), K["inpaint_area"]: c.inpaint_area.capitalize(),
           K["masked_content"]: c.masked_content, K["mask_mode"]: c.mask_mode.capitalize()}
    if c.inpaint_area == "only masked":
        out[K["inpaint_padding"]] = number(c.inpaint_padding)
    if c.soft_inpainting:
        out[K["soft_inpainting"]] = "True"
    return out


def _inpaint_values(params: dict[str, str]) -> dict[str, Any]:
    """The flat inpainting fields of A1111's keys (values compared case-insensitively)."""
    out: dict[str, Any] = {}
    for key, name in INPAINT_KEYS.items():
        if key not in params:
            continue
        if name in ("mask_blur", "inpaint_padding"):
            out[name] = _int(params, key)
        elif name == "soft_inpainting":
            out[name] = params[key].strip().lower() == "true"
        else:
            out[name] = params[key].strip().lower()
    return out


def _control_text(u: ControlUnit) -> str:
    """One unit as sd-webui-controlnet writes it (its keys, `CONTROL_KEYS`, for what a unit here has); the image
    is not stored."""
    values = {"type": u.type, "model": u.model or "default", "scale": number(u.scale), "start": number(u.start),
              "end": number(u.end), "guess_mode": "ControlNet is more important" if u.guess_mode else "Balanced"}
    if u.type == "canny":  # Threshold A/B are the canny thresholds only for canny
        values |= {"low": number(u.low), "high": number(u.high)}
    return ", ".join(f"{key}: {values[field]}" for key, field in CONTROL_KEYS.items() if field in values)


def _extra_fields(extra: dict[str, Any] | None) -> dict[str, str]:
    """`extra` as key-value pairs after checking each key survives A1111's parser and is not one of ours."""
    out: dict[str, str] = {}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not EXTRA_KEY_RE.fullmatch(key):
            raise ValidationError("extra", key, "keys must be words, spaces, - or / (at least 2 characters), like 'Seam score'")
        if key in SETTING_KEYS:
            raise ValidationError("extra", key, "is an A1111 key that pastes a setting (VAE = the VAE file to load); "
                                                "rename it, e.g. 'VAE notes'")
        if key in KNOWN_KEYS or re.fullmatch(r"ControlNet \d+", key):
            raise ValidationError("extra", key, "collides with a key the infotext writes itself; rename it")
        if value is not None:
            out[key] = number(value)
    return out


def _line(fields: dict[str, str]) -> str:
    return ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())


def _differs(a: Any, b: Any) -> bool:
    """Whether a field needs the Tessera key: a different value, or type (int and float count as one)."""
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    return a != b or (not numbers and type(a) is not type(b))


def infotext(req: GenerationRequest, *, seed: int, model_hash: str, extra: dict[str, Any] | None = None,
             size: tuple[int, int] | None = None) -> str:
    """A1111 `parameters` text of one image of `req`; `seed` is that image's seed (seed + i in a batch).

    `extra` entries ("Seam score": 1.03, "VAE notes": "fp32 VAE fallback", ...) are written as additional keys;
    they are not part of the request. `size`: an only-masked run's processing size, written as `Size` as A1111
    does (the output size is then in the `Tessera` key). Request fields the A1111 keys do not reproduce go into the
    `Tessera` JSON key.
    """
    target = replace(req, seed=seed)
    fields = _a1111_fields(target, model_hash, size if target.inpaint.inpaint_area == "only masked" else None)
    fields.update(_extra_fields(extra))
    fields["Version"] = VERSION
    negative = f"\nNegative prompt: {target.negative_prompt}" if target.negative_prompt else ""
    head = f"{target.prompt}{negative}"
    rebuilt = flatten(_request_from_params(parse_infotext(f"{head}\n{_line(fields)}".strip()), None))
    own = {k: v for k, v in flatten(target).items() if _differs(v, rebuilt[k])}
    if own:
        fields[TESSERA_KEY] = json.dumps(own, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"{head}\n{_line(fields)}".strip()


# ---------------------------------------------------------------- reading

def _int(params: dict[str, str], key: str) -> int:
    try:
        return int(params[key].strip())
    except ValueError:
        raise ValidationError(key, params[key], "must be a whole number") from None


def _float(params: dict[str, str], key: str) -> float:
    try:
        return float(params[key].strip())
    except ValueError:
        raise ValidationError(key, params[key], "must be a number") from None


def _cfg(params: dict[str, str], key: str) -> str:
    try:
        return format_cfg(parse_cfg(params[key].strip()))
    except ValidationError as err:
        raise ValidationError(key, params[key], err.fix) from None


def _text(params: dict[str, str], key: str) -> str:
    return params[key]


def _upscaler(params: dict[str, str], key: str) -> str:
    name = params[key].strip()
    return UPSCALER_FROM_A1111.get(name.lower(), name)


# flat field -> how its A1111 value reads (the key is the schema's `infotext=`, `INFOTEXT_KEYS`)
_HIRES_READERS = {
    "hires_upscaler": _upscaler, "hires_steps": lambda p, k: _int(p, k) or None, "hires_denoise": _float,
    "hires_sampler": lambda p, k: sampler_of(p[k], p.get("Hires schedule type")), "hires_prompt": _text,
    "hires_negative_prompt": _text, "hires_cfg": _cfg,
}
_READERS = {"steps": _int, "sampler": lambda p, k: sampler_of(p[k], p.get("Schedule type")), "seed": _int,
            "model": lambda p, k: p[k].strip()}


def _read(params: dict[str, str], readers: dict[str, Any]) -> dict[str, Any]:
    """{flat field: value} for each field of `readers` whose A1111 key is in `params`."""
    return {name: read(params, K[name]) for name, read in readers.items() if K[name] in params}


def _hires_values(params: dict[str, str], width: int | None, height: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if K["hires_scale"] in params:
        out["hires_scale"] = _float(params, K["hires_scale"])
    else:  # A1111's "resize to WxH" instead of a factor
        m = SIZE_RE.match(params["Hires resize"].strip())
        if m is None or not width or not height:
            raise ValidationError("Hires resize", params["Hires resize"], "must be WIDTHxHEIGHT, e.g. 1024x1024")
        out["hires_scale"] = max(int(m[1]) / width, int(m[2]) / height)
    return out | _read(params, _HIRES_READERS)


def _request_from_params(params: dict[str, str], base: GenerationRequest | None) -> GenerationRequest:
    """Map the A1111 keys of `parse_infotext` over `base`; the `Tessera` key is not applied here."""
    base = base or GenerationRequest()
    values: dict[str, Any] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", ""),
                              **_read(params, _READERS)}
    if "Size" in params:
        m = SIZE_RE.match(params["Size"].strip())
        if m is None:
            raise ValidationError("Size", params["Size"], "must be WIDTHxHEIGHT, e.g. 512x768")
        if _processing_size(params):  # A1111's only masked: the crop's size while inpainted, not the output's
            values["inpaint_size"] = max(int(m[1]), int(m[2]))
        else:
            values["width"], values["height"] = int(m[1]), int(m[2])
    if "CFG schedule" in params:
        values["cfg"] = _cfg(params, "CFG schedule")
    elif K["cfg"] in params:
        values["cfg"] = _cfg(params, K["cfg"])
    values["clip_skip"] = _int(params, K["clip_skip"]) if K["clip_skip"] in params else 1
    if K["hires_scale"] in params or "Hires resize" in params:
        values.update(_hires_values(params, values.get("width", base.width), values.get("height", base.height)))
        if HIRES_DENOISE_KEY in params:  # tessera-0.2, an init image: "Denoising strength" is the image's own
            values["hires_denoise"] = _float(params, HIRES_DENOISE_KEY)
            if K["strength"] in params:
                values["strength"] = _float(params, K["strength"])
    else:
        if base.hires.enabled:
            values["hires_scale"] = 1.0  # the image was made without stage 2
        if K["strength"] in params:
            values["strength"] = _float(params, K["strength"])
    if K["loras"] in params:
        values["loras"] = tuple(s.strip() for s in params[K["loras"]].split(",") if s.strip())
    values["prompt_timeline"] = _timeline(params)
    if K["regions"] in params:
        values["regions"] = validate_regions(params[K["regions"]], values.get("width", base.width),
                                             values.get("height", base.height))
    values.update(_inpaint_values(params))
    return from_flat(values, base, source="infotext")


def _processing_size(params: dict[str, str]) -> bool:
    """Whether `Size` is an only-masked run's processing size (A1111, Tessera from 0.2) rather than the output's."""
    only_masked = params.get(K["inpaint_area"], "").strip().lower() == "only masked"
    return only_masked and params.get("Version", "").strip() not in OLD_VERSIONS


def _timeline(params: dict[str, str]) -> str:
    """"legacy" when the text says "Old prompt editing timelines: True", or (A1111's `infotext_versions.backcompat`)
    when it was written by A1111 before 1.6.0 and its prompt has a "["; else "a1111"."""
    if OLD_TIMELINES_KEY in params:
        return "legacy" if params[OLD_TIMELINES_KEY].strip().lower() == "true" else "a1111"
    version = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:-.*)?", params.get("Version", "").strip())
    if version and (int(version[1]), int(version[2])) < (1, 6) and "[" in params.get("Prompt", ""):
        return "legacy"
    return "a1111"


def request_from_infotext(text: str, base: GenerationRequest | None = None) -> GenerationRequest:
    """The request an infotext describes (ours or A1111's), over `base` for what the text does not say.

    Unknown A1111 keys are ignored; a bad value raises ValidationError naming its key; the `Tessera` JSON key
    is applied last with `from_flat`, whose unknown field names are rejected. Hostile text (numbers of
    thousands of digits, JSON nested 100,000 deep) gets a ValidationError too, never another exception.
    """
    try:
        return _request_from_infotext(text, base)
    except ValidationError:
        raise
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ValidationError("parameters", text, f"could not be read ({type(exc).__name__})") from None


def control_settings(text: str, units: int) -> list[dict[str, Any]]:
    """The settings of `ControlNet 0` .. `ControlNet {units - 1}` in an infotext (ours or sd-webui-controlnet's),
    one dict of ControlUnit fields per unit ({} where absent); the images are not in the text. Values that do not
    read as their field's type are left out; never raises."""
    params = parse_infotext(text) if isinstance(text, str) else {}
    out: list[dict[str, Any]] = []
    for i in range(units):
        unit: dict[str, Any] = {}
        pairs = dict(param_pairs(params.get(f"ControlNet {i}", "")))
        for key, field in CONTROL_KEYS.items():
            value = pairs.get(key, "").strip()
            if not value or (field in ("low", "high") and pairs.get("Module") != "canny"):
                continue
            if field == "guess_mode":
                unit[field] = value == "ControlNet is more important"
            elif field == "type":
                unit[field] = MODULE_ALIASES.get(value, value)
            elif field == "model":  # A1111 appends the file's short hash: "control_v11p_sd15_canny [d14c016b]"
                unit[field] = None if value == "default" else re.sub(r" \[[0-9a-f]{8,10}\]$", "", value)
            else:
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    unit[field] = int(number) if field in ("low", "high") else number
        out.append(unit)
    return out


def _request_from_infotext(text: str, base: GenerationRequest | None) -> GenerationRequest:
    params = parse_infotext(text) if isinstance(text, str) else {}
    if not any(k in params for k in CORE_KEYS):
        raise ValidationError(
            "parameters", text,
            "is not Stable Diffusion generation parameters (expected a prompt and a last line like "
            "'Steps: 25, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512')",
        )
    req = _request_from_params(params, base)
    if TESSERA_KEY not in params:
        return req
    raw = params[TESSERA_KEY]
    try:
        own = json.loads(raw)
    except ValueError:
        own = None
    if not isinstance(own, dict):
        raise ValidationError(TESSERA_KEY, raw, "must be a JSON object of Tessera settings, e.g. {\"tile_mode\":\"on\"}")
    for key in ("control", "init_image", "mask"):
        if key in own:
            raise ValidationError(key, own[key], "cannot be set from infotext")
    return from_flat(_renumbered_branch(own, params.get("Version", "")), req, source=f"the infotext's {TESSERA_KEY} key")


def _renumbered_branch(own: dict[str, Any], version: str) -> dict[str, Any]:
    """Tessera 0.1 wrote feature_cache_branch k for what is now branch k+1 (DeepCache's numbering since 0.2); the
    default 0 was not written, so a cached 0.1 image without the key ran branch 1."""
    if version.strip() != "tessera-0.1" or own.get("feature_cache") != "on":
        return own
    branch = own.get("feature_cache_branch", 0)
    return own | {"feature_cache_branch": branch + 1} if isinstance(branch, int) and not isinstance(branch, bool) else own


def upscale_infotext(req: UpscaleRequest, size: tuple[int, int], upscaler: str) -> str:
    """The `parameters` text of a plain upscale (no refine): the prompt, then the upscale as A1111's hires keys
    (`UPSCALE_KEYS`, from the schema) and the source size; `upscaler` is the one that ran (auto resolved)."""
    k = UPSCALE_KEYS
    return (f"{req.prompt}\n{k['steps']}: 0, Size: {size[0]}x{size[1]}, {k['scale']}: {req.scale:g}, "
            f"{k['upscaler']}: {upscaler}, Source size: {req.image.width}x{req.image.height}")
