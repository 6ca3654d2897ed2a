"""The results as a markdown table (stdout, README, results/*.md) and as JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.context import Context
from benchmarks.measure import Measurement, load_average
from benchmarks.runner import RowResult, memory_mode


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def meta(ctx: Context) -> dict[str, Any]:
    import diffusers

    s = ctx.settings
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": ctx.device.type, "device_name": device_name(ctx.device), "model": s.model,
        "family": ctx.model.family, "dtype": str(ctx.model.dtype).removeprefix("torch."), "attention": s.attention,
        "compile": s.compile and s.compile_mode, "fuse_qkv": s.fuse_qkv, "channels_last": s.channels_last,
        "quick": s.quick, "size_scale": s.size_scale,
        "memory": memory_mode(s, ctx.device), "warmup": s.warmup, "repeats": s.repeats, "budget_s": s.budget_s,
        "sizes": vars(ctx.sizes), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_average_1min": {"start": ctx.cache.get("load_start"), "end": load_average()},
    }



def _why_not_judged(ctx: Context, families: tuple[str, ...]) -> str | None:
    s = ctx.settings
    if ctx.device.type != "cuda":
        return "needs GPU"
    if s.quick or s.size_scale != 1.0:
        return "quick sizes"
    if ctx.model.family not in families:
        return f"target is for {'/'.join(families)}"
    return None


def judge(ctx: Context, r: RowResult) -> dict[str, Any] | None:
    """Ratio text and pass/fail against the row's target; pass/fail only where the target applies."""
    t = r.row.target
    if t is None:
        return None
    verdict = t.judge(r.app, r.base, r.extra) if r.app.error is None and r.base.error is None else None
    if verdict is None:
        return {"text": t.text, "vs_target": None, "met": None, "judged": False, "why": "not measured"}
    ratios, ok = verdict
    why = _why_not_judged(ctx, t.families) if t.gpu else None
    if t.models and ctx.settings.model not in t.models:
        why = f"target is for {'/'.join(t.models)}"
    return {"text": t.text, "vs_target": ratios, "met": ok if why is None else None, "judged": why is None,
            "why": why}


def _time(m: Measurement) -> str:
    if m.error:
        return "n/a"
    t = m.median_s
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def _mem(m: Measurement) -> str:
    if m.memory is None:
        return "n/a" if m.error else "–"
    if m.memory.method.startswith("cuda"):
        return f"{m.memory.peak_mb:,.0f} (+{m.memory.delta_mb:,.0f})"
    return f"+{m.memory.delta_mb:,.0f}"


def _evals(m: Measurement) -> str:
    return "n/a" if m.error else str(m.unet_evals or 0)


def _evals_pair(app: Measurement, base: Measurement) -> str:
    if not app.unet_evals and not base.unet_evals and not (app.error or base.error):
        return "–"  # no UNet in this row (VAE, text encoder)
    return f"{_evals(app)} / {_evals(base)}"


def _met(j: dict[str, Any] | None) -> str:
    if j is None:
        return ""
    if j["judged"]:
        return "pass" if j["met"] else "FAIL"
    return f"– ({j['why']})"


def table(ctx: Context, results: list[RowResult]) -> str:
    """A markdown table: one row per comparison, app and baseline side by side, ratios to the targets."""
    cuda = ctx.device.type == "cuda"
    mem_head = "peak MiB (+ over start)" if cuda else "peak RSS growth MiB"
    head = ["row", "app", "baseline", "app time", "base time", "speedup", f"app {mem_head}", f"base {mem_head}",
            "UNet evals app / base", "target", "vs target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        j = judge(ctx, r)
        sp = f"{r.speedup:.2f}×" if r.speedup else "n/a"
        cells = [f"{r.row.key}: {r.title}", r.app.label, r.base.label, _time(r.app), _time(r.base), sp, _mem(r.app),
                 _mem(r.base), _evals_pair(r.app, r.base), j["text"] if j else "",
                 (j["vs_target"] or "") if j else "", _met(j)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(results: list[RowResult]) -> str:
    """Errors, quality metrics and tile plans under the table."""
    out = []
    for r in results:
        for side, m in (("app", r.app), ("baseline", r.base)):
            if m.error:
                out.append(f"- {r.row.key} {side} not measured: {m.error}")
            if m.info.get("memory_error"):
                out.append(f"- {r.row.key} {side} memory not measured: {m.info['memory_error']}")
        plan = r.app.info.get("plan")
        if plan and r.row.case in ("tiled", "ultra"):
            out.append(f"- {r.row.key} app plan: {plan}")
        if r.extra:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in r.extra.items())
            out.append(f"- {r.row.key}: {shown}")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def header(ctx: Context) -> str:
    m = meta(ctx)
    return (f"Tessera benchmarks: model {m['model']} ({m['family']}, {m['dtype']}), {m['device_name']}, "
            f"{'quick' if m['quick'] else 'full'} sizes (scale {m['size_scale']:g}), memory: {m['memory']}, "
            f"compile={m['compile']}, channels_last={m['channels_last']}, fuse_qkv={m['fuse_qkv']}, "
            f"torch {m['torch']}, "
            f"diffusers {m['diffusers']}, 1-min load average {_fmt_load(m['load_average_1min'])}")


def _fmt_load(load: dict[str, Any]) -> str:
    return f"{load['start']} at start, {load['end']} at end"


def to_json(ctx: Context, results: list[RowResult]) -> dict[str, Any]:
    rows = []
    for r in results:
        rows.append({"key": r.row.key, "case": r.row.case, "title": r.title, "app": r.app.to_json(),
                     "baseline": r.base.to_json(), "speedup": r.speedup, "extra": r.extra, "target": judge(ctx, r)})
    return {"meta": meta(ctx), "rows": rows}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
