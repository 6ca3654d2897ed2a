"""Between the UI and the backend: errors -> gr.Error, the GPU callables (ZeroGPU-aware), progress text, files.

Nothing here knows about widgets; handlers in the tab modules call these with plain values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from pipelines.errors import CancelledError, TesseraError
from pipelines.image_info import write_png

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


def _spaces() -> Any:
    """The `spaces` module on a ZeroGPU Space (SPACES_ZERO_GPU set, `spaces` importable), else None."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return None
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is missing; running without spaces.GPU")
        return None
    return spaces


def zero_gpu(fn: Callable, duration: int = 120) -> Callable:
    """On a ZeroGPU Space (SPACES_ZERO_GPU set, `spaces` importable) run `fn` with a GPU attached; else `fn`."""
    spaces = _spaces()
    return fn if spaces is None else spaces.GPU(duration=duration)(fn)


class GpuCalls:
    """The backend's long-running callables, each a stream of Progress ... Done (wrapped for ZeroGPU).

    Off ZeroGPU the backend's own stream is handed over, so its `stop()` (a stop that keeps the stream, see
    `RunControl`) stays reachable; spaces.GPU needs a generator function and runs it elsewhere, so there the
    UI stops a run by closing it."""

    def __init__(self, backend: Any):
        def generate(values: dict[str, Any]) -> Iterator[Any]:
            yield from backend.generate(values)

        def upscale(values: dict[str, Any]) -> Iterator[Any]:
            yield from backend.upscale(values)

        on_zero_gpu = _spaces() is not None
        self.generate: Stream = zero_gpu(generate) if on_zero_gpu else backend.generate
        self.upscale: Stream = zero_gpu(upscale) if on_zero_gpu else backend.upscale


class RunControl:
    """One UI run's Stop: `stop()` asks the run to stop, from the Stop button's thread.

    A stream with `stop()` (the backend's `RunStream`) is stopped at once and keeps streaming, so the run ends by
    itself: before its last denoising step ended the engine stops within a step and saves nothing, after it the
    images are saved and shown (A1111's Interrupt). A stream without one (ZeroGPU) is closed by
    the handler at its next event unless its steps are done (`should_close`)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()

    def attach(self, stream: Any) -> None:
        """The run's stream, once it exists; a stop asked for earlier reaches it now."""
        with self._lock:
            self._stream = stream
        if self.requested.is_set():
            self._stop_stream()

    def stop(self) -> None:
        self.requested.set()
        self._stop_stream()

    def _stop_stream(self) -> None:
        with self._lock:
            stop = getattr(self._stream, "stop", None)
        if stop is not None:
            stop()

    @property
    def cooperative(self) -> bool:
        """Whether the stream stops itself (else the handler closes it)."""
        return callable(getattr(self._stream, "stop", None))

    def should_close(self, finishing: bool) -> bool:
        """At an event: close the stream now (a stop was asked, the stream cannot stop itself, steps not done)."""
        return self.requested.is_set() and not self.cooperative and not finishing


class Runs:
    """The UI runs in flight, one per browser session (`gr.Request.session_hash`), for the Stop button."""

    def __init__(self) -> None:
        self._runs: dict[str, RunControl] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str | None) -> Iterator[RunControl]:
        """Register a run of `session` while the block runs."""
        control = RunControl()
        key = session or ""
        with self._lock:
            self._runs[key] = control
        try:
            yield control
        finally:
            with self._lock:
                if self._runs.get(key) is control:
                    del self._runs[key]

    def stop(self, session: str | None) -> bool:
        """Stop `session`'s run; False when it has none running (it may still wait in the queue)."""
        with self._lock:
            control = self._runs.get(session or "")
        if control is None:
            return False
        control.stop()
        return True


def _iterate(stream: Stream, values: dict[str, Any], control: RunControl | None = None) -> Generator[Any, None, None]:
    """`stream(values)` as a generator that closes the backend's stream when it is closed itself."""
    events = stream(values)
    if control is not None:
        control.attach(events)
    try:
        yield from events
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # client gone, or a stream that cannot stop itself: the backend cancels within one step


def stream_events(stream: Stream, values: dict[str, Any], action: str,
                  control: RunControl | None = None) -> Generator[Any, None, None]:
    """Progress ... Done from the backend, with errors as gr.Error; a backend-side cancel ends quietly."""
    with user_errors(action), closing(_iterate(stream, values, control)) as events:
        try:
            yield from events
        except CancelledError:
            log.info("%s stopped", action)


_END = object()


async def deliver(events: Iterator[Any], control: RunControl | None = None) -> AsyncIterator[Any]:
    """`events` (a blocking stream such as `stream_events`) as an async generator, each item computed in a thread.

    Gradio cancels a job (gradio_client's `job.cancel()`) by cancelling the task that awaits the next item, and
    drops that item. The run is asked to stop at once (`control.stop()`: the run's token is set while the step
    under way is computed, so a cancel during the last step still counts), then the stream is read on until it
    says what came of the stop: it ends (the loop stopped within a step, nothing saved) and the cancel goes on,
    or, when the last denoising step had ended first, a Progress of stage "finishing" comes: the images are
    finished work, saved anyway, so the cancel is absorbed and the Done is still delivered.
    """
    loop = asyncio.get_running_loop()
    finishing = False
    try:
        while True:
            pending = loop.run_in_executor(None, next, events, _END)
            try:
                item = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if finishing:  # the steps are done: the Done comes whatever the caller does
                    item = await pending
                else:
                    if control is not None:
                        control.stop()  # the token is set now, while the step under way is computed
                    item = await _until_finishing(loop, events, pending, control)
                    if item is None:
                        raise
                    log.info("cancel after the last denoising step: delivering the finished images")
            if item is _END:
                return
            finishing = finishing or is_finishing(item)
            yield item
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            await loop.run_in_executor(None, close)  # stops the backend within a step (off the event loop)


async def _until_finishing(loop: asyncio.AbstractEventLoop, events: Iterator[Any], pending: Any,
                           control: RunControl | None) -> Any:
    """After a cancel: read the stream (the item under way, then on) until it ends (None: stopped before the
    last step ended) or says "finishing" (that Progress). A stopped run yields at most the step under way; a
    stream that cannot stop itself (no `control`, ZeroGPU) is read one item only, then closed."""
    try:
        item = await pending
        while not is_finishing(item):
            if item is _END or control is None or not control.cooperative:
                return None
            item = await loop.run_in_executor(None, next, events, _END)
        return item
    except Exception as exc:  # the stop's own end ("... was stopped before it finished"): the cancel wins
        log.debug("stream ended after a cancel: %s", exc)
        return None


def is_finishing(event: Any) -> bool:
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
    fd, path = tempfile.mkstemp(prefix="tessera-", suffix=".png")
    with os.fdopen(fd, "wb") as fh:
        write_png(image, parameters, fh)
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

