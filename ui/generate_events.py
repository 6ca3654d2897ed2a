"""The Generate tab's handlers (plain values in, {output name: value} out) and their wiring to the widgets.

Handlers are module functions over names so tests call them with a fake backend; `wire_generate` adapts them
to Gradio's {component: value} form through the tab's `Form`s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import gradio as gr

from pipelines.serving.units import UI_CONTROL_UNITS, control_name
from ui.components import knob_values, request_value
from ui.generate_tab import GenerateTab
from ui.runner import (
    GpuCalls,
    RunControl,
    Runs,
    Stream,
    done_text,
    is_done,
    is_finishing,
    progress_text,
    result_files,
    stream_events,
    user_errors,
)

log = logging.getLogger(__name__)

HISTORY_MAX = 60
GPU: dict[str, Any] = {"concurrency_id": "gpu", "concurrency_limit": 1}
IMAGE_FIELDS = ("init_image", "mask", "inpaint_editor", *(control_name(i, "image") for i in range(UI_CONTROL_UNITS)))
RESULT_OUTPUTS = ("progress", "preview", "gallery", "infotext", "notes", "results", "selected", "history",
                  "history_gallery")
# Widgets whose changes change what describe() says (the preset's description, the planner's estimate).
DESCRIBE_FIELDS = ("preset", "model", "width", "height", "batch_size", "steps", "sampler", "cfg", "hires_scale",
                   "hires_upscaler", "hires_denoise", "hires_steps", "tile_mode", "tile_size", "tile_overlap",
                   "tile_batch", "vae_tiling", "vae_tile_size", "vae_tile_mode", "memory_budget_gb",
                   "vae_decode", "regions", "region_base")


# ---------------------------------------------------------------- handlers (names in, names out)

def request_values(values: dict[str, Any]) -> dict[str, Any]:
    """Widget values -> the backend's flat values (None = preset/default); strength only with an init image."""
    out = {name: request_value(name, value) for name, value in values.items()}
    if out.get("init_image") is None and not (out.get("inpaint_editor") or {}).get("background"):
        out["strength"] = None
    return out


STOPPED = "Stopped."
STOPPED_KEPT = "Stopped after the last step: the images are kept."


def generate_updates(backend: Any, stream: Stream, values: dict[str, Any], history: list,
                     progress: Callable | None = None, control: RunControl | None = None) -> Iterator[dict[str, Any]]:
    """Validate, then stream: progress text and previews while running, the gallery and infotext at the end.

    `control`: the run's Stop (`ui.runner.RunControl`). A stop before the last denoising step ended ends in
    "Stopped." with nothing saved; after it the saved images are shown as usual, with STOPPED_KEPT."""
    request = request_values(values)
    with user_errors("Generation"):
        backend.check(request)
    yield {"progress": "Starting…", "preview": gr.update(value=None, visible=True), "notes": ""}
    finishing = False
    with closing(stream_events(stream, request, "Generation", control)) as events:
        for event in events:
            if is_done(event):
                stopped = control is not None and control.requested.is_set()
                yield {**done_updates(event, history), **({"progress": STOPPED_KEPT} if stopped else {})}
                return
            finishing = finishing or is_finishing(event)
            if control is not None and control.should_close(finishing):
                break  # a stream that cannot stop itself: closed before its last step, so nothing is saved
            if progress is not None:
                progress((event.step, event.total), desc=progress_text(event))
            update: dict[str, Any] = {"progress": progress_text(event)}
            if getattr(event, "preview", None) is not None:
                update["preview"] = event.preview
            yield update
    yield {"progress": STOPPED, "preview": gr.update(visible=False)}


def done_updates(done: Any, history: list) -> dict[str, Any]:
    """The final outputs of a run: saved PNGs in the gallery (metadata kept), infotext, session history."""
    files = result_files(done)
    items = [(path, f"seed {seed}") for path, seed in zip(files, done.seeds)]
    history = (items + list(history or []))[:HISTORY_MAX]
    return {
        "gallery": items, "infotext": done.infotexts[0] if done.infotexts else "",
        "results": {"paths": files, "infotexts": list(done.infotexts), "seeds": list(done.seeds)}, "selected": 0,
        "history": history, "history_gallery": history, "preview": gr.update(visible=False), "progress": "",
        "notes": done_text(done),
    }


def selected_image(results: dict, index: int | None) -> tuple[int, str]:
    """The gallery selection -> (index, its infotext)."""
    texts = results.get("infotexts") or []
    index = index if index is not None and 0 <= index < len(texts) else 0
    return index, texts[index] if texts else ""


