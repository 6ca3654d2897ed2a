"""`python -m benchmarks --stack [--quick]`: the stacked-optimisation table, one row per layer of speed-up.

Each row adds one layer to the one above, on the same model, size and process, and is measured the same way:
latency (batch 1, median of the repeats after a warm-up), throughput (images/s of one batch-4 run), peak memory
(`torch.cuda.max_memory_allocated` on CUDA; on a CPU the in-process peak-RSS growth of the batch-4 run), energy
per image from NVML (CUDA only, `nvidia-ml-py`) and the speed-ups against row 1.

1. diffusers, fp32, DDIM 50 steps, default attention (AttnProcessor), full VAE;
2. + fp16 (GPU only; the other rows on CUDA run in fp16 too);
3. + SDPA (AttnProcessor2_0, the app's default);
4. + DPM++ 2M Karras, 20 steps (rows 1-4 are diffusers pipelines on the loaded components);
5. + TAESD decode (from here on the app's `Engine.generate`, a fresh engine per run);
6. + prompt cache (one engine kept across runs: the prompts are encoded once);
7. + guidance interval `interval(7.5,0.25,0.65)`;
8. + feature caching (DeepCache, a full UNet pass every 3 steps);
9. + torch.compile of the UNet (GPU only).
`--quick` runs DDIM 15 / DPM++ 6 steps at 256² (times `--size-scale`).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from benchmarks.context import Context, load_context
from benchmarks.measure import NotMeasured, load_average, measured_run
from benchmarks.settings import CFG, INTERVAL_CFG, NEGATIVE, PROMPT, SEED, Settings
from pipelines.denoise.stages import initial_noise
from pipelines.engine import Engine

log = logging.getLogger(__name__)
BATCH = 4


@dataclass(frozen=True)
class StackSizes:
    size: int
    ddim_steps: int
    steps: int


def stack_sizes(settings: Settings) -> StackSizes:
    base = StackSizes(256, 15, 6) if settings.quick else StackSizes(512, 50, 20)
    size = max(64, int(round(base.size * settings.size_scale / 8)) * 8)
    return replace(base, size=size)


@dataclass
class LayerResult:
    n: int
    layer: str
    latency_s: float | None = None
    images_per_s: float | None = None
    peak_mb: float | None = None
    memory_method: str | None = None
    energy_j_per_image: float | None = None
    unet_evals: int | None = None
    why_not: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the layers' runs: make(ctx, sz, batch) -> run

def _diffusers(sampler: str, steps_of: Callable[[StackSizes], int], default_attention: bool):
    def make(ctx: Context, sz: StackSizes, batch: int):
        pipe = ctx.family_pipeline(StableDiffusionPipeline, StableDiffusionXLPipeline, sampler)
        m = ctx.model
        shape = (m.unet.config.in_channels, sz.size // m.vae_scale, sz.size // m.vae_scale)
        latents = initial_noise([SEED + i for i in range(batch)], shape, ctx.device, m.dtype)[0]

        def run():
            with _classic_attention(ctx) if default_attention else contextlib.nullcontext():
                return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=sz.size, width=sz.size,
                            num_inference_steps=steps_of(sz), guidance_scale=CFG, num_images_per_prompt=batch,
                            latents=latents.clone()).images
        return run
    return make


@contextlib.contextmanager
def _classic_attention(ctx: Context):
    """diffusers' default AttnProcessor (no SDPA) on the UNet and VAE for the run; the app's processors after."""
    from diffusers.models.attention_processor import AttnProcessor

    mods = [ctx.eager_unet, ctx.model.vae]
    saved = [m.attn_processors for m in mods]
    for m in mods:
        m.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        for m, procs in zip(mods, saved, strict=True):
            m.set_attn_processor(procs)


def _app(keep_engine: bool = False, **fields: Any):
    def make(ctx: Context, sz: StackSizes, batch: int):
        knobs = {"cfg": str(CFG), **fields}
        req = ctx.request(width=sz.size, height=sz.size, steps=sz.steps, sampler="DPM++ 2M Karras",
                          batch_size=batch, vae_decode="taesd", **knobs)
        kept = Engine(ctx.manager, None, allow_paths=ctx.engine.allow_paths)

        def run():
            engine = kept if keep_engine else Engine(ctx.manager, None, allow_paths=ctx.engine.allow_paths)
            return engine.generate(req, save=False)
        return run
    return make


def _cpu_only_not(reason: str):
    return lambda ctx: reason if ctx.device.type != "cuda" else None


LAYERS: tuple[tuple[str, Callable | None, Callable[[Context], str | None]], ...] = (
    ("diffusers fp32, DDIM {ddim_steps} steps, default attention, full VAE",
     _diffusers("DDIM", lambda s: s.ddim_steps, True), lambda ctx: None),
    ("+ fp16", _diffusers("DDIM", lambda s: s.ddim_steps, True),
     _cpu_only_not("GPU only: CPU matmuls in fp16/bf16 are emulated or slower than fp32 here, so rows stay fp32")),
    ("+ SDPA", _diffusers("DDIM", lambda s: s.ddim_steps, False), lambda ctx: None),
    ("+ DPM++ 2M Karras {steps} steps", _diffusers("DPM++ 2M Karras", lambda s: s.steps, False), lambda ctx: None),
    ("+ TAESD decode (app from here)", _app(), lambda ctx: None),
    ("+ prompt cache", _app(keep_engine=True), lambda ctx: None),
    ("+ guidance interval", _app(keep_engine=True, cfg=INTERVAL_CFG), lambda ctx: None),
    ("+ feature caching (interval 3)", _app(keep_engine=True, cfg=INTERVAL_CFG, feature_cache="on",
                                            feature_cache_interval=3), lambda ctx: None),
    ("+ torch.compile", None, _cpu_only_not("GPU only: inductor's CPU compile of the UNet takes minutes per shape")),
)


# ---------------------------------------------------------------- measuring

class _Energy:
    """Joules used by GPU 0 during a run (NVML total-energy counter, mJ); None off CUDA or without nvidia-ml-py."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as exc:  # no library or no counter: energy stays empty, the row is still measured
            log.info("NVML energy not available: %s", exc)

    def read_j(self) -> float | None:
        return None if self.handle is None else self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000


