"""Where a cancel stops counting: before the last denoising step ends it stops the run and nothing is saved;
after it the images are finished work, saved and delivered as done (engine, backend stream, Gradio adapter, API)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

from pipelines.errors import CancelledError
from pipelines.request.schema import HiresConfig
from pipelines.serving.service import Backend, Done, Progress, RunToken
from tests.conftest import running_app
from ui.runner import deliver

pytestmark = pytest.mark.xdist_group("gradio-app")

TINY = {"model": "tiny", "prompt": "a fox", "width": 64, "height": 64, "steps": 3, "seed": 3, "batch_size": 2}


def _pngs(folder) -> list:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def _cancel_at(token: RunToken, step: int, stage_total: int | None = None):
    def callback(info) -> None:
        if info.step == step and (stage_total is None or info.total == stage_total):
            token.set()
    return callback


@pytest.mark.parametrize(("cancel_step", "kept"), [(2, True), (1, False), (0, False)])
def test_engine_boundary_is_the_end_of_the_last_step(engine, req_factory, cancel_step, kept):
    """A cancel during the last step (index 2 of 3) keeps both images; one during an earlier step saves none."""
    token = RunToken()
    req = req_factory(steps=3, batch_size=2)
    if kept:
        result = engine.generate(req, callback=_cancel_at(token, cancel_step), cancel=token)
        assert token.finished.is_set() and len(result.paths) == 2
        assert sorted(result.paths) == _pngs(engine.outputs_dir)
    else:
        with pytest.raises(CancelledError):
            engine.generate(req, callback=_cancel_at(token, cancel_step), cancel=token)
        assert not token.finished.is_set() and _pngs(engine.outputs_dir) == []
    assert not engine.gpu_lock.locked()


def test_engine_two_stage_last_step_of_the_draft_is_not_the_end(engine, req_factory):
    """With hires, the draft's last step is not the run's last step: the refine has not run, nothing is saved."""
    token = RunToken()
    req = req_factory(steps=3, hires=HiresConfig(scale=1.5, upscaler="lanczos", steps=2, denoise=0.5))
    with pytest.raises(CancelledError):
        engine.generate(req, callback=_cancel_at(token, 2, stage_total=3), cancel=token)
    assert _pngs(engine.outputs_dir) == []


def _events_until(events, predicate) -> list:
    seen = []
    for event in events:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"stream ended without the event: {seen}")


def test_stream_says_finishing_before_done(engine):
    events = list(Backend(engine).generate(TINY))
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert stages == ["draft", "draft", "draft", "finishing"] and isinstance(events[-1], Done)
    assert len(events[-1].paths) == 2


def test_stream_closed_after_the_last_step_keeps_every_image(engine):
    """Closing the stream (Gradio's Stop) at the last step's Progress: the close returns once both are saved."""
    events = Backend(engine).generate(TINY)
    _events_until(events, lambda e: isinstance(e, Progress) and e.step == e.total)
    events.close()
    assert len(_pngs(engine.outputs_dir)) == 2
    assert not engine.gpu_lock.locked()


def test_stream_closed_before_the_last_step_saves_nothing(engine):
    # closed after step 1 of 30: the tiny model's steps take milliseconds, so closing right before the last step
    # raced the worker (which could finish that step before the close set the token)
    events = Backend(engine).generate({**TINY, "steps": 30})
    _events_until(events, lambda e: isinstance(e, Progress) and e.step == 1)
    events.close()
    assert _pngs(engine.outputs_dir) == [] and not engine.gpu_lock.locked()


# ---------------------------------------------------------------- the Gradio adapter (ui.runner.deliver)

def _fake_stream(items, closed: threading.Event, delay: float):
    """A blocking stream: each item after `delay` seconds (like a denoising step or a decode)."""
    try:
        for item in items:
            time.sleep(delay)
            yield item
    finally:
        closed.set()


async def _consume_and_cancel(items, cancel_after: int):
    """Consume deliver(stream) in a task and cancel that task (as Gradio does) after `cancel_after` items."""
    closed, got = threading.Event(), []

    async def consume():
        async for item in deliver(_fake_stream(items, closed, 0.3)):
            got.append(item)

    task = asyncio.ensure_future(consume())
    while len(got) < cancel_after:
        await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
        outcome = "finished"
    except asyncio.CancelledError:
        outcome = "cancelled"
    return outcome, got, closed.is_set()


def test_deliver_cancel_before_finishing_stops_the_stream():
    items = [SimpleNamespace(stage="draft", step=i) for i in (1, 2, 3)] + ["done"]
    outcome, got, closed = asyncio.run(_consume_and_cancel(items, cancel_after=1))
    assert outcome == "cancelled" and got == items[:1] and closed


def test_deliver_cancel_after_finishing_still_delivers_the_done():
    items = [SimpleNamespace(stage="draft", step=1), SimpleNamespace(stage="finishing", step=1), "done"]
    outcome, got, closed = asyncio.run(_consume_and_cancel(items, cancel_after=2))
    assert outcome == "finished" and got == items and closed


def test_deliver_cancel_at_the_last_step_progress_delivers_when_finishing_follows():
    """The cancel lands while the next item is computed; that item says the steps are done: keep going."""
    items = [SimpleNamespace(stage="draft", step=1), SimpleNamespace(stage="finishing", step=1), "done"]
    outcome, got, _ = asyncio.run(_consume_and_cancel(items, cancel_after=1))
    assert outcome == "finished" and got == items


# ---------------------------------------------------------------- through a real server and gradio_client

class _SlowFinish:
    """Slow steps (so a cancel lands between two) and a slow decode-and-save (so one lands after the last step)."""

    def __init__(self, engine, step_s: float, finish_s: float):
        self.engine, self.step_s, self.finish_s = engine, step_s, finish_s
        self.real_generate, self.real_finish = engine.generate, engine._finish

    def generate(self, req, *, callback=None, **kw):
        def slow(info):
            if callback is not None:
                callback(info)
            time.sleep(self.step_s)
        return self.real_generate(req, callback=slow, **kw)

    def finish(self, *a, **kw):
        time.sleep(self.finish_s)
        return self.real_finish(*a, **kw)


def _cancel(job) -> None:
    """job.cancel(); its POST waits for the server to stop the run, which on a loaded 2-core machine can pass
    gradio_client's 5 s read timeout: the cancel has reached the server all the same."""
    with contextlib.suppress(httpx.TimeoutException):
        job.cancel()


def _wait_for(job, text: str, deadline: float) -> None:
    while not any(text in str(o) for o in job.outputs()):
        assert time.monotonic() < deadline, job.outputs()
        time.sleep(0.02)


def test_api_cancel_after_the_last_step_returns_the_saved_files(engine, monkeypatch, tmp_path):
    slow = _SlowFinish(engine, step_s=0.2, finish_s=1.0)  # gradio_client waits 5 s for a cancel
    monkeypatch.setattr(engine, "generate", slow.generate)
    monkeypatch.setattr(engine, "_finish", slow.finish)
    api = {k: v for k, v in TINY.items()}
    with running_app(engine) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        deadline = time.monotonic() + 120
        job = client.submit(**{**api, "steps": 3}, api_name="/generate")
        _wait_for(job, "Step 1/3", deadline)
        _cancel(job)  # before the last step: the run stops, nothing is saved, no files come back
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises CancelledError or an empty-answer error
            job.result(timeout=30)
        assert _pngs(engine.outputs_dir) == []
        job = client.submit(**api, api_name="/generate")
        _wait_for(job, "Decoding and saving", deadline)
        _cancel(job)  # after the last step: the server still sends both saved images
        while not job.outputs()[-1][0]:
            assert time.monotonic() < deadline, job.outputs()
            time.sleep(0.02)
        files, texts = job.outputs()[-1]  # gradio_client calls any cancelled job CANCELLED; its outputs have them
        assert len(files) == len(texts) == 2 and len(_pngs(engine.outputs_dir)) == 2


# ---------------------------------------------------------------- the browser UI's Stop (ui.generate_events)

def _stop_ui_run_at(engine, values: dict, when) -> tuple[list[dict], object]:
    """Run the Generate tab's handler over the real backend; `when(update)` says at which update to press Stop
    (`RunControl.stop()` from another thread, as the Stop button's handler does). (updates, the run's control)"""
    from ui.generate_events import generate_updates
    from ui.runner import GpuCalls, Runs

    backend, runs = Backend(engine), Runs()
    gpu = GpuCalls(backend)
    updates = []
    with runs.running("page") as control:
        for update in generate_updates(backend, gpu.generate, values, [], None, control):
            updates.append(update)
            if when(update):
                threading.Thread(target=runs.stop, args=("page",)).start()
    return updates, control


def test_ui_stop_after_the_last_step_shows_the_saved_images(engine, monkeypatch):
    """A Stop during the decode: the run is not cancelled; it ends by itself and the gallery gets both images."""
    slow = _SlowFinish(engine, step_s=0.0, finish_s=0.5)
    monkeypatch.setattr(engine, "_finish", slow.finish)
    updates, control = _stop_ui_run_at(engine, TINY, lambda u: "Decoding and saving" in str(u.get("progress")))
    last = updates[-1]
    assert control.requested.is_set() and control.cooperative
    assert last["progress"] == "Stopped after the last step: the images are kept."
    assert [Path(p) for p in last["results"]["paths"]] == _pngs(engine.outputs_dir) and len(last["gallery"]) == 2
    assert last["infotext"].startswith("a fox") and "Steps: 3" in last["infotext"]


def test_ui_stop_before_the_last_step_says_stopped_and_saves_nothing(engine, req_factory):
    steps = []
    real = engine.generate

    def counting(req, *, callback=None, cancel=None, **kw):
        def cb(info):
            steps.append(cancel.is_set())
            time.sleep(0.02)
            if callback is not None:
                callback(info)
        return real(req, callback=cb, cancel=cancel, **kw)

    engine.generate = counting
    updates, control = _stop_ui_run_at(engine, {**TINY, "steps": 30},
                                       lambda u: str(u.get("progress")).startswith("Step 2/30"))
    assert updates[-1]["progress"] == "Stopped." and "gallery" not in updates[-1]
    assert _pngs(engine.outputs_dir) == [] and not engine.gpu_lock.locked()
    assert len(steps) < 30 and sum(steps) <= 1  # the token is set by the click: at most the step under way ends


def _uncooperative(items, closed: threading.Event):
    """A stream without stop() (ZeroGPU's wrapper): the handler closes it itself."""
    try:
        yield from items
    finally:
        closed.set()


@pytest.mark.parametrize("finishing", [False, True])
def test_ui_stop_of_a_stream_without_stop_closes_it_unless_its_steps_are_done(finishing):
    from ui.generate_events import generate_updates
    from ui.runner import RunControl

    class Check:
        def check(self, values):
            pass

    done = Done([], [], ["a fox"], [1], {}, [])
    items = [Progress(1, 3, 1.0, None), *([Progress(3, 3, 0.0, None, "finishing")] if finishing else
                                        [Progress(2, 3, 1.0, None)]), done]
    closed, control = threading.Event(), RunControl()
    updates = []
    for update in generate_updates(Check(), lambda values: _uncooperative(items, closed), {}, [], None, control):
        updates.append(update)
        if str(update["progress"]).startswith(("Step 1/3", "Decoding")):
            control.stop()
    assert closed.is_set() and control.requested.is_set() and not control.cooperative
    if finishing:  # the images are being saved anyway: keep reading to the Done
        assert updates[-1]["progress"] == "Stopped after the last step: the images are kept."
        assert updates[-1]["infotext"] == "a fox"
    else:  # closed at the next event: Step 2/3 is never shown
        assert [u["progress"] for u in updates][1:] == ["Step 1/3 · about 1 s left", "Stopped."]


def test_runs_find_a_pages_run_and_a_stop_before_the_stream_exists_reaches_it():
    from ui.runner import Runs

    class Stoppable:
        stopped = 0

        def stop(self):
            self.stopped += 1

    runs, stream = Runs(), Stoppable()
    assert runs.stop("page") is False  # nothing running: the UI cancels the queued event instead
    with runs.running("page") as control:
        assert runs.stop("other page") is False and runs.stop("page") is True
        assert control.requested.is_set() and stream.stopped == 0
        control.attach(stream)  # the stream is created after the click: the stop reaches it now
        assert stream.stopped == 1 and control.cooperative and not control.should_close(finishing=False)
    assert runs.stop("page") is False  # unregistered when the run ends


# ---------------------------------------------------------------- a cancel during a step, the last one included

def test_engine_cancel_during_the_last_steps_compute_saves_nothing(engine, req_factory, monkeypatch):
    """The token set while the last step's UNet runs: that step's result is dropped, nothing is decoded or saved
    (the loop checks the token once more when a step is computed, before reporting it)."""
    req = req_factory(steps=3, batch_size=2)
    model = engine.manager.get("tiny")
    calls: list[int] = []
    real_forward = model.unet.forward

    def counting(*a, **kw):
        calls.append(1)
        return real_forward(*a, **kw)

    monkeypatch.setattr(model.unet, "forward", counting)
    engine.generate(req, cancel=RunToken())
    per_step = len(calls) // 3
    assert per_step >= 1 and len(calls) == 3 * per_step
    reported, token = [], RunToken()
    first_of_last_step = 2 * per_step + 1  # the call number of the last step's first UNet call

    def cancelling(*a, **kw):
        calls.append(1)
        if len(calls) == first_of_last_step:
            token.set()  # "the client cancelled": while the last step is computed
        return real_forward(*a, **kw)

    calls.clear()
    for p in _pngs(engine.outputs_dir):
        p.unlink()
    monkeypatch.setattr(model.unet, "forward", cancelling)
    with pytest.raises(CancelledError):
        engine.generate(req, callback=lambda info: reported.append(info.step), cancel=token)
    assert reported == [0, 1] and not token.finished.is_set()
    assert _pngs(engine.outputs_dir) == [] and not engine.gpu_lock.locked()


# ---------------------------------------------------------------- the app as launched, cancelled by its client

class _StepSpy:
    """Engine.generate (every worker's) counting the steps each run computes; the callback of step `hold` (index)
    waits until that run's token is set, so a cancel sent at that step's progress lands before the next step
    starts, deterministically (the wait's bound only keeps a broken build from hanging the suite)."""

    def __init__(self, monkeypatch, hold: int):
        from pipelines.engine import Engine

        self.steps: list[int] = []
        self.held, self.ended, self.hold = threading.Event(), threading.Event(), hold
        self.outcome: BaseException | None = None
        real = Engine.generate
        spy = self

        def generate(engine, req, *, callback=None, cancel=None, **kw):
            def cb(info):
                spy.steps.append(info.step)
                if callback is not None:
                    callback(info)
                if info.step == spy.hold and cancel is not None:
                    spy.held.set()
                    cancel.wait(120)
            try:
                return real(engine, req, callback=cb, cancel=cancel, **kw)
            except BaseException as exc:
                spy.outcome = exc
                raise
            finally:
                spy.ended.set()

        monkeypatch.setattr(Engine, "generate", generate)


@contextlib.contextmanager
def _launched(tmp_path, *options: str):
    """`python app.py --model tiny OPTIONS` as app.py builds it (`build_demo`), launched on a free loopback port."""
    import socket

    from app import build_demo, ui_parser
    from ui.app import launch_kwargs

    args = ui_parser().parse_args(["--model", "tiny", "--models-dir", str(tmp_path / "models"),
                                   "--out", str(tmp_path / "outputs"), *options])
    demo = build_demo(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


BATCH = {"prompt": "a fox", "width": 64, "height": 64, "steps": 4, "seed": 3, "batch_size": 8}


@pytest.mark.parametrize("options", [(), ("--devices", "cpu,cpu")], ids=["default", "devices"])
@pytest.mark.parametrize("at", [1, 3])
def test_api_cancel_before_the_last_step_stops_the_worker_and_saves_nothing(tiny_cache, tmp_path, monkeypatch,
                                                                            options, at):
    """The issue's run: /generate, batch 8, 4 steps, `job.cancel()` at "Step 3/4" (and at 1/4): the worker
    computes no further step (the step shown is the last one run) and no image is saved."""
    spy = _StepSpy(monkeypatch, hold=at - 1)
    with _launched(tmp_path, *options) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        job = client.submit(**BATCH, api_name="/generate")
        deadline = time.monotonic() + 300
        _wait_for(job, f"Step {at}/4", deadline)
        assert spy.held.wait(120)
        _cancel(job)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises CancelledError or an empty-answer error
            job.result(timeout=120)
        assert spy.ended.wait(120)  # the worker's run has returned: nothing of it can be saved later
    assert isinstance(spy.outcome, CancelledError)
    assert spy.steps == list(range(at))  # no step after the one shown when the client cancelled
    assert _pngs(tmp_path / "outputs") == []
