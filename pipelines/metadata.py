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

import io
import json
import logging
import math
import os
import re
from dataclasses import replace
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from pipelines.denoise.guidance import GuidanceSchedule, format_cfg, parse_cfg
from pipelines.denoise.region_spec import regions_to_json, validate_regions
from pipelines.denoise.schedulers import SAMPLERS, schedule_type
from pipelines.errors import ValidationError
from pipelines.request import ControlUnit, GenerationRequest, flatten, from_flat

log = logging.getLogger(__name__)

VERSION = "tessera-0.1"
TESSERA_KEY = "Tessera"
PNG_KEY = "parameters"
OLD_TIMELINES_KEY = "Old prompt editing timelines"  # A1111's infotext name of its `use_old_scheduling` option

# A1111's key-value regex (infotext_utils.re_param_code); values with , : " are json.dumps-quoted.
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_WS_RUN = re.compile(r"\s*")
_KEY_RUN = re.compile(r"[\w \-/]*")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_EXTRA_KEY_RE = re.compile(r"\w[\w \-/]*[\w\-/]")

# Our upscaler names -> A1111's display names; unknown names (upscaler files) are written and read as they are.
UPSCALER_NAMES = {
    "lanczos": "Lanczos",
    "latent": "Latent",
    "latent-bicubic": "Latent (bicubic)",
    "latent-nearest-exact": "Latent (nearest-exact)",
    "latent-antialiased": "Latent (antialiased)",
}
_UPSCALER_FROM_A1111 = {v.lower(): k for k, v in UPSCALER_NAMES.items()}

# Keys this module reads; `extra` may not use them. At least one of _CORE_KEYS marks a text as infotext.
_CORE_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", TESSERA_KEY)
_KNOWN_KEYS = frozenset({
    "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "CFG schedule", "Seed", "Size",
    "Model hash", "Model", "Denoising strength", "Clip skip", "Hires upscale", "Hires resize", "Hires steps",
    "Hires upscaler", "Hires sampler", "Hires schedule type", "Hires prompt", "Hires negative prompt",
    "Hires CFG Scale", "Loras", "Version", "Regions", TESSERA_KEY, OLD_TIMELINES_KEY,
    "Mask blur", "Inpaint area", "Masked area padding", "Masked content", "Mask mode", "Soft inpainting enabled",
})
# A1111's inpainting keys and values (modules/processing.py, img2img.py); values are ours lower-cased
_INPAINT_KEYS = {"Mask blur": "mask_blur", "Inpaint area": "inpaint_area", "Masked area padding": "inpaint_padding",
                 "Masked content": "masked_content", "Mask mode": "mask_mode",
                 "Soft inpainting enabled": "soft_inpainting"}


# ---------------------------------------------------------------- text helpers

def _number(x: Any) -> str:
    """Shortest text reading back to the same number (`7`, `0.35`); non-numbers via str()."""
    if isinstance(x, float):
        short = f"{x:g}"
        return short if float(short) == x else repr(x)
    return str(x)


def _quote(value: str) -> str:
    """A1111's `quote`: json.dumps the value when it would break the key-value line, else leave it."""
    risky = any(c in value for c in ',:"') or value != value.strip() or not value.isprintable()
    return json.dumps(value, ensure_ascii=False) if risky else value


def _unquote(value: str) -> str:
    """A1111's `unquote`: json.loads a "quoted" value; anything that does not decode stays as it is."""
    try:
        out = json.loads(value)
    except ValueError:
        return value
    return out if isinstance(out, str) else value


def param_pairs(line: str) -> list[tuple[str, str]]:
    """`PARAM_RE.findall(line)` in linear time: skips start positions that must fail the same way.

    A plain findall rescans a long run of key characters (or whitespace) from every position in it, which is
    quadratic on hostile text; a failed start inside such a run fails for every later start in the run.
    """
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while pos < n:
        m = PARAM_RE.match(line, pos)
        if m:
            out.append((m[1], m[2]))
            pos = m.end()
            continue
        ws_end = _WS_RUN.match(line, pos).end()
        if ws_end > pos:  # every start in the whitespace lands on ws_end, like a start at ws_end itself
            pos = ws_end + 1
            continue
        run_end = _KEY_RUN.match(line, pos).end()
        pos = run_end if run_end > pos and line[run_end:run_end + 1] != ":" else pos + 1
    return out


