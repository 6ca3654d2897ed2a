"""Measuring tools: synchronised wall time, peak memory (CUDA allocator or process RSS), UNet evaluation counts."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MiB = 1024 * 1024


@dataclass
class Memory:
    """Peak memory of one run: `peak_mb` absolute, `delta_mb` above what was held just before the run."""

    peak_mb: float
    delta_mb: float
    method: str  # "cuda max_memory_allocated" | "RSS high-water mark (fresh process)" | ...


@dataclass
class Measurement:
    """One variant measured: timed runs (seconds), memory, UNet evaluations of one run, or why it failed."""

    label: str
    times: list[float] = field(default_factory=list)
    memory: Memory | None = None
    unet_evals: int | None = None
    unet_calls: int | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    output: Any = None  # the last run's result, for quality metrics (not written to JSON)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def to_json(self) -> dict[str, Any]:
        mem = None if self.memory is None else {"peak_mb": round(self.memory.peak_mb, 1),
                                                 "delta_mb": round(self.memory.delta_mb, 1),
                                                 "method": self.memory.method}
        return {"label": self.label, "median_s": self.median_s, "times_s": [round(t, 5) for t in self.times],
                "runs": len(self.times), "memory": mem, "unet_evals": self.unet_evals, "unet_calls": self.unet_calls,
                "error": self.error, **({"info": self.info} if self.info else {})}


class NotMeasured(Exception):
    """A variant that cannot run here (no panorama pipeline for SDXL, no TAESD, out of memory...)."""


class UNetCounter:
    """Counts UNet calls and evaluations (samples through the UNet) with forward hooks, not a wrapper.

    One evaluation = one sample row (cond and uncond count separately, each tile counts), so an untiled
    20-step CFG run of one image is 40 evaluations. With `--compile` the app calls the compiled module and the
    diffusers baselines the eager one inside it; both are hooked, and a call is counted once.
    """

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.samples = 0
        self._outer_depth = 0
        inner = getattr(unet, "_orig_mod", None)
        self._handles = [unet.register_forward_pre_hook(self._outer_pre, with_kwargs=True),
                         unet.register_forward_hook(self._outer_post, always_call=True)]
        if inner is not None:
            self._handles.append(inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))

    def _count(self, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.calls += 1
        self.samples += int(sample.shape[0]) if sample is not None else 0

    def _outer_pre(self, _module, args, kwargs) -> None:
        self._outer_depth += 1
        self._count(args, kwargs)

    def _outer_post(self, *_args) -> None:
        self._outer_depth -= 1

    def _inner_pre(self, _module, args, kwargs) -> None:
        if self._outer_depth == 0:  # a direct call of the eager module (a baseline), not one via the compiled
            self._count(args, kwargs)

    def reset(self) -> None:
        self.calls = self.samples = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall time covers it (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float | None:
    """The machine's 1-minute load average: other jobs on the same cores inflate CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------- process memory (CPU)

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak as the best available figure."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's RSS high-water mark (VmHWM; resettable), else ru_maxrss (monotonic)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MiB if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- one run, measured

def measured_run(fn: Callable[[], Any], device: torch.device, *, memory: bool, fresh: bool = False):
    """(seconds, output, Memory or None) of one synchronised run of `fn`."""
    mem_before = None
    reset_ok = True
    if memory:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            mem_before = torch.cuda.memory_allocated(device) / MiB
        else:
            reset_ok = reset_peak_rss()
            mem_before = current_rss_mb()
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    mem = None
    if memory:
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / MiB
            mem = Memory(peak, peak - mem_before, "cuda max_memory_allocated")
        else:
            peak = peak_rss_mb()
            where = "fresh process" if fresh else "in process, allocator reuse may hide some"
            how = "VmHWM reset" if reset_ok else "ru_maxrss, not reset"
            mem = Memory(peak, max(0.0, peak - mem_before), f"peak RSS growth ({how}, {where})")
    return seconds, out, mem
