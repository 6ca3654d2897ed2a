"""Command line: `python app.py generate ...` and `python app.py upscale ...` (headless, scriptable).

stdout gets one saved file path per line and nothing else; notes go to stderr. Bad input exits with code 2
and a one-line message naming the option, the value and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import TesseraError, ValidationError
from pipelines.request import DEFAULT_MODEL, ControlUnit

log = logging.getLogger("tessera.cli")

# CLI option -> flat request field (see pipelines/request.py); None values are left to presets/defaults.
_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model", "width": "width",
    "height": "height", "steps": "steps", "cfg": "cfg", "sampler": "sampler", "seed": "seed",
    "batch": "batch_size", "strength": "strength", "vae_decode": "vae_decode", "emphasis": "emphasis",
    "clip_skip": "clip_skip", "prompt_timeline": "prompt_timeline", "hires_scale": "hires_scale", "hires_upscaler": "hires_upscaler",
    "hires_denoise": "hires_denoise", "hires_steps": "hires_steps", "hires_sampler": "hires_sampler",
    "hires_prompt": "hires_prompt", "hires_cfg": "hires_cfg", "hires_control_tile": "hires_control_tile",
    "tiling": "tile_mode", "tile_size": "tile_size",
    "tile_overlap": "tile_overlap", "tile_blend": "tile_blend", "tile_batch": "tile_batch",
    "tile_shift": "tile_shift", "vae_tiling": "vae_tiling", "vae_tile_size": "vae_tile_size",
    "vae_tile_mode": "vae_tile_mode",
    "memory_budget_gb": "memory_budget_gb",
    "feature_cache": "feature_cache", "feature_cache_interval": "feature_cache_interval",
    "feature_cache_branch": "feature_cache_branch", "feature_cache_schedule": "feature_cache_schedule",
    "region_base": "region_base",
    "mask_blur": "mask_blur", "masked_content": "masked_content", "inpaint_area": "inpaint_area",
    "inpaint_padding": "inpaint_padding", "inpaint_size": "inpaint_size", "mask_mode": "mask_mode",
    "soft_inpainting": "soft_inpainting",
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto | fp16 | bf16 | fp32 (auto: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--models-dir", default="models", help="folder of local models, LoRAs, upscalers (default: models)")
    g.add_argument("--out", default="outputs", help="output folder; images go to OUT/<date>/ (default: outputs)")
    g.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention kernels (default: sdpa)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first run, faster after)")
    g.add_argument("--offload", action="store_true", help="keep weights on CPU, move each model to the GPU when used")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    _device_args(g)


def _device_args(g) -> None:
    """--devices / --split-image: one image's tile batches spread over several devices (`pipelines.serving.multi_device`)."""
    from pipelines.serving.workers import DEVICES_HELP, SPLIT_HELP, SPLIT_MODES

    g.add_argument("--devices", default=None, help=DEVICES_HELP)
    g.add_argument("--split-image", default="auto", choices=SPLIT_MODES, help=SPLIT_HELP)


