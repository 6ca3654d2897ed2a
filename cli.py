"""Command line: `python app.py generate ...` and `python app.py upscale ...` (headless, scriptable).

stdout gets one saved file path per line and nothing else; notes go to stderr. Bad input exits with code 2
and a one-line message naming the option, the value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import TesseraError, ValidationError
from pipelines.request.fields import bounds, choices, kind_of, python_type
from pipelines.request.schema import ControlUnit, FlatField, GenerationRequest, UpscaleRequest, schema_fields

log = logging.getLogger("tessera.cli")

# Request options are derived from the schema (`pipelines.request`): flag = the field's `cli=` name, else the flat
# name with "-"; type, choices and help come from the field. `_FIELDS` maps each option's dest to its field.
_GROUPS = {"hires": "two-stage (hires)", "tiling": "tiling", "inpaint": "inpainting / outpainting (with --init-image)",
           "feature_cache": "feature caching (DeepCache)", "region": "regional prompts"}
_PREFIX_GROUPS = ("feature_cache", "region")  # top-level fields grouped by their name's start


def _dest(ff: FlatField) -> str:
    return (ff.spec.cli or ff.name).replace("-", "_")


def _schema_fields(cls: type) -> list[FlatField]:
    """The fields of `cls` that get a generic option (`cli=""` fields have options of their own)."""
    return [ff for ff in schema_fields(cls, images=True).values() if ff.spec.cli != ""]


def _option_fields(cls: type) -> dict[str, str]:
    """{option dest: flat field} of the options whose values are flat request values (images are loaded apart)."""
    return {_dest(ff): ff.name for ff in _schema_fields(cls) if kind_of(ff.type, ff.spec) != "image"}


_FIELDS = _option_fields(GenerationRequest)


def option_help(ff: FlatField) -> str:
    """An option's help: the field's sentence, its range and unit, and its default."""
    text = ff.spec.help
    rng = bounds(ff.spec)
    if rng is not None and kind_of(ff.type, ff.spec) in ("int", "float"):
        text += f" From {_num(rng[0])} to {_num(rng[1])}{' ' + ff.spec.unit if ff.spec.unit else ''}."
    default = ff.field.default
    if default not in (None, "", (), dataclasses.MISSING) and not isinstance(default, bool):
        text += f" Default: {default}."
    return text.replace("%", "%%")  # argparse formats help with %


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def add_schema_option(g: Any, ff: FlatField) -> None:
    """One request field as an option of group `g`, all derived from its schema."""
    flag = "--" + (ff.spec.cli or ff.name).replace("_", "-")
    kind = kind_of(ff.type, ff.spec)
    if kind == "bool":
        g.add_argument(flag, dest=_dest(ff), action="store_true", default=None, help=option_help(ff))
    elif kind == "image":
        g.add_argument(flag, dest=_dest(ff), metavar="FILE", help=option_help(ff))
    else:
        g.add_argument(flag, dest=_dest(ff), type=python_type(ff.type, ff.spec), choices=choices(ff.type),
                       help=option_help(ff))


def _schema_args(p: argparse.ArgumentParser, cls: type) -> dict[str, Any]:
    """Every generic request option of `cls`, in argument groups by the field's group; returns the groups."""
    groups: dict[str, Any] = {}
    for ff in _schema_fields(cls):
        title = _GROUPS.get(ff.group or next((p for p in _PREFIX_GROUPS if ff.name.startswith(p)), ""), "generation")
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        add_schema_option(groups[title], ff)
    return groups


def _common(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_machine_options

    g = p.add_argument_group("machine")
    add_machine_options(g)
    g.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset from presets/ (draft, fast, balanced, quality, ultra, or your own)")
    groups = _schema_args(p, GenerationRequest)
    groups["generation"].add_argument("--lora", action="append", default=None, help="LoRA as name:weight (repeatable)")
    groups[_GROUPS["region"]].add_argument(
        "--region", action="append", default=None, metavar="X,Y,W,H:PROMPT[:WEIGHT]",
        help="a regional prompt (repeatable, at most 16): a rectangle in fractions of the image when x, y, w, h are "
             "all <= 1, else in pixels of the stage-1 image; a trailing :number is the region's weight (default 1). "
             "Negative prompt, feather and seed per region: the API's JSON form (see README)")
    groups[_GROUPS["inpaint"]].add_argument("--outpaint", metavar="LEFT,RIGHT,TOP,BOTTOM",
                                            help="extend the canvas by these px (multiples of 8), e.g. 128,128,0,0")
    c = p.add_argument_group("ControlNet")
    c.add_argument("--control", action="append", default=[], metavar="TYPE:IMAGE[:scale[:start[:end]]]",
                   help="a ControlNet unit (repeatable); TYPE = canny | none | depth | openpose | ...")
    c.add_argument("--control-model", action="append", default=[],
                   help="ControlNet model for the unit at the same position (default: matches TYPE); "
                        "tiny-controlnet is the built-in test model")


def _outpaint_values(text: str) -> dict[str, int]:
    parts = text.split(",")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) != 4:
        raise ValidationError("--outpaint", text, "must be four whole numbers LEFT,RIGHT,TOP,BOTTOM, e.g. 128,128,0,0")
    return {f"outpaint_{n}": v for n, v in zip(("left", "right", "top", "bottom"), sides, strict=True)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Tessera: fast high-resolution Stable Diffusion")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate images and print their paths",
                         description="Generate images headless; prints each saved PNG's path on its own line.")
    _generation_args(gen)
    _common(gen)
    up = sub.add_parser("upscale", help="upscale an image (optionally refine it) and print the path",
                        description="Upscale an existing image: an upscaler, then an optional img2img refine.")
    up.add_argument("--image", required=True, help="the image to upscale")
    _schema_args(up, UpscaleRequest)
    _common(up)
    return parser