def _split_prompt(lines: list[str]) -> tuple[str, str]:
    """A1111's prompt / negative prompt split: stripped lines, `Negative prompt:` starts the negative."""
    prompt, negative, in_negative = "", "", False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", "Steps": "25", ...} with quoted values unquoted; never raises.

    The last line is the key-value line when A1111's regex finds at least 3 pairs in it; otherwise the whole
    text is prompt. Later duplicates of a key win, as in A1111.
    """
    *lines, last = str(text).strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative = _split_prompt(lines)
    out = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        if key in out and key in ("Prompt", "Negative prompt"):
            continue
        out[key] = _unquote(value) if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return out


# ---------------------------------------------------------------- writing

# sd-webui-controlnet's unit keys -> ControlUnit fields (Threshold A/B are canny's thresholds only for canny)
_CONTROL_KEYS = {"Module": "type", "Model": "model", "Weight": "scale", "Guidance Start": "start",
                 "Guidance End": "end", "Threshold A": "low", "Threshold B": "high", "Control Mode": "guess_mode"}
# sd-webui-controlnet's preprocessor names for the ones this app has under another name
_MODULE_ALIASES = {"depth_midas": "depth", "openpose_full": "openpose", "lineart_realistic": "lineart",
                   "lineart_anime": "lineart-anime", "softedge_hed": "softedge", "softedge_pidinet": "softedge-pidinet",
                   "scribble_hed": "scribble", "normal_bae": "normal"}


def _base_sampler(name: str) -> str:
    """Our "DPM++ 2M Karras" -> A1111 ≥1.9's Sampler "DPM++ 2M" (the Karras part goes to Schedule type)."""
    return name[: -len(" Karras")] if isinstance(name, str) and name.endswith(" Karras") else name


def _max_scale(schedule: GuidanceSchedule) -> float:
    """The plain `CFG scale` number of a schedule: its value when constant, else its largest scale."""
    return max(schedule.params[:2]) if schedule.kind in ("linear", "cosine", "step") else schedule.params[0]


def _a1111_fields(req: GenerationRequest, model_hash: str) -> dict[str, str]:
    """The A1111 keys for `req` (seed already the image's), unquoted, in A1111's order."""
    cfg = parse_cfg(req.cfg)
    out = {
        "Steps": _number(req.steps),
        "Sampler": _base_sampler(req.sampler),
        "Schedule type": schedule_type(req.sampler),
        "CFG scale": _number(_max_scale(cfg)),
        "Seed": _number(req.seed),
        "Size": f"{req.width}x{req.height}",
    }
    if model_hash:
        out["Model hash"] = model_hash
    if req.model:
        out["Model"] = req.model
    h = req.hires
    if h.enabled:
        if h.denoise is not None:
            out["Denoising strength"] = _number(h.denoise)
    elif req.strength != 1.0:
        out["Denoising strength"] = _number(req.strength)
    if req.clip_skip != 1:
        out["Clip skip"] = _number(req.clip_skip)
    if h.enabled:
        out["Hires upscale"] = _number(h.scale)
        if h.steps:
            out["Hires steps"] = _number(h.steps)
        out["Hires upscaler"] = UPSCALER_NAMES.get(h.upscaler, h.upscaler)
        if h.sampler:
            out["Hires sampler"] = _base_sampler(h.sampler)
            out["Hires schedule type"] = schedule_type(h.sampler)
        if h.prompt is not None:
            out["Hires prompt"] = h.prompt
        if h.negative_prompt is not None:
            out["Hires negative prompt"] = h.negative_prompt
        if h.cfg is not None:
            out["Hires CFG Scale"] = _number(_max_scale(parse_cfg(h.cfg)))
    if cfg.kind != "constant" or cfg.rescale:
        out["CFG schedule"] = format_cfg(cfg)
    if req.loras:
        out["Loras"] = ", ".join(req.loras)
    if req.prompt_timeline == "legacy":
        out[OLD_TIMELINES_KEY] = "True"
    if req.regions:
        out["Regions"] = regions_to_json(req.regions)
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
    out = {"Mask blur": _number(c.mask_blur), "Inpaint area": c.inpaint_area.capitalize(),
           "Masked content": c.masked_content, "Mask mode": c.mask_mode.capitalize()}
    if c.inpaint_area == "only masked":
        out["Masked area padding"] = _number(c.inpaint_padding)
    if c.soft_inpainting:
        out["Soft inpainting enabled"] = "True"
    return out