def _evals(ctx: Context, out: Any) -> int:
    stats = getattr(out, "stats", None)
    return stats["unet_evals"] if isinstance(stats, dict) else ctx.counter.samples


def measure_layer(ctx: Context, n: int, title: str, make, sz: StackSizes, energy: _Energy) -> LayerResult:
    r = LayerResult(n, title)
    s = ctx.settings
    with torch.no_grad():
        run1 = make(ctx, sz, 1)
        for _ in range(s.warmup):
            run1()
        times = []
        for _ in range(max(1, s.repeats)):
            ctx.counter.reset()
            seconds, out, _ = measured_run(run1, ctx.device, memory=False)
            times.append(seconds)
            if sum(times) >= s.budget_s:
                break
        r.latency_s, r.unet_evals = statistics.median(times), _evals(ctx, out)
        run4 = make(ctx, sz, BATCH)
        before = energy.read_j()
        seconds, _, mem = measured_run(run4, ctx.device, memory=True)
        after = energy.read_j()
    r.images_per_s = BATCH / seconds
    if mem is not None:
        r.peak_mb, r.memory_method = (mem.peak_mb if mem.method.startswith("cuda") else mem.delta_mb), mem.method
    if before is not None and after is not None:
        r.energy_j_per_image = (after - before) / BATCH
    return r


def _compiled(ctx: Context):
    """Row 9's run: the app's last row with the UNet compiled (restored afterwards by the caller)."""
    ctx.model.pipe.unet = torch.compile(ctx.eager_unet, dynamic=False)
    return _app(keep_engine=True, cfg=INTERVAL_CFG, feature_cache="on", feature_cache_interval=3)