def _parse_control(spec: str, model: str | None, i: int) -> ControlUnit:
    from pipelines.control.images import load_control_image

    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 5 or not parts[0] or not parts[1]:
        raise ValidationError(f"--control #{i + 1}", spec, "must be TYPE:IMAGE[:scale[:start[:end]]], e.g. canny:edges.png:0.8")
    nums = []
    for p in parts[2:]:
        try:
            nums.append(float(p))
        except ValueError:
            raise ValidationError(f"--control #{i + 1}", spec, f"has a non-number {p!r} where scale/start/end go") from None
    image = load_control_image(Path(parts[1]))
    return ControlUnit(image=image, type=parts[0], model=model, **dict(zip(("scale", "start", "end"), nums, strict=False)))


def _load_image(path: str, name: str):
    """An image file as a checked RGB PIL image; errors name `name` (not "control image")."""
    from pipelines.control.images import load_control_image

    try:
        return load_control_image(Path(path))
    except ValidationError as exc:
        raise ValidationError(name, exc.value, exc.fix) from None


def _values(args: argparse.Namespace) -> dict[str, Any]:
    fields = _option_fields(GenerationRequest)
    values = {field: getattr(args, opt) for opt, field in fields.items() if getattr(args, opt, None) is not None}
    if args.lora:
        values["loras"] = tuple(args.lora)
    if args.region:
        from pipelines.request.regions import parse_region_cli

        values["regions"] = tuple(parse_region_cli(text) for text in args.region)
    if getattr(args, "outpaint", None):
        values.update(_outpaint_values(args.outpaint))
    return values


def _engine(args: argparse.Namespace):
    from pipelines.factory import build_engine

    return build_engine(args, allow_paths=True)  # the CLI may name model files by path


def _request(args: argparse.Namespace, engine: Any = None):
    from pipelines.request.checks import check_name
    from pipelines.request.presets import PRESETS_DIR, load_preset, preset_for
    from pipelines.request.schema import from_flat

    base = GenerationRequest()
    if args.preset:
        check_name("--preset", args.preset, "a preset name")
        path = PRESETS_DIR / f"{args.preset}.json"
        if "/" in args.preset or not path.is_file():
            names = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.json")))
            raise ValidationError("--preset", args.preset, f"must be one of: {names}")
        preset = load_preset(path)
        manager = getattr(engine, "manager", None)
        if manager is not None:  # the tier for this device and the LoRAs present (a CPU tier, a few-step LoRA)
            preset = preset_for(preset, manager, getattr(args, "model", None) or base.model)
        sys.stderr.write(f"preset {preset.name}: {preset.description}\n")
        base = preset.apply(base)
    req = from_flat(_values(args), base, source="the command line")
    extra: dict[str, Any] = {}
    if args.init_image:
        extra["init_image"] = _load_image(args.init_image, "init_image")
    if args.mask:
        from pipelines.edit.inpaint import load_mask

        extra["mask"] = load_mask(Path(args.mask), "mask")
    if args.control:
        for i, model in enumerate(args.control_model):
            _check_control_model(model, i, Path(args.models_dir))
        models = args.control_model + [None] * len(args.control)
        extra["control"] = tuple(_parse_control(s, models[i], i) for i, s in enumerate(args.control))
    return from_flat(extra, req)


def _check_control_model(model: str, i: int, models_dir: Path) -> None:
    """A --control-model name, refused naming the option and listing every choice (the built-in tiny one too)."""
    from pipelines.control.models import list_controlnets, resolve_controlnet
    from pipelines.control.units import TINY_CONTROLNET

    if model == TINY_CONTROLNET:
        return
    try:
        resolve_controlnet(model, models_dir)
    except ValidationError as exc:
        fix = exc.fix
        if fix.startswith("must be one of"):
            names = ", ".join([TINY_CONTROLNET, *list_controlnets(models_dir)])
            fix = f"must be one of {names}, or a diffusers folder / .safetensors file in {models_dir / 'controlnet'}"
        option = "--control-model" if i == 0 else f"--control-model #{i + 1}"
        raise ValidationError(option, exc.value, fix) from None


def _report(result) -> None:
    for path in result.paths:
        sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    s = result.stats
    line = f"{len(result.images)} image(s), seeds {result.seeds[0]}..{result.seeds[-1]}, {s.get('seconds', 0):.1f}s, " \
           f"{s.get('unet_evals', 0)} UNet evals ({s.get('evals_saved', 0)} saved)"
    if s.get("seam_score") is not None:
        line += f", seam score {s['seam_score']:.3f}"
    if s.get("unet_shallow_calls") is not None:
        line += f", feature cache: {s['unet_full_calls']} full / {s['unet_shallow_calls']} shallow UNet calls"
    sys.stderr.write(line + "\n" + f"plan: {s.get('plan', '')}\n")
    for w in result.warnings:
        sys.stderr.write(f"warning: {w}\n")


def run_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    result = engine.generate(_request(args, engine))
    _report(result)
    return 0


def run_upscale(args: argparse.Namespace) -> int:
    engine = _engine(args)
    values = {field: getattr(args, opt) for opt, field in _option_fields(UpscaleRequest).items()
              if getattr(args, opt, None) is not None}
    result = engine.upscale(UpscaleRequest(image=_load_image(args.image, "image"), **values))
    _report(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # the libraries' loading/saving bars: noise between a script's output lines
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "upscale":
            return run_upscale(args)
    except TesseraError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    parser.print_help()
    return 2
