"""`python -m benchmarks --stack --device cpu`: the CPU stack, every row's ratio against plain diffusers fp32
measured in the same run, interleaved (round r runs row 1, row 2, ... once each, then round r+1), with wall time
and process CPU time (all threads; on a shared machine the steadier figure of the work done).

1. diffusers fp32 (StableDiffusionPipeline on the loaded components: DPM++ 2M Karras, SDPA, full VAE decode);
2. the app's Engine.generate, fp32, the same sampler, steps, size and decode;
3. + bf16 (UNet, text encoders and VAE; a second loaded copy; `--dtype auto` picks it on a CPU with native bf16);
4. + feature caching, DeepCache's default: a full UNet pass every 3 steps, branch 0;
5. + torch.compile (inductor, CPU), measured after a warm-up compile only with `--compile` (minutes per shape);
6. + TAESD decode (the model folder's TAESD; random weights for the random models: speed only).
`--quick`: 256², 6 steps; else 512², 6 steps. `--repeats` rounds (default 2 here), after one warm-up round.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from benchmarks.context import Context, load_context
from benchmarks.measure import load_average
from benchmarks.settings import CFG, NEGATIVE, PROMPT, SEED, Settings
from pipelines.denoise.stages import initial_noise
from pipelines.engine import Engine

log = logging.getLogger(__name__)
SAMPLER = "DPM++ 2M Karras"


@dataclass
class Row:
    n: int
    layer: str
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    why_not: str | None = None
    run: Any = None

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_s)


def _diffusers(ctx: Context, size: int, steps: int):
    pipe = ctx.family_pipeline(StableDiffusionPipeline, StableDiffusionXLPipeline, SAMPLER)
    m = ctx.model
    shape = (m.unet.config.in_channels, size // m.vae_scale, size // m.vae_scale)
    latents = initial_noise([SEED], shape, ctx.device, m.dtype)[0]
    return lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                        guidance_scale=CFG, latents=latents.clone()).images


def _engine(ctx: Context, size: int, steps: int, **fields: Any):
    req = ctx.request(**{"width": size, "height": size, "steps": steps, "sampler": SAMPLER, "cfg": str(CFG),
                         "vae_decode": "full", **fields})
    engine = Engine(ctx.manager, None, allow_paths=ctx.engine.allow_paths)
    return lambda: engine.generate(req, save=False)


def _timed(run) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        run()
    return time.perf_counter() - w0, time.process_time() - c0


def run_cpu_stack(settings: Settings) -> tuple[Context, list[Row], dict[str, Any]]:
    size = max(64, int(round((256 if settings.quick else 512) * settings.size_scale / 8)) * 8)
    steps = 6
    ctx32 = load_context(replace(settings, dtype="fp32", compile=False))
    ctx16 = load_context(replace(settings, dtype="bf16", compile=False))
    cache = dict(feature_cache="on", feature_cache_interval=3, feature_cache_branch=0)
    rows = [
        Row(1, f"diffusers fp32, {SAMPLER} {steps} steps, SDPA, full VAE", run=_diffusers(ctx32, size, steps)),
        Row(2, "Tessera engine, fp32", run=_engine(ctx32, size, steps)),
        Row(3, "+ bf16", run=_engine(ctx16, size, steps)),
        Row(4, "+ feature caching (interval 3, branch 0)", run=_engine(ctx16, size, steps, **cache)),
        Row(5, "+ torch.compile (inductor CPU)"),
        Row(6, "+ TAESD decode", run=_engine(ctx16, size, steps, **cache, vae_decode="taesd")),
    ]
    if ctx16.model.taesd is None:
        rows[5].why_not, rows[5].run = "no TAESD in the model folder (offline): not measured", None
    if settings.compile:
        eager = ctx16.model.pipe.unet
        compiled = torch.compile(eager, dynamic=False)
        base = _engine(ctx16, size, steps, **cache)

        def with_compiled():
            ctx16.model.pipe.unet = compiled
            try:
                return base()
            finally:
                ctx16.model.pipe.unet = eager
        rows[4].run = with_compiled
    else:
        rows[4].why_not = ("not measured: needs `--compile` (inductor's CPU compile of the real UNet takes minutes "
                           "per shape on this 2-core machine)")
    meta: dict[str, Any] = {"size": size, "steps": steps, "load_start": load_average(),
                            "threads": torch.get_num_threads()}
    live = [r for r in rows if r.run is not None]
    for r in live if settings.warmup else ():  # warm-up round (a compiled row compiles here)
        w, c = _timed(r.run)
        log.info("warm-up %s: %.1f s", r.layer, w)
        meta.setdefault("warmup_s", {})[r.n] = round(w, 2)
    for _ in range(max(1, settings.repeats)):
        for r in live:
            w, c = _timed(r.run)
            r.wall_s.append(w)
            r.cpu_s.append(c)
            log.info("%s: %.1f s wall, %.1f s CPU", r.layer, w, c)
    compile_row = rows[4]
    if compile_row.wall_s and compile_row.cpu > rows[3].cpu:
        compile_row.why_not = "measured, not kept: slower than row 4"
    meta["load_end"] = load_average()
    return ctx16, rows, meta


def table(rows: list[Row]) -> str:
    first = rows[0]
    head = ["#", "layer", "wall (median)", "wall vs 1", "CPU time (median)", "CPU vs 1", "rounds (wall s)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.wall_s:
            lines.append(f"| {r.n} | {r.layer} | – | – | – | – | – | {r.why_not or ''} |")
            continue
        rounds = ", ".join(f"{w:.1f}" for w in r.wall_s)
        lines.append(f"| {r.n} | {r.layer} | {r.wall:.1f} s | {first.wall / r.wall:.2f}× | {r.cpu:.1f} s | "
                     f"{first.cpu / r.cpu:.2f}× | {rounds} | {r.why_not or ''} |")
    return "\n".join(lines)


def main(settings: Settings, json_path: Path | None, markdown: Path | None, results_dir: Path) -> int:
    from benchmarks.report import device_name, write_json

    settings = replace(settings, repeats=settings.repeats if settings.repeats != 5 else 2)
    ctx, rows, meta = run_cpu_stack(settings)
    head = (f"CPU stack: model {settings.model} ({ctx.model.family}), {device_name(ctx.device)}, {meta['size']}², "
            f"batch 1, {meta['steps']} steps, CFG {CFG}, {meta['threads']} torch threads, {len(rows[0].wall_s)} interleaved "
            f"round(s) after {1 if settings.warmup else 0} warm-up round; 1-min load average {meta['load_start']} at start, {meta['load_end']} at end")
    text = f"{head}\n\n{table(rows)}\n"
    print(text)
    stem = f"stack-{Path(settings.model).name}-cpu{'-quick' if settings.quick else ''}"
    path = json_path or results_dir / f"{stem}.json"
    write_json(path, {"meta": meta, "rows": [{k: v for k, v in vars(r).items() if k != "run"} for r in rows]})
    md = markdown or path.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
    print(f"JSON: {path}\nMarkdown: {md}")
    return 0