def _generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--preset", help="a preset from presets/ (draft, fast, balanced, quality, ultra, or your own)")
    g.add_argument("--prompt", help="prompt; A1111 syntax: (word:1.3), ((word)), [word], BREAK, [a:b:0.5], [a|b]")
    g.add_argument("--negative-prompt", help="negative prompt")
    g.add_argument("--model", help=f"model name, local folder/.safetensors path, or tiny (default: {DEFAULT_MODEL})")
    g.add_argument("--lora", action="append", default=None, help="LoRA as name:weight (repeatable)")
    g.add_argument("--width", type=int, help="width in pixels, multiple of 8 (default 512)")
    g.add_argument("--height", type=int, help="height in pixels, multiple of 8 (default 512)")
    g.add_argument("--steps", type=int, help="sampling steps (default 25)")
    g.add_argument("--cfg", help="guidance: 7 | linear(4,9) | cosine(9,4) | step(9,5,0.5) | interval(7.5,0.2,0.8) "
                                 "[, rescale=0.7]")
    g.add_argument("--sampler", help="DPM++ 2M Karras (default), DPM++ 2M, DPM++ 2M SDE Karras, UniPC, Euler, "
                                     "Euler a, DDIM, PNDM, LCM, ...")
    g.add_argument("--seed", type=int, help="seed; -1 = random; image i of a batch uses seed+i")
    g.add_argument("--batch", type=int, help="images per run (default 1)")
    g.add_argument("--init-image", help="img2img: start from this image")
    g.add_argument("--strength", type=float, help="img2img denoise strength in [0,1] (default 1)")
    g.add_argument("--vae-decode", choices=["full", "taesd"], help="full VAE or Tiny AutoEncoder (fast drafts)")
    g.add_argument("--emphasis", choices=["a1111", "none"], help="prompt weight normalisation (default a1111)")
    g.add_argument("--clip-skip", type=int, help="use the N-th last CLIP layer (default 1)")
    g.add_argument("--prompt-timeline", choices=["a1111", "legacy"],
                   help="[a:b:N]: a1111 (default) = N with a '.' is a fraction (1..2 = the hires pass), else a step; "
                        "legacy = N < 1 is a fraction, else a step (A1111's old prompt editing timelines)")
    f = p.add_argument_group("feature caching (DeepCache)")
    f.add_argument("--feature-cache", choices=["off", "on"], help="between full UNet passes run only the shallow "
                                                                  "branch on cached deep features (default off)")
    f.add_argument("--feature-cache-interval", type=int, help="a full UNet pass every N steps, 1-20 (default 3)")
    f.add_argument("--feature-cache-branch", type=int, help="cached skip branch, 0 = shallowest/fastest (default 0)")
    f.add_argument("--feature-cache-schedule", choices=["uniform", "nonuniform"],
                   help="full passes every N steps, or as many denser early (default uniform)")
    h = p.add_argument_group("two-stage (hires)")
    h.add_argument("--hires-scale", type=float, help="upscale factor of stage 2 in (1, 8]; 1 = off")
    h.add_argument("--hires-upscaler", help="lanczos | latent | latent-bicubic | latent-nearest-exact | "
                                            "latent-antialiased | a file in models/upscalers")
    h.add_argument("--hires-denoise", type=float, help="refine strength in [0,1] (default 0.35; 0.55 for latent)")
    h.add_argument("--hires-steps", type=int, help="refine steps (default: --steps)")
    h.add_argument("--hires-sampler", help="refine sampler (default: --sampler)")
    h.add_argument("--hires-prompt", help="refine prompt (default: --prompt)")
    h.add_argument("--hires-cfg", help="refine guidance schedule (default: --cfg)")
    h.add_argument("--hires-control-tile", type=float, help="tile ControlNet scale in the refine (0 = off); keeps "
                                                            "the draft's structure at higher denoise")
    t = p.add_argument_group("tiling")
    t.add_argument("--tiling", choices=["auto", "on", "off"], help="tiled diffusion (default auto: when needed)")
    t.add_argument("--tile-size", type=int, help="tile size in latent pixels (x8 = image pixels)")
    t.add_argument("--tile-overlap", type=int, help="tile overlap in latent pixels")
    t.add_argument("--tile-blend", choices=["average", "gaussian"], help="MultiDiffusion average or Gaussian")
    t.add_argument("--tile-batch", type=int, help="tiles per UNet call")
    t.add_argument("--tile-shift", action="store_true", default=None, help="shift the tile grid randomly each step")
    t.add_argument("--vae-tiling", choices=["auto", "on", "off"], help="tiled VAE decode/encode (default auto)")
    t.add_argument("--vae-tile-size", type=int, help="VAE tile size in latent pixels")
    t.add_argument("--vae-tile-mode", choices=["auto", "exact", "stream"],
                   help="tiled VAE: exact = layer by layer (fast, ~3 full-size layers in RAM), stream = tile by tile "
                        "(bounded memory, slower); default auto: exact when it fits, else only the high-resolution "
                        "stages tile by tile")
    t.add_argument("--memory-budget-gb", type=float, help="memory budget for the tiling planner")
    r = p.add_argument_group("regional prompts")
    r.add_argument("--region", action="append", default=None, metavar="X,Y,W,H:PROMPT[:WEIGHT]",
                   help="a regional prompt (repeatable, at most 16): a rectangle in fractions of the image when "
                        "x, y, w, h are all <= 1, else in pixels of the stage-1 image; a trailing :number is the "
                        "region's weight (default 1). Negative prompt, feather and seed per region: the API's "
                        "JSON form (see README)")
    r.add_argument("--region-base", choices=["rest", "background"],
                   help="where the base prompt acts: rest (only outside the regions; default) or background "
                        "(everywhere, regions blended over it)")
    _inpaint_args(p)
    c = p.add_argument_group("ControlNet")
    c.add_argument("--control", action="append", default=[], metavar="TYPE:IMAGE[:scale[:start[:end]]]",
                   help="a ControlNet unit (repeatable); TYPE = canny | none | depth | openpose | ...")
    c.add_argument("--control-model", action="append", default=[],
                   help="ControlNet model for the unit at the same position (default: matches TYPE)")


