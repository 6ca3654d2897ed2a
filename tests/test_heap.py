"""Equal tile windows and the glibc heap thresholds that keep large CPU runs from fragmenting the heap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pipelines.vae.stages import crop_span

ROOT = Path(__file__).resolve().parent.parent


@given(st.integers(1, 300), st.integers(1, 80), st.integers(0, 20), st.data())
def test_equal_windows_contain_the_clamped_span(size: int, longest: int, halo: int, data) -> None:
    longest = min(longest, size)
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, min(start + longest, size)))
    window = longest + 2 * halo
    lo, hi = crop_span(start, stop, halo, size, window)
    plain_lo, plain_hi = crop_span(start, stop, halo, size)
    assert hi - lo == min(window, size)  # every tile the same shape
    assert 0 <= lo <= plain_lo and plain_hi <= hi <= size  # at least the context the plain span has


def _tuned(env: dict[str, str]) -> str:
    code = "from pipelines.heap import tune_heap; print(tune_heap(), tune_heap())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_heap_thresholds_are_set_once_and_never_over_the_users() -> None:
    import platform

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert _tuned({}) == ("True True" if glibc else "False False")
    assert _tuned({"MALLOC_TRIM_THRESHOLD_": "0"}) == "False False"  # the user's own setting wins