def seed_of(results: dict, index: int | None) -> Any:
    """The seed of gallery image `index` (the first when out of range); no change when there is no result."""
    seeds = results.get("seeds") or []
    if not seeds:
        return gr.skip()
    return seeds[index if index is not None and 0 <= index < len(seeds) else 0]


def describe(backend: Any, values: dict[str, Any]) -> str:
    """The backend's description and estimate; advisory, so a failure shows as a note, never an error."""
    # without the images (and so without outpainting, which needs one): the estimate of the stage-1 settings
    request = {k: v for k, v in request_values(values).items() if k not in IMAGE_FIELDS and not k.startswith("outpaint_")}
    try:
        return backend.describe(request)
    except Exception as exc:  # the estimate must never break the page
        log.debug("describe failed: %s", exc)
        return f"*No estimate: {exc}*"


def token_text(backend: Any, model: str | None, text: str | None) -> Any:
    """"83/150 tokens, 2 chunks" under a prompt; hidden while the backend cannot count (model not loaded)."""
    try:
        count = backend.token_count(model or "", text or "")
    except Exception as exc:  # advisory counter
        log.debug("token count failed: %s", exc)
        count = ""
    return gr.update(value=count, visible=bool(count))


def cfg_plot(backend: Any, cfg: str | None, steps: Any) -> dict[str, Any]:
    """The CFG plot, or (on bad text) the old plot kept and the error shown under the box."""
    try:
        image = backend.cfg_plot(str(cfg or "").strip(), int(steps or 1))
    except Exception as exc:  # typing in progress is not an error
        return {"cfg_plot": gr.skip(), "cfg_error": gr.update(value=f"⚠️ {exc}", visible=True)}
    return {"cfg_plot": image, "cfg_error": gr.update(value="", visible=False)}


