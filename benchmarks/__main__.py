"""`python -m benchmarks [--device cpu|cuda] [--model tiny|sd15-random|sdxl-random|FOLDER] [--quick] [--json PATH]
[--cases a,b]`: every case against its baseline in this process; prints a markdown table, writes JSON."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.settings import BUILTIN_MODELS, CASES, Settings

RESULTS = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--model", default="tiny", help=f"{' | '.join(BUILTIN_MODELS)} | a local diffusers folder "
                                                   "(default tiny; the *-random ones are real-size, random weights)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--quick", action="store_true", help="small sizes, few steps and repeats (minutes on a CPU)")
    p.add_argument("--stack", action="store_true",
                   help="the stacked-optimisation table instead (rows 1-9: fp32 DDIM diffusers ... + feature caching "
                        "+ torch.compile); writes benchmarks/results/stack-<model>-<device>[-quick].json and .md")
    p.add_argument("--stack-table", default="auto", choices=["auto", "cpu", "gpu"],
                   help="with --stack: auto = the CPU table (diffusers fp32 -> engine -> bf16 -> caching -> compile -> "
                        "TAESD) on a CPU, the GPU table (rows 1-9) elsewhere; gpu/cpu pick one anywhere")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {','.join(CASES)}")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/<model>-<device>.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table (with notes) to this file")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per measurement (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; quick 2)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating a measurement after this many seconds of timed runs (default 120; quick 10)")
    p.add_argument("--memory", default="auto", choices=["auto", "subprocess", "inprocess", "off"],
                   help="auto: CUDA allocator peak in process; CPU: peak RSS growth in a fresh process per variant")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the app's UNet like `app.py --compile`; baselines stay eager")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="with --compile: reduce-overhead = CUDA graphs (default: the app's own compile call)")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse_qkv_projections() on UNet and VAE (both sides)")
    p.add_argument("--tile-batch", type=int, default=None, help="tiles per UNet call in the tiled case (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: one per core)")
    p.add_argument("--size-scale", type=float, default=1.0, help="multiply all sizes (the test suite uses 0.25)")
    p.add_argument("--cache-dir", default="", help="where sd15-random/sdxl-random are built (default: "
                                                   "$TESSERA_CACHE/benchmarks or ~/.cache/tessera/benchmarks)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"error: `--cases` must be a comma-separated subset of {','.join(CASES)}, got {args.cases!r}")
    if not 0 < args.size_scale <= 4:
        raise SystemExit(f"error: `--size-scale` must be in (0, 4], got {args.size_scale}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: `--device` cuda was asked for but torch sees no CUDA device; use --device cpu")
    s = Settings(device=args.device, model=args.model, dtype=args.dtype, attention=args.attention, quick=args.quick,
                 size_scale=args.size_scale, cases=cases, warmup=max(0, args.warmup), memory=args.memory,
                 channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode,
                 fuse_qkv=args.fuse_qkv, tile_batch=args.tile_batch, threads=max(0, args.threads),
                 cache_dir=args.cache_dir)
    return replace(s, repeats=args.repeats or (2 if args.quick else 5),
                   budget_s=args.budget_s if args.budget_s is not None else (10.0 if args.quick else 120.0))


def default_json(settings: Settings, device: str) -> Path:
    name = Path(settings.model).name if settings.model not in BUILTIN_MODELS else settings.model
    return RESULTS / f"{name}-{device}.json"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    settings = settings_from(args)
    if args.stack and (args.stack_table == "cpu" or (args.stack_table == "auto" and settings.device == "cpu")):
        from benchmarks import cpu_stack

        return cpu_stack.main(settings, args.json, args.markdown, RESULTS)
    if args.stack:
        from benchmarks import stack

        return stack.main(settings, args.json, args.markdown, RESULTS)
    from benchmarks import report, runner

    ctx, results = runner.run(settings)
    text = f"{report.header(ctx)}\n\n{report.table(ctx, results)}\n\n{report.notes(results)}\n"
    print(text)
    path = args.json or default_json(settings, ctx.device.type)
    report.write_json(path, report.to_json(ctx, results))
    print(f"JSON: {path}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
