"""Atomic, never-overwriting PNG output: outputs/<date>/<NNNNN>-<seed>.png with a `parameters` chunk."""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import uuid
from pathlib import Path

from PIL import Image

from pipelines.image_info import write_png

_lock = threading.Lock()
_NAME = re.compile(r"^(\d{5,})-")


def _next_index(folder: Path) -> int:
    best = 0
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def save_png(image: Image.Image, parameters: str, outputs_dir: Path, seed: int) -> Path:
    """Write `image` with its infotext; the file appears complete or not at all and never replaces another."""
    folder = Path(outputs_dir) / dt.date.today().isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}.png"
    try:  # a failed write (disk full, bad image) removes its temporary file too
        with open(tmp, "wb") as f:
            write_png(image, parameters, f)
            f.flush()
            os.fsync(f.fileno())
        with _lock:
            index = _next_index(folder)
            while True:
                final = folder / f"{index:05d}-{seed}.png"
                try:
                    os.link(tmp, final)  # fails if `final` exists: never overwrite, even across processes
                    return final
                except FileExistsError:
                    index += 1
    finally:
        tmp.unlink(missing_ok=True)