def _inpaint_args(p: argparse.ArgumentParser) -> None:
    from pipelines.request import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT

    g = p.add_argument_group("inpainting / outpainting (with --init-image)")
    g.add_argument("--mask", help="inpainting mask, the image's size: white = repaint (grey = partial with "
                                  "--soft-inpainting)")
    g.add_argument("--mask-blur", type=int, help="mask blur in px, the paste-back's feather (default 4)")
    g.add_argument("--masked-content", choices=MASKED_CONTENT, help="what the masked area starts from")
    g.add_argument("--inpaint-area", choices=INPAINT_AREAS, help="only masked: inpaint the mask's box at "
                                                                  "--inpaint-size, then paste it back")
    g.add_argument("--inpaint-padding", type=int, help="only masked: context px around the mask (default 32)")
    g.add_argument("--inpaint-size", type=int, help="only masked: long side of the crop while inpainted "
                                                    "(default: the model's native size)")
    g.add_argument("--mask-mode", choices=MASK_MODES, help="repaint the white (default) or the black part")
    g.add_argument("--soft-inpainting", action="store_true", default=None,
                   help="grey mask levels are per-pixel change strengths (Differential Diffusion)")
    g.add_argument("--outpaint", metavar="LEFT,RIGHT,TOP,BOTTOM", help="extend the canvas by these px "
                                                                       "(multiples of 8), e.g. 128,128,0,0")


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
    up.add_argument("--scale", type=float, default=2.0, help="factor in (1, 8] (default 2)")
    up.add_argument("--upscaler", default="lanczos", help="lanczos or a file in models/upscalers")
    up.add_argument("--denoise", type=float, default=0.0, help="refine strength; 0 = upscale only (default)")
    up.add_argument("--prompt", default="", help="prompt for the refine pass")
    up.add_argument("--negative-prompt", default="", help="negative prompt for the refine pass")
    up.add_argument("--model", default=DEFAULT_MODEL, help="model for the refine pass")
    up.add_argument("--steps", type=int, default=20, help="refine steps (default 20)")
    up.add_argument("--seed", type=int, default=-1, help="seed of the refine pass")
    _common(up)
    return parser


def _parse_control(spec: str, model: str | None, i: int) -> ControlUnit:
    from pipelines.control import load_control_image

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
    from pipelines.control import load_control_image

    try:
        return load_control_image(Path(path))
    except ValidationError as exc:
        raise ValidationError(name, exc.value, exc.fix) from None


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt, None) is not None}
    if args.lora:
        values["loras"] = tuple(args.lora)
    if args.region:
        from pipelines.denoise.region_spec import parse_region_cli

        values["regions"] = tuple(parse_region_cli(text) for text in args.region)
    if getattr(args, "outpaint", None):
        values.update(_outpaint_values(args.outpaint))
    return values


def _engine(args: argparse.Namespace):
    from pipelines.factory import build_engine

    return build_engine(args, allow_paths=True)  # the CLI may name model files by path


def _request(args: argparse.Namespace):
    from pipelines.presets import PRESETS_DIR, load_preset
    from pipelines.request import GenerationRequest, check_name, from_flat

    base = GenerationRequest()
    if args.preset:
        check_name("--preset", args.preset, "a preset name")
        path = PRESETS_DIR / f"{args.preset}.json"
        if "/" in args.preset or not path.is_file():
            names = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.json")))
            raise ValidationError("--preset", args.preset, f"must be one of: {names}")
        base = load_preset(path).apply(base)
    req = from_flat(_values(args), base, source="the command line")
    extra: dict[str, Any] = {}
    if args.init_image:
        extra["init_image"] = _load_image(args.init_image, "init_image")
    if args.mask:
        from pipelines.edit.inpaint import load_mask

        extra["mask"] = load_mask(Path(args.mask), "mask")
    if args.control:
        models = args.control_model + [None] * len(args.control)
        extra["control"] = tuple(_parse_control(s, models[i], i) for i, s in enumerate(args.control))
    return from_flat(extra, req)


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
    result = engine.generate(_request(args))
    _report(result)
    return 0


def run_upscale(args: argparse.Namespace) -> int:
    engine = _engine(args)
    image = _load_image(args.image, "image")
    result = engine.upscale(image, upscaler=args.upscaler, scale=args.scale, denoise=args.denoise,
                            prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model,
                            steps=args.steps, seed=args.seed)
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