def _inpaint_values(params: dict[str, str]) -> dict[str, Any]:
    """The flat inpainting fields of A1111's keys (values compared case-insensitively)."""
    out: dict[str, Any] = {}
    for key, name in _INPAINT_KEYS.items():
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
    """One unit as sd-webui-controlnet writes it (its keys, `_CONTROL_KEYS`, for what a unit here has); the image
    is not stored."""
    values = {"type": u.type, "model": u.model or "default", "scale": _number(u.scale), "start": _number(u.start),
              "end": _number(u.end), "guess_mode": "ControlNet is more important" if u.guess_mode else "Balanced"}
    if u.type == "canny":  # Threshold A/B are the canny thresholds only for canny
        values |= {"low": _number(u.low), "high": _number(u.high)}
    return ", ".join(f"{key}: {values[field]}" for key, field in _CONTROL_KEYS.items() if field in values)


def _extra_fields(extra: dict[str, Any] | None) -> dict[str, str]:
    """`extra` as key-value pairs after checking each key survives A1111's parser and is not one of ours."""
    out: dict[str, str] = {}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _EXTRA_KEY_RE.fullmatch(key):
            raise ValidationError("extra", key, "keys must be words, spaces, - or / (at least 2 characters), like 'Seam score'")
        if key in _KNOWN_KEYS or re.fullmatch(r"ControlNet \d+", key):
            raise ValidationError("extra", key, "collides with a key the infotext writes itself; rename it")
        if value is not None:
            out[key] = _number(value)
    return out


def _line(fields: dict[str, str]) -> str:
    return ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())


def _differs(a: Any, b: Any) -> bool:
    """Whether a field needs the Tessera key: a different value, or type (int and float count as one)."""
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    return a != b or (not numbers and type(a) is not type(b))


def infotext(req: GenerationRequest, *, seed: int, model_hash: str, extra: dict[str, Any] | None = None) -> str:
    """A1111 `parameters` text of one image of `req`; `seed` is that image's seed (seed + i in a batch).

    `extra` entries ("Seam score": 1.03, "VAE": "fp32 fallback", ...) are written as additional keys; they are
    not part of the request. Request fields the A1111 keys do not reproduce go into the `Tessera` JSON key.
    """
    target = replace(req, seed=seed)
    fields = _a1111_fields(target, model_hash)
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


def _sampler(name: str, schedule: str | None) -> str:
    """A1111 Sampler + Schedule type -> our sampler name; older "DPM++ 2M Karras" alone works too.

    Names we do not have are kept (the engine's `check_sampler` reports them); a schedule type we cannot do
    for that sampler is dropped with a warning.
    """
    lower = {k.lower(): k for k in SAMPLERS}
    name = name.strip()
    schedule = (schedule or "Automatic").strip()
    wanted = f"{name} Karras" if schedule.lower() == "karras" and not name.endswith(" Karras") else name
    if wanted.lower() in lower:
        return lower[wanted.lower()]
    if name.lower() in lower and schedule.lower() not in ("automatic", "default"):
        log.warning("schedule type %r is not available for sampler %r; using %r", schedule, name, lower[name.lower()])
        return lower[name.lower()]
    return wanted


