"""Run the rows: time each variant in this process (warm-up, then repeated synchronised runs), measure its peak
memory (CUDA allocator in process; on CPU a fresh forked process per variant, since RSS peaks are per process),
and count its UNet evaluations."""

from __future__ import annotations

import gc
import logging
import multiprocessing
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.cases import ROWS, Row, V, Variant
from benchmarks.context import Context, load_context
from benchmarks.measure import Measurement, Memory, NotMeasured, load_average, measured_run
from benchmarks.settings import Settings

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 3600


@dataclass
class RowResult:
    row: Row
    title: str
    app: Measurement
    base: Measurement
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        a, b = self.app.median_s, self.base.median_s
        return b / a if a and b else None


def memory_mode(settings: Settings, device: torch.device) -> str:
    """auto: CUDA's allocator peak in process; on CPU a fresh process per variant (forkserver), where available."""
    if settings.memory != "auto":
        return settings.memory
    if device.type == "cuda":
        return "inprocess"
    return "subprocess" if "forkserver" in multiprocessing.get_all_start_methods() else "inprocess"


def _info(out: Any) -> dict[str, Any]:
    stats = getattr(out, "stats", None)
    if not stats:
        return {}
    return {k: stats[k] for k in ("plan", "unet_evals", "evals_saved", "tiles_per_step", "seam_score") if k in stats}


def measure_variant(ctx: Context, variant: Variant, mode: str) -> Measurement:
    """Warm up, then time up to `repeats` runs (stopping after `budget_s`); memory from the first timed run."""
    s = ctx.settings
    m = Measurement(variant.label)
    try:
        with torch.no_grad():
            if s.warmup:  # compiled graphs may still specialise on step-dependent values: warm up in full
                warm = variant.make(ctx, ctx.sizes if s.compile else ctx.sizes.for_warmup())
                for _ in range(s.warmup):
                    warm()
                del warm
            run = variant.make(ctx, ctx.sizes)
            out = None
            for i in range(max(1, s.repeats)):
                out = None  # let the previous output go before the next run
                ctx.counter.reset()
                seconds, out, mem = measured_run(run, ctx.device, memory=mode == "inprocess" and i == 0)
                m.times.append(seconds)
                m.memory = mem or m.memory
                if sum(m.times) >= s.budget_s:
                    break
            m.unet_calls, m.unet_evals = ctx.counter.calls, ctx.counter.samples
            m.output, m.info = out, _info(out)
    except NotMeasured as exc:
        m.error = str(exc)
    except torch.OutOfMemoryError:
        m.error = "out of memory"
    except Exception as exc:  # a broken variant must not hide the other rows; the log has the traceback
        log.exception("%s failed", variant.label)
        m.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if mode == "subprocess" and m.error is None:
        m.memory, problem = memory_in_fresh_process(s, variant.key)
        if problem:
            m.info["memory_error"] = problem
    return m


# ---------------------------------------------------------------- memory in a fresh process (CPU)

def _memory_child(conn, settings: Settings, key: str) -> None:
    """Forked from the forkserver: load the model, build the variant's inputs, then one run with a reset peak."""
    try:
        ctx = load_context(settings)
        with torch.no_grad():
            run = V[key].make(ctx, ctx.sizes)
            _, _, mem = measured_run(run, ctx.device, memory=True, fresh=True)
        conn.send(("ok", mem))
    except BaseException as exc:  # report anything (even SystemExit) to the parent instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_mp = None


def _context():
    global _mp
    if _mp is None:
        _mp = multiprocessing.get_context("forkserver")
        # The server imports torch/diffusers/the app once; each measurement forks from it (no OpenMP state yet).
        _mp.set_forkserver_preload(["benchmarks.runner"])
    return _mp


def memory_in_fresh_process(settings: Settings, key: str) -> tuple[Memory | None, str | None]:
    """(peak RSS growth of one run of variant `key` in a fresh process, or None and why)."""
    mp = _context()
    receive, send = mp.Pipe(duplex=False)
    proc = mp.Process(target=_memory_child, args=(send, settings, key), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(CHILD_TIMEOUT_S):
            return None, f"no answer in {CHILD_TIMEOUT_S} s"
        status, value = receive.recv()
    except EOFError:
        return None, f"the measuring process died (exit code {proc.exitcode})"
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
    return (value, None) if status == "ok" else (None, value)


# ---------------------------------------------------------------- all rows

def selected_rows(settings: Settings) -> list[Row]:
    return [r for r in ROWS if r.case in settings.cases]


def run_rows(ctx: Context) -> list[RowResult]:
    """Measure every variant of the selected rows (a variant shared by rows once), then each row's metrics."""
    mode = memory_mode(ctx.settings, ctx.device)
    rows = selected_rows(ctx.settings)
    measured: dict[str, Measurement] = {}
    for row in rows:
        for variant in (row.app, row.base):
            if variant.key not in measured:
                log.info("measuring %s: %s", row.key, variant.label)
                m = measured[variant.key] = measure_variant(ctx, variant, mode)
                log.info("  %s", _summary(m))
    results: list[RowResult] = []
    for row in rows:
        app, base = measured[row.app.key], measured[row.base.key]
        extra: dict[str, Any] = {}
        if row.extra is not None and app.error is None and base.error is None:
            try:
                extra = row.extra(ctx, app, base, measured)
            except Exception as exc:
                log.exception("extra metrics of %s failed", row.key)
                extra = {"error": f"{type(exc).__name__}: {exc}"}
        results.append(RowResult(row, row.title.format(**vars(ctx.sizes)), app, base, extra))
    return results


def _summary(m: Measurement) -> str:
    if m.error:
        return f"not measured: {m.error}"
    mem = f", peak +{m.memory.delta_mb:.0f} MiB" if m.memory else ""
    return f"{m.median_s * 1000:.1f} ms median of {len(m.times)}{mem}, {m.unet_evals} UNet evals"


def run(settings: Settings) -> tuple[Context, list[RowResult]]:
    ctx = load_context(settings)
    ctx.cache["load_start"] = load_average()
    return ctx, run_rows(ctx)
