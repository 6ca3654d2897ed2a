"""Between the UI and the backend: errors -> gr.Error, the GPU callables (ZeroGPU-aware), progress text, files.

Nothing here knows about widgets; handlers in the tab modules call these with plain values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.errors import CancelledError, TesseraError
from ui.uploads import open_upload  # noqa: F401 - its old home: API image parameters, uploads only

log = logging.getLogger(__name__)

Stream = Callable[[dict[str, Any]], Iterator[Any]]


@contextmanager
def user_errors(action: str):
    """Backend errors become gr.Error with the same one-line message; anything else is logged, never raised raw."""
    try:
        yield
    except gr.Error:
        raise
    except TesseraError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    except Exception as exc:
        log.exception("%s failed", action)
        raise gr.Error(f"{action} failed unexpectedly ({type(exc).__name__}); the server log has the details.",
                       print_exception=False) from exc


def zero_gpu(fn: Callable, duration: int = 120) -> Callable:
    """On a ZeroGPU Space (SPACES_ZERO_GPU set, `spaces` importable) run `fn` with a GPU attached; else `fn`."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is missing; running without spaces.GPU")
        return fn
    return spaces.GPU(duration=duration)(fn)


class GpuCalls:
    """The backend's long-running callables, each a generator of Progress ... Done (wrapped for ZeroGPU)."""

    def __init__(self, backend: Any):
        def generate(values: dict[str, Any]) -> Iterator[Any]:
            yield from backend.generate(values)

        def upscale(values: dict[str, Any]) -> Iterator[Any]:
            yield from backend.upscale(values)

        self.generate: Stream = zero_gpu(generate)
        self.upscale: Stream = zero_gpu(upscale)


def _iterate(stream: Stream, values: dict[str, Any]) -> Iterator[Any]:
    """`stream(values)` as a generator that closes the backend's generator when it is closed itself."""
    events = stream(values)
    try:
        yield from events
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # Stop button / client gone: the backend cancels within one step


def stream_events(stream: Stream, values: dict[str, Any], action: str) -> Iterator[Any]:
    """Progress ... Done from the backend, with errors as gr.Error; a backend-side cancel ends quietly."""
    with user_errors(action), closing(_iterate(stream, values)) as events:
        try:
            yield from events
        except CancelledError:
            log.info("%s stopped", action)


_END = object()


async def deliver(events: Iterator[Any]) -> AsyncIterator[Any]:
    """`events` (a blocking stream such as `stream_events`) as an async generator, each item computed in a thread.

    Gradio cancels a job (the Stop button, gradio_client's `job.cancel()`) by cancelling the task that awaits the
    next item, and drops that item. Until the backend says its last denoising step is done (a Progress of stage
    "finishing"), a cancel stops the run: the item being computed is awaited (at most one step) and the stream is
    closed, which stops the backend before its next step and saves nothing. After that the images are finished
    work: they are saved anyway, so the cancel is absorbed and the Done is still delivered; the caller gets the
    files that exist.
    """
    loop = asyncio.get_running_loop()
    finishing = False
    try:
        while True:
            pending = loop.run_in_executor(None, next, events, _END)
            try:
                item = await asyncio.shield(pending)
            except asyncio.CancelledError:
                item = await pending  # the backend's next event: within one step (or the Done, when finishing)
                if not (finishing or _finishing(item)):
                    raise
                log.info("cancel after the last denoising step: delivering the finished images")
            if item is _END:
                return
            finishing = finishing or _finishing(item)
            yield item
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            await loop.run_in_executor(None, close)  # stops the backend within a step (off the event loop)


def _finishing(event: Any) -> bool:
    """The backend's "last denoising step done, decoding and saving" Progress."""
    return getattr(event, "stage", None) == "finishing"


def is_done(event: Any) -> bool:
    """Done carries the images; Progress does not (duck-typed: the UI never imports the backend module)."""
    return hasattr(event, "images") and hasattr(event, "infotexts")


def progress_text(event: Any) -> str:
    """"Step 12/30 · refine · about 4 s left" for a Progress event."""
    if getattr(event, "stage", "draft") == "finishing":
        return "Decoding and saving… (the steps are done: a stop now keeps the images)"
    parts = [f"Step {event.step}/{event.total}"]
    if getattr(event, "stage", "draft") == "refine":
        parts.append("refine (stage 2)")
    eta = getattr(event, "eta_s", None)
    if eta is not None:
        parts.append(f"about {eta:.0f} s left" if eta >= 1 else "almost done")
    return " · ".join(parts)


def done_text(done: Any) -> str:
    """A short summary under the results: time, plan, warnings."""
    stats = done.stats or {}
    bits = []
    if "seconds" in stats:
        bits.append(f"Done in {stats['seconds']:.1f} s")
    if stats.get("plan"):
        bits.append(f"plan: {stats['plan']}")
    lines = [" · ".join(bits) or "Done"]
    lines += [f"⚠️ {w}" for w in done.warnings or []]
    return "\n\n".join(lines)


def result_files(done: Any) -> list[str]:
    """Paths of the saved PNGs (Gradio may serve them); images without a file are written to a temp PNG."""
    if done.paths:
        return [servable(p) for p in done.paths]
    return [temp_png(img, text) for img, text in zip(done.images, done.infotexts)]


def temp_png(image: Image.Image, parameters: str) -> str:
    """Write `image` with its `parameters` text chunk to a fresh temporary PNG."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    fd, path = tempfile.mkstemp(prefix="tessera-", suffix=".png")
    with os.fdopen(fd, "wb") as fh:
        image.save(fh, format="PNG", pnginfo=info)
    return path


def servable(path: str | os.PathLike) -> str:
    """A path Gradio agrees to serve: files outside the working and temp folders are copied to a temp folder."""
    p = Path(path).resolve()
    roots = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()]
    if os.environ.get("GRADIO_TEMP_DIR"):
        roots.append(Path(os.environ["GRADIO_TEMP_DIR"]).resolve())
    if any(p.is_relative_to(r) for r in roots):
        return str(p)
    folder = Path(tempfile.gettempdir()) / "tessera-outputs"
    folder.mkdir(exist_ok=True)
    return str(shutil.copy2(p, folder / p.name))  # a str, as FileData(path=...) and the annotation want