def _hires_values(params: dict[str, str], width: int | None, height: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "Hires upscale" in params:
        out["hires_scale"] = _float(params, "Hires upscale")
    else:  # A1111's "resize to WxH" instead of a factor
        m = _SIZE_RE.match(params["Hires resize"].strip())
        if m is None or not width or not height:
            raise ValidationError("Hires resize", params["Hires resize"], "must be WIDTHxHEIGHT, e.g. 1024x1024")
        out["hires_scale"] = max(int(m[1]) / width, int(m[2]) / height)
    if "Hires upscaler" in params:
        name = params["Hires upscaler"].strip()
        out["hires_upscaler"] = _UPSCALER_FROM_A1111.get(name.lower(), name)
    if "Hires steps" in params:
        out["hires_steps"] = _int(params, "Hires steps") or None
    if "Denoising strength" in params:
        out["hires_denoise"] = _float(params, "Denoising strength")
    if "Hires sampler" in params:
        out["hires_sampler"] = _sampler(params["Hires sampler"], params.get("Hires schedule type"))
    if "Hires prompt" in params:
        out["hires_prompt"] = params["Hires prompt"]
    if "Hires negative prompt" in params:
        out["hires_negative_prompt"] = params["Hires negative prompt"]
    if "Hires CFG Scale" in params:
        out["hires_cfg"] = _cfg(params, "Hires CFG Scale")
    return out


def _request_from_params(params: dict[str, str], base: GenerationRequest | None) -> GenerationRequest:
    """Map the A1111 keys of `parse_infotext` over `base`; the `Tessera` key is not applied here."""
    base = base or GenerationRequest()
    values: dict[str, Any] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    if "Steps" in params:
        values["steps"] = _int(params, "Steps")
    if "Sampler" in params:
        values["sampler"] = _sampler(params["Sampler"], params.get("Schedule type"))
    if "Seed" in params:
        values["seed"] = _int(params, "Seed")
    if "Size" in params:
        m = _SIZE_RE.match(params["Size"].strip())
        if m is None:
            raise ValidationError("Size", params["Size"], "must be WIDTHxHEIGHT, e.g. 512x768")
        values["width"], values["height"] = int(m[1]), int(m[2])
    if "Model" in params:
        values["model"] = params["Model"].strip()
    if "CFG schedule" in params:
        values["cfg"] = _cfg(params, "CFG schedule")
    elif "CFG scale" in params:
        values["cfg"] = _cfg(params, "CFG scale")
    values["clip_skip"] = _int(params, "Clip skip") if "Clip skip" in params else 1
    if "Hires upscale" in params or "Hires resize" in params:
        values.update(_hires_values(params, values.get("width", base.width), values.get("height", base.height)))
    else:
        if base.hires.enabled:
            values["hires_scale"] = 1.0  # the image was made without stage 2
        if "Denoising strength" in params:
            values["strength"] = _float(params, "Denoising strength")
    if "Loras" in params:
        values["loras"] = tuple(s.strip() for s in params["Loras"].split(",") if s.strip())
    values["prompt_timeline"] = _timeline(params)
    if "Regions" in params:
        values["regions"] = validate_regions(params["Regions"], values.get("width", base.width),
                                             values.get("height", base.height))
    values.update(_inpaint_values(params))
    return from_flat(values, base, source="infotext")


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
        for key, field in _CONTROL_KEYS.items():
            value = pairs.get(key, "").strip()
            if not value or (field in ("low", "high") and pairs.get("Module") != "canny"):
                continue
            if field == "guess_mode":
                unit[field] = value == "ControlNet is more important"
            elif field == "type":
                unit[field] = _MODULE_ALIASES.get(value, value)
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
    if not any(k in params for k in _CORE_KEYS):
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
    return from_flat(own, req, source=f"the infotext's {TESSERA_KEY} key")


# ---------------------------------------------------------------- image files

def png_info(params: str) -> PngInfo:
    """PNG text chunks holding `params` under `parameters` (iTXt when not Latin-1), for `image.save(pnginfo=...)`."""
    info = PngInfo()
    info.add_text(PNG_KEY, params)
    return info


def exif_info(params: str) -> Image.Exif:
    """EXIF with `params` as UserComment (UTF-16 "UNICODE", as A1111 writes JPEG/WebP), for `image.save(exif=...)`."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + params.encode("utf-16-be")
    return exif


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment bytes -> text: 8-byte charset prefix, UTF-16 (either byte order) for "UNICODE"."""
    if isinstance(raw, str):
        return raw.strip("\0")
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:  # mostly-ASCII text has its zero bytes first in big-endian
            big = body[0::2].count(0) >= body[1::2].count(0)
            text = body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = bytes(raw).decode("utf-8", errors="replace")
    return text.strip("\0")


def _parameters_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        return text
    try:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception as err:  # PIL raises many types on corrupt EXIF; metadata is optional
        log.warning("unreadable EXIF, no parameters read: %s", err)
        return None
    if not comment:
        return None
    return _decode_user_comment(comment) or None


def read_parameters(image_or_path: Image.Image | str | os.PathLike | bytes) -> str | None:
    """The `parameters` text of an image (PNG text chunk, else JPEG/WebP EXIF UserComment); None if absent.

    A file PIL cannot identify raises ValidationError; a damaged image gives None (logged), never an exception.
    """
    if isinstance(image_or_path, Image.Image):
        return _parameters_of(image_or_path)
    source = io.BytesIO(image_or_path) if isinstance(image_or_path, bytes | bytearray) else image_or_path
    shown = "<bytes>" if isinstance(source, io.BytesIO) else str(source)
    try:
        with Image.open(source) as image:
            return _parameters_of(image)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValidationError("image", shown, "is not an existing image file") from None
    except UnidentifiedImageError:
        raise ValidationError("image", shown, "is not an image PIL can read (PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError:
        raise ValidationError("image", shown, "is too large to open safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        log.warning("damaged image %s, no parameters read: %s", shown, err)
        return None
