"""Throughput with 1 vs N workers on one machine, measured in one run as a ratio, and the expected scaling of one
4096² ultra image over 1/2/4/8 devices from the measured time of one tile batch.

    python -m benchmarks.workers --devices cpu,cpu --jobs 8 --size 128 --steps 4     # this CPU (tiny model)
    python -m benchmarks.workers --devices all --model stable-diffusion-v1-5/stable-diffusion-v1-5 --size 512

The same jobs (distinct seeds) run first on worker 0 alone, then on every worker at once (a caller thread per
worker); images/minute = jobs / wall time. The scaling table takes the ultra preset's refine plan at 4096² (the
planner's tiles and tile batch for the budget given) and `pipelines.serving.multi_device.expected_speedup` with the
per-batch UNet time measured here on worker 0 at that tile shape, and the once-per-step time (guidance and
scheduler step on the whole canvas) measured at 4096².
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import torch

from pipelines.factory import build_pool
from pipelines.request.schema import GenerationRequest
from pipelines.serving.multi_device import expected_speedup
from pipelines.serving.workers import WorkerPool, parse_devices

log = logging.getLogger(__name__)


def images_per_minute(pool: WorkerPool, jobs: int, base: GenerationRequest, callers: int) -> float:
    """`jobs` requests (seeds 1..jobs) through the pool from `callers` threads; images per minute of wall time."""
    from dataclasses import replace

    todo = list(range(1, jobs + 1))
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                if not todo:
                    return
                seed = todo.pop()
            pool.generate(replace(base, seed=seed), save=False)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return jobs / (time.perf_counter() - t0) * 60


def batch_seconds(engine, model_name: str, tile: int, tile_batch: int, repeats: int = 3) -> float:
    """Median seconds of one UNet call with CFG on `tile_batch` tiles of `tile`² latent (the refine's shape)."""
    model = engine.manager.get(model_name)
    unet, dev, dtype = model.unet, model.device, model.dtype
    c = unet.config
    dim = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    x = torch.randn(2 * tile_batch, c.in_channels, tile, tile, device=dev, dtype=dtype)
    enc = torch.randn(2 * tile_batch, 77, dim, device=dev, dtype=dtype)
    added = None
    if model.spec.pooled:
        added = {"text_embeds": torch.randn(2 * tile_batch, 1280, device=dev, dtype=dtype),
                 "time_ids": torch.zeros(2 * tile_batch, 6, device=dev, dtype=dtype)}
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            unet(x, 500, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ultra_plan(engine, model_name: str, budget_gb: float):
    """The ultra preset's refine plan at 4096² for this model's family and a `budget_gb` device budget."""
    from pipelines.planner import PlanInput, TilingAsk, plan_generation

    family = engine.manager.resolve(model_name).family
    return plan_generation(PlanInput(4096, 4096, batch=1, budget_bytes=int(budget_gb * 1e9),
                                     family="sdxl" if family == "sdxl" else "sd1", dtype_bytes=2,
                                     tiling=TilingAsk(force="on", vae_tiling="on")))


def step_seconds(device: torch.device) -> float:
    """Guidance + one scheduler-like update on a 4096² SD latent canvas (once per step, not split)."""
    u = torch.randn(1, 4, 512, 512, device=device)
    c = torch.randn_like(u)
    x = torch.randn_like(u)
    t0 = time.perf_counter()
    for _ in range(3):
        x = x + 0.1 * (u + 7.5 * (c - u))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="cpu,cpu", help="as the app's --devices (default cpu,cpu)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--budget-gb", type=float, default=80.0, help="device budget for the 4096² plan (default 80)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    devices = parse_devices(args.devices)
    pool = build_pool(devices, "models", None)
    base = GenerationRequest(model=args.model, prompt="a lighthouse at dusk", width=args.size, height=args.size,
                             steps=args.steps, seed=1)
    for w in pool.workers:  # load the weights everywhere before timing
        w.engine.generate(base, save=False)
    one = images_per_minute(WorkerPool([pool.workers[0].engine]), args.jobs, base, callers=1)
    many = images_per_minute(pool, args.jobs, base, callers=len(pool))
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [f"{args.model}, {args.size}², {args.steps} steps, {args.jobs} jobs, devices {','.join(devices)}, "
             f"torch threads {torch.get_num_threads()}, 1-min load average {load} at the end", "",
             "| workers | images/min | ratio |", "|---|---|---|",
             f"| 1 | {one:.1f} | 1.00× |", f"| {len(pool)} | {many:.1f} | {many / one:.2f}× |", ""]
    plan = ultra_plan(pool.first, args.model, args.budget_gb)
    batches = plan.unet_evals_per_step
    device = pool.first.manager.current.device
    if device.type == "cuda":
        tile_s = batch_seconds(pool.first, args.model, plan.tile_size, plan.tile_batch)
        fixed_s = step_seconds(device)
        timing = f"one tile batch {tile_s * 1e3:.1f} ms and the once-per-step part {fixed_s * 1e3:.1f} ms on {device}"
    else:  # a CPU's tile time says nothing about a GPU's: the batch-count model alone
        tile_s, fixed_s = 1.0, 0.0
        timing = "per-batch time not measured (no GPU): tile batches alone, the once-per-step part left out"
    lines += [f"One 4096² ultra refine step: {plan.describe()}; {timing}", "",
              "| devices | tile batches on the busiest | expected speed-up |", "|---|---|---|"]
    for n in (1, 2, 4, 8):
        lines.append(f"| {n} | {-(-batches // n)} of {batches} | {expected_speedup(batches, n, tile_s, fixed_s):.2f}× |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