def run_stack(settings: Settings) -> tuple[Context, list[LayerResult]]:
    """Every layer in order; on CUDA rows 1 runs in fp32 and the others in fp16 (a second loaded copy)."""
    sz = stack_sizes(settings)
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    ctx32 = load_context(replace(settings, dtype="fp32"))
    ctx = load_context(replace(settings, dtype="fp16")) if cuda else ctx32
    ctx.cache["load_start"] = load_average()
    energy = _Energy(ctx.device)
    results = []
    for n, (title, make, why_not) in enumerate(LAYERS, start=1):
        title = title.format(**vars(sz))
        reason = why_not(ctx)
        if reason:
            results.append(LayerResult(n, title, why_not=reason))
            continue
        use = ctx32 if n == 1 else ctx
        if n == 9:
            make = _compiled(ctx)
        try:
            results.append(measure_layer(use, n, title, make, sz, energy))
        except (NotMeasured, torch.OutOfMemoryError) as exc:
            results.append(LayerResult(n, title, why_not=f"not measured: {exc}"))
        finally:
            if n == 9:
                ctx.model.pipe.unet = ctx.eager_unet
    return ctx, results


# ---------------------------------------------------------------- report

def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table(ctx: Context, results: list[LayerResult]) -> str:
    cuda = ctx.device.type == "cuda"
    first = results[0]
    head = ["#", "layer", "latency (batch 1)", "speed-up vs 1", f"images/s (batch {BATCH})", "throughput vs 1",
            "peak MiB" if cuda else "peak RSS growth MiB", "energy J/image", "UNet evals (batch 1)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.why_not:
            lines.append(f"| {r.n} | {r.layer} | – | – | – | – | – | – | – | {r.why_not} |")
            continue
        speed = first.latency_s / r.latency_s if first.latency_s and r.latency_s else None
        thr = r.images_per_s / first.images_per_s if first.images_per_s and r.images_per_s else None
        lat = f"{r.latency_s * 1000:.1f} ms" if r.latency_s < 1 else f"{r.latency_s:.2f} s"
        cells = [str(r.n), r.layer, lat, _num(speed, ".2f") + "×", _num(r.images_per_s, ".3g"),
                 _num(thr, ".2f") + "×", _num(r.peak_mb, ",.0f"),
                 _num(r.energy_j_per_image, ".1f") if cuda else "– (CUDA only)", str(r.unet_evals),
                 "; ".join(r.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(ctx: Context, sz: StackSizes) -> str:
    from benchmarks.report import device_name

    return (f"Stacked optimisations: model {ctx.settings.model} ({ctx.model.family}), {device_name(ctx.device)}, "
            f"{sz.size}², batch 1 latency and batch {BATCH} throughput, 1-min load average "
            f"{ctx.cache.get('load_start')} at start, {load_average()} at end")


def to_json(ctx: Context, results: list[LayerResult]) -> dict[str, Any]:
    from benchmarks.report import meta

    return {"meta": {**meta(ctx), "stack_sizes": vars(stack_sizes(ctx.settings)), "batch": BATCH},
            "rows": [vars(r) for r in results]}


def main(settings: Settings, json_path: Path | None, markdown: Path | None, results_dir: Path) -> int:
    from benchmarks.report import write_json

    ctx, results = run_stack(settings)
    text = f"{header(ctx, stack_sizes(settings))}\n\n{table(ctx, results)}\n"
    print(text)
    name = Path(settings.model).name
    stem = f"stack-{name}-{ctx.device.type}{'-quick' if settings.quick else ''}"
    path = json_path or results_dir / f"{stem}.json"
    write_json(path, to_json(ctx, results))
    md = markdown or path.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
    print(f"JSON: {path}\nMarkdown: {md}")
    return 0