def region_preview(backend: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The Regions preview, or (on a bad row) the old preview kept and the error shown under it."""
    request = request_values(values)
    try:
        image = backend.region_preview(request.get("regions"), request.get("width"), request.get("height"))
    except Exception as exc:  # editing in progress is not an error
        return {"regions_preview": gr.skip(), "regions_error": gr.update(value=f"⚠️ {exc}", visible=True)}
    return {"regions_preview": image, "regions_error": gr.update(value="", visible=False)}


def latent_warning(upscaler: str | None, denoise: Any, scale: float | None, min_denoise: float) -> Any:
    """Warn when a latent upscaler is paired with a denoise (number or the box's text) too low to repair its blur."""
    denoise = request_value("hires_denoise", denoise)
    bad = (scale or 1) > 1 and str(upscaler or "").startswith("latent") and isinstance(denoise, int | float) and \
        denoise < min_denoise
    text = (f"⚠️ Latent upscalers stay blurry below denoise {min_denoise:g} (now {denoise:g}): raise the denoise "
            "or pick lanczos / an upscaler model.") if bad else ""
    return gr.update(value=text, visible=bad)


def preset_updates(backend: Any, defaults: dict[str, Any], name: str, names: list[str]) -> dict[str, Any]:
    """The knob values preset `name` sets (its values over the defaults)."""
    if not name:
        return {}
    with user_errors("Loading the preset"):
        return knob_values(defaults, backend.preset_values(name), names)


# ---------------------------------------------------------------- wiring

def wire_generate(demo: gr.Blocks, tab: GenerateTab, backend: Any, gpu: GpuCalls, choices: dict[str, Any]) -> None:
    """Connect the tab's events; GPU work shares the one "gpu" queue."""
    run = _wire_run(tab, backend, gpu)
    _wire_seed(tab)
    _wire_helpers(demo, tab, backend, choices, run)


def _wire_run(tab: GenerateTab, backend: Any, gpu: GpuCalls) -> Any:
    f, v, b = tab.form, tab.view, tab.buttons

    runs = Runs()

    def on_generate(data: dict, request: gr.Request | None = None, progress=gr.Progress()):  # noqa: B008 - Gradio's
        with runs.running(getattr(request, "session_hash", None)) as control:  # idiom; no request: a direct call
            for update in generate_updates(backend, gpu.generate, f.values(data), data[v["history"]], progress,
                                           control):
                yield v.outputs(update)

    def on_stop(stops: Any, request: gr.Request):
        if runs.stop(request.session_hash):
            return gr.skip()
        return int(stops or 0) + 1  # not started: `queued_stop` changes, which takes the run off the queue

    def on_stopped():
        return v.outputs({"progress": STOPPED, "preview": gr.update(visible=False)})

    run = b["generate"].click(on_generate, inputs=f.inputs() | {v["history"]}, outputs=v.components(RESULT_OUTPUTS),
                              show_progress_on=[v["gallery"]], api_visibility="private", **GPU)
    # A run that has started is stopped through its own stream, not by cancelling the Gradio event (the browser
    # drops a cancelled event's later outputs, so the images a stop after the last step saves would not show); the
    # run then says "Stopped." or shows its images itself. A run still waiting in the queue is cancelled, and
    # "Stopped." is said in a follow-up event: said in the cancelling event, an update in flight could land after it.
    quick: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    # a hidden counter whose change cancels (a State's change fires only after queued events, and Stop must not queue)
    queued_stop = gr.Number(0, precision=0, visible="hidden", interactive=False, elem_id="queued-stop")
    b["stop"].click(on_stop, inputs=[queued_stop], outputs=[queued_stop], **quick)
    queued_stop.change(None, cancels=[run], **quick).then(
        on_stopped, outputs=v.components(["progress", "preview"]), **quick)

    for unit in range(UI_CONTROL_UNITS):
        names = [control_name(unit, field) for field in ("image", "type", "low", "high")]

        def on_map(data: dict, names=names):
            image, kind, low, high = (f.values(data)[n] for n in names)
            with user_errors("Preprocessing the control image"):
                if image is None:
                    raise gr.Error("Upload a control image first.", print_exception=False)
                return backend.control_preview(image, kind, int(low), int(high))

        b[control_name(unit, "preview")].click(
            on_map, inputs=f.inputs(names), outputs=[v[control_name(unit, "map")]], api_visibility="private", **GPU)
    return run


def _wire_seed(tab: GenerateTab) -> None:
    f, v, b = tab.form, tab.view, tab.buttons
    b["random_seed"].click(lambda: -1, outputs=[f["seed"]], queue=False, api_visibility="private")
    b["reuse_seed"].click(lambda r: seed_of(r, 0), inputs=[v["results"]], outputs=[f["seed"]], queue=False,
                          api_visibility="private")
    b["use_seed"].click(seed_of, inputs=[v["results"], v["selected"]], outputs=[f["seed"]], queue=False,
                        api_visibility="private")

    def on_select(results: dict, evt: gr.SelectData):
        return selected_image(results, evt.index)

    v["gallery"].select(on_select, inputs=[v["results"]], outputs=[v["selected"], v["infotext"]], queue=False,
                        api_visibility="private")


def _wire_helpers(demo: gr.Blocks, tab: GenerateTab, backend: Any, choices: dict[str, Any], run: Any) -> None:
    f, v = tab.form, tab.view
    quick: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    plan_inputs = f.inputs([n for n in f.names() if n not in IMAGE_FIELDS])

    def on_describe(data: dict):
        return describe(backend, f.values(data))

    # .change: also after a preset or "Send to Generate" filled the fields (one call for a burst of changes)
    gr.on([f[n].change for n in DESCRIBE_FIELDS] + [demo.load], on_describe, inputs=plan_inputs,
          outputs=[v["plan"]], trigger_mode="always_last", **quick)

    knobs = [n for n in f.names() if n in choices["defaults"]]

    def on_preset(name: str):
        return f.updates(preset_updates(backend, choices["defaults"], name, knobs))

    f["preset"].input(on_preset, inputs=[f["preset"]], outputs=f.components(knobs), **quick)

    def on_tokens(model: str, text: str):
        return token_text(backend, model, text)

    for text, counter in (("prompt", "prompt_tokens"), ("negative_prompt", "negative_tokens")):
        inputs, outputs = [f["model"], f[text]], [v[counter]]
        gr.on([f[text].change, f["model"].change, demo.load], on_tokens, inputs=inputs, outputs=outputs,
              trigger_mode="always_last", **quick)
        run.success(on_tokens, inputs=inputs, outputs=outputs, **quick)  # the first run loads the tokenizer

    def on_cfg(cfg: str, steps: Any):
        return v.outputs(cfg_plot(backend, cfg, steps))

    gr.on([f["cfg"].change, f["steps"].change, demo.load], on_cfg, inputs=[f["cfg"], f["steps"]],
          outputs=v.components(["cfg_plot", "cfg_error"]), trigger_mode="always_last", **quick)

    def on_regions(regions: Any, width: Any, height: Any):
        return v.outputs(region_preview(backend, {"regions": regions, "width": width, "height": height}))

    gr.on([f[n].change for n in ("regions", "width", "height")], on_regions,
          inputs=f.components(["regions", "width", "height"]),
          outputs=v.components(["regions_preview", "regions_error"]), trigger_mode="always_last", **quick)

    min_denoise = float(choices.get("latent_min_denoise", 0.5))
    gr.on([f["hires_upscaler"].change, f["hires_denoise"].change, f["hires_scale"].change],
          lambda u, d, s: latent_warning(u, d, s, min_denoise),
          inputs=f.components(["hires_upscaler", "hires_denoise", "hires_scale"]), outputs=[v["latent_warning"]],
          **quick)
