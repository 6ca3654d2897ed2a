"""Validation of a request, once, at the boundary: each field as its schema says (`pipelines.request.checks.check_field`),
then the rules that join fields (sizes × pixels, overlap < tile, start ≤ end, inpainting's needs).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pipelines.errors import ValidationError
from pipelines.request.checks import _float, _in_range, check_and_parts, check_field, check_name, check_text
from pipelines.request.limits import Limits
from pipelines.request.regions import validate_regions

if TYPE_CHECKING:
    from pipelines.request.schema import (
        ControlUnit,
        GenerationRequest,
        HiresConfig,
        InpaintConfig,
        TileConfig,
        UpscaleRequest,
    )

__all__ = ["Limits", "check_name", "check_text", "hires_target", "parse_lora", "resolve_seed", "validate",
           "validate_control", "validate_feature_cache", "validate_hires", "validate_inpaint", "validate_tiling",
           "upscale_target", "validate_upscale"]


def _group(obj: Any, group: str | None, limits: Limits, skip: tuple[str, ...] = (), cls: type | None = None
           ) -> dict[str, Any]:
    """The flat fields of `group` (None = the top level of `cls`, by default GenerationRequest) of a request,
    checked by their schema: {field: value}."""
    from pipelines.request.schema import GenerationRequest, schema_fields

    return {ff.field.name: check_field(ff.name, getattr(obj, ff.field.name), ff.type, ff.spec, limits)
            for ff in schema_fields(cls or GenerationRequest).values() if ff.group == group and ff.name not in skip}


_CHECKED = "_tessera_checked"


def mark_checked(req: Any, under: Hashable) -> Any:
    """Brand `req` (a frozen request) as completely checked under `under` (the checker's limits and settings), so
    the layers it passes through next do not check it again; any change (`dataclasses.replace`) drops the brand."""
    object.__setattr__(req, _CHECKED, under)
    return req


def is_checked(req: Any, under: Hashable) -> bool:
    """Whether `req` itself was checked under `under` (equal limits and settings)."""
    return getattr(req, _CHECKED, None) == under


def validate(req: GenerationRequest, limits: Limits | None = None) -> GenerationRequest:
    """Check every field once, at the boundary; return the request with values normalised to their types."""
    limits = limits or Limits()
    top = _group(req, None, limits, skip=("loras",), cls=type(req))
    width, height = top["width"], top["height"]
    if width * height > limits.max_pixels:
        raise ValidationError("width", width, f"x height {height} exceeds {limits.max_pixels} pixels")
    check_and_parts("prompt", top["prompt"])
    return replace(req, **{
        **top, **validate_feature_cache(req, limits), "loras": _loras(req.loras, limits),
        "regions": validate_regions(req.regions, width, height, limits.max_prompt_chars),
        "hires": validate_hires(req.hires, width, height, limits),
        "tiling": validate_tiling(req.tiling, limits),
        "control": tuple(validate_control(u, i, limits) for i, u in enumerate(req.control)),
        "inpaint": validate_inpaint(req, width, height, limits),
    })


def _loras(loras: Any, limits: Limits) -> tuple[str, ...]:
    loras = loras or ()
    if isinstance(loras, str):  # the text form "name:weight, name2:weight" (API, infotext)
        loras = [spec.strip() for spec in loras.split(",") if spec.strip()]
    if not isinstance(loras, tuple | list):
        raise ValidationError("loras", loras, "must be a list of name:weight")
    loras = tuple(loras)
    if len(loras) > limits.max_loras:
        raise ValidationError("loras", f"<{len(loras)} LoRAs>", f"must list at most {limits.max_loras} LoRAs")
    for spec in loras:
        parse_lora(spec)
    return loras


def validate_hires(h: HiresConfig, width: int, height: int, limits: Limits) -> HiresConfig:
    """Check the stage-2 settings; sampler/upscaler names are checked by their owners."""
    scale = _float("hires_scale", h.scale)
    if scale not in (0.0, 1.0) and not 1.0 < scale <= limits.max_hires_scale:
        raise ValidationError("hires_scale", h.scale, f"must be 1 (off) or in (1, {limits.max_hires_scale:g}]")
    values = _group(h, "hires", limits, skip=("hires_scale",))
    check_and_parts("hires_prompt", values["prompt"])
    if scale > 1:
        tw, th = hires_target(width, height, scale)
        if max(tw, th) > limits.max_side or tw * th > limits.max_pixels:
            raise ValidationError("hires_scale", scale, f"makes {tw}x{th}, over the {limits.max_side}px limit; lower it")
    return replace(h, scale=scale, **values)


def validate_tiling(t: TileConfig, limits: Limits | None = None) -> TileConfig:
    """Check the tiling settings."""
    values = _group(t, "tiling", limits or Limits())
    size, overlap = values["size"], values["overlap"]
    if size is not None and overlap is not None and overlap >= size:
        raise ValidationError("tile_overlap", overlap, f"must be smaller than tile_size ({size})")
    return replace(t, **values)


def validate_control(u: ControlUnit, i: int, limits: Limits | None = None) -> ControlUnit:
    """Check one ControlNet unit's fields (the images and the model files are checked when loaded)."""
    from pipelines.request.schema import unit_fields

    p = f"control[{i}]."
    if u.image is None:
        raise ValidationError(p + "image", None, "is required: upload a control image")
    values = {n: check_field(p + n, getattr(u, n), ff.type, ff.spec, limits or Limits())
              for n, ff in unit_fields().items() if n != "image"}
    if values["start"] > values["end"]:
        raise ValidationError(p + "start", values["start"], f"must not be after end ({values['end']:g})")
    return replace(u, **values)


def validate_feature_cache(req: GenerationRequest, limits: Limits | None = None) -> dict[str, Any]:
    """The feature-cache fields, checked and normalised (as keyword arguments for `replace`), against `limits`
    (the engine's; None = the defaults) like every other field."""
    from pipelines.request.schema import schema_fields

    skip = tuple(n for n in schema_fields(type(req)) if not n.startswith("feature_cache"))
    values = {k: v for k, v in _group(req, None, limits or Limits(), skip=skip, cls=type(req)).items()
              if k.startswith("feature_cache")}
    if values["feature_cache"] == "on" and req.tiling.shift is True:
        raise ValidationError("feature_cache", "on", "cannot be on with tile_shift on (the grid moves every step, so "
                              "no cached tile feature could be reused); set tile_shift off or feature_cache off")
    return values


def validate_inpaint(req: GenerationRequest, width: int, height: int, limits: Limits) -> InpaintConfig:
    """Check the inpainting settings, and the mask and outpaint sizes when they are used."""
    out = replace(req.inpaint, **_group(req.inpaint, "inpaint", limits))
    sides = {f"outpaint_{s}": getattr(out, f"outpaint_{s}") for s in ("left", "right", "top", "bottom")}
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
    ow, oh = width + out.outpaint_left + out.outpaint_right, height + out.outpaint_top + out.outpaint_bottom
    if max(ow, oh) > limits.max_side or ow * oh > limits.max_pixels:
        side = next(n for n, v in sides.items() if v)
        raise ValidationError(side, sides[side], f"makes {ow}x{oh}, over the {limits.max_side}px / "
                                                 f"{limits.max_pixels} pixel limit; extend by less")
    scale = _float("hires_scale", req.hires.scale)
    if scale not in (0.0, 1.0):  # the refine repaints under the same mask, scaled (`pipelines.edit.run`)
        tw, th = hires_target(ow, oh, scale)
        if max(tw, th) > limits.max_side or tw * th > limits.max_pixels:
            raise ValidationError("hires_scale", scale, f"makes {tw}x{th} after outpainting, over the "
                                                        f"{limits.max_side}px limit; lower it")
    return out


def validate_upscale(req: UpscaleRequest, limits: Limits | None = None) -> UpscaleRequest:
    """Check an upscale request like a generation's fields: the image, then each field by its schema."""
    from PIL import Image

    from pipelines.request.schema import UpscaleRequest, schema_fields

    limits = limits or Limits()
    if not isinstance(req.image, Image.Image):
        raise ValidationError("image", type(req.image).__name__, "must be an image (PNG, JPEG or WebP)")
    scale = _float("scale", req.scale)
    if not 1.0 < scale <= limits.max_hires_scale:
        raise ValidationError("scale", req.scale, f"must be in (1, {limits.max_hires_scale:g}]")
    values = {n: check_field(n, getattr(req, n), ff.type, ff.spec, limits)
              for n, ff in schema_fields(UpscaleRequest, images=True).items() if n != "image"}
    tw, th = upscale_target(req.image.width, req.image.height, scale)
    if max(tw, th) > limits.max_side or tw * th > limits.max_pixels:
        raise ValidationError("scale", scale, f"makes {tw}x{th}, over the {limits.max_side}px limit; lower it")
    return replace(req, **values)


def upscale_target(width: int, height: int, scale: float) -> tuple[int, int]:
    """An upscale's output size: the image's sides cut to multiples of 8 (at least 8), times `scale`."""
    return hires_target(max(8, width - width % 8), max(8, height - height % 8), scale)


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

