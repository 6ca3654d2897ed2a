"""Peak memory of whole `python app.py generate` runs, tiled vs untiled, each in its own process.

    python -m benchmarks.peak_rss --model tiny --size 4096 --steps 2

Each run is a child process; its peak RSS comes from `os.wait4` (the kernel's ru_maxrss of that child alone), its
time from the wall clock. On CPU the RSS is the memory that matters; on a GPU use the main benchmark's CUDA
figures instead (the RSS of a CUDA run says little about device memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "tiled-stream": ["--tiling", "on", "--vae-tiling", "on", "--vae-tile-mode", "stream"],
    "tiled-exact": ["--tiling", "on", "--vae-tiling", "on", "--vae-tile-mode", "exact"],
    # auto VAE mode under a 1 GB budget: the low-resolution stages layer by layer as far as 1 GB of canvases
    # allows, the rest tile by tile
    "tiled-budget": ["--tiling", "on", "--vae-tiling", "on", "--memory-budget-gb", "1"],
    "untiled": ["--tiling", "off", "--vae-tiling", "off"],
}


def measure(cmd: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB, seconds) of `cmd` run as a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    proc.stderr.close()
    rss_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return proc.returncode, rss_kb / 1024, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak_rss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=4096, help="width = height in pixels (default 4096)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cfg", default="7")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--extra", default="", help="more `app.py generate` options for every run, as one string")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.variants.split(","):
            cmd = [sys.executable, "app.py", "generate", "--model", args.model, "--device", args.device,
                   "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps),
                   "--cfg", args.cfg, "--seed", "1", "--prompt", "a lighthouse", "--out", out,
                   *VARIANTS[name.strip()], *args.extra.split()]
            code, rss, seconds = measure(cmd)
            rows.append((name, code, rss, seconds, " ".join(cmd[1:]).replace(out, "OUT")))
            print(f"{name}: exit {code}, peak RSS {rss:,.0f} MiB, {seconds:.1f} s", file=sys.stderr, flush=True)
    print("| run | peak RSS MiB | time | exit | command |\n|---|---|---|---|---|")
    for name, code, rss, seconds, cmd in rows:
        print(f"| {name} | {rss:,.0f} | {seconds:.1f} s | {code} | `python {cmd}` |")
    return 0 if all(r[1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
