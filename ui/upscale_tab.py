"""The Upscale tab: an uploaded image -> pixel upscaler (optionally an img2img refine) -> a PNG with metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import gradio as gr

from pipelines.request.schema import UpscaleRequest
from ui.components import Form, field_info, hint, number_box, slider
from ui.runner import GpuCalls, Stream, done_text, is_done, progress_text, result_files, stream_events

GPU: dict[str, Any] = {"concurrency_id": "gpu", "concurrency_limit": 1}
OUTPUTS = ("progress", "result", "infotext", "notes")


def pixel_upscalers(upscalers: list[str]) -> list[str]:
    """Upscalers that work on images (latent ones only work inside a generation)."""
    return [u for u in upscalers if not u.startswith("latent")]


def upscale_updates(stream: Stream, values: dict[str, Any], progress=None) -> Iterator[dict[str, Any]]:
    """Run the backend's upscale; progress text while refining, then the saved PNG and its parameters."""
    if values.get("image") is None:
        raise gr.Error("Upload an image to upscale.", print_exception=False)
    values = {k: (None if isinstance(v, str) and not v.strip() and k not in ("prompt",) else v)
              for k, v in values.items()}
    yield {"progress": "Upscaling…", "notes": ""}
    with closing(stream_events(stream, values, "Upscaling")) as events:
        for event in events:
            if is_done(event):
                files = result_files(event)
                yield {"progress": "", "result": files[0] if files else None,
                       "infotext": event.infotexts[0] if event.infotexts else "", "notes": done_text(event)}
                return
            if progress is not None:
                progress((event.step, event.total), desc=progress_text(event))
            yield {"progress": progress_text(event)}
    yield {"progress": "Stopped."}


def build_upscale_tab(choices: dict[str, Any]) -> tuple[Form, Form, gr.Button]:
    """Lay out the tab (inside an open gr.Tab): (fields, outputs, run button)."""
    f, v, d = Form(), Form(), UpscaleRequest()
    upscalers = pixel_upscalers(choices["upscalers"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=360):
            f.add("image", gr.Image(type="filepath", image_mode=None, label="Image to upscale",
                                    sources=["upload", "clipboard"], height=340, elem_id="upscale-image"))
            with gr.Row():
                # the list's first, `auto` (the best model file, else lanczos), as the tab always offered
                f.add("upscaler", gr.Dropdown(upscalers, value=upscalers[0] if upscalers else None, label="Upscaler",
                                              info=field_info("upscaler", UpscaleRequest)))
                f.add("scale", slider("scale", d.scale, "Scale", cls=UpscaleRequest))
            f.add("denoise", slider("denoise", d.denoise, "Refine denoise", cls=UpscaleRequest))
            f.add("prompt", gr.Textbox(label="Refine prompt", lines=2, placeholder="what the image shows (for the "
                                       "refine pass)"))
            with gr.Accordion("Refine settings", open=False):
                hint("Only used when the refine denoise is above 0.")
                f.add("negative_prompt", gr.Textbox(label="Negative prompt", lines=1))
                with gr.Row():
                    f.add("model", gr.Dropdown(choices["models"], value=choices.get("default_model"),
                                               allow_custom_value=True, label="Model"))
                    f.add("steps", slider("steps", d.steps, "Steps", cls=UpscaleRequest))
                    f.add("seed", number_box("seed", d.seed, "Seed", cls=UpscaleRequest))
            run = gr.Button("Upscale", variant="primary", size="lg", elem_id="upscale")
        with gr.Column(scale=6, min_width=360):
            v.add("progress", gr.Markdown(elem_classes=["progress-text"]))
            v.add("result", gr.Image(label="Upscaled (PNG with metadata)", type="filepath", format="png",
                                     interactive=False, height=520, buttons=["download", "fullscreen"],
                                     elem_id="upscale-result"))
            v.add("infotext", gr.Textbox(label="Parameters", lines=2, interactive=False, buttons=["copy"]))
            v.add("notes", gr.Markdown(elem_classes=["notes"]))
    return f, v, run


def wire_upscale(f: Form, v: Form, run: gr.Button, gpu: GpuCalls) -> None:
    def on_upscale(data: dict, progress=gr.Progress()):  # noqa: B008 - Gradio's progress-tracker idiom
        for update in upscale_updates(gpu.upscale, f.values(data), progress):
            yield v.outputs(update)

    run.click(on_upscale, inputs=f.inputs(), outputs=v.components(OUTPUTS), show_progress_on=[v["result"]],
              api_visibility="private", **GPU)
