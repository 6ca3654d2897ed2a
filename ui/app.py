"""Compose the Tessera UI: `create_demo(backend)` builds the Blocks, `launch_kwargs()` holds launch settings.

The backend is an object of plain callables (pipelines.serving.service.Backend); nothing here imports torch or loads
weights, so the UI builds (and its tests run) without a GPU.

    from pipelines.serving.service import make_backend
    demo = create_demo(make_backend(engine), queue_size=16)
    demo.launch(**launch_kwargs())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ui.api import add_api
from ui.generate_events import IMAGE_FIELDS, wire_generate
from ui.generate_tab import build_generate_tab
from ui.info_tab import build_info_tab, wire_info
from ui.runner import GpuCalls
from ui.uploads import guard_uploads
from ui.upscale_tab import build_upscale_tab, wire_upscale

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TITLE = "Tessera"
HEADER = ("# Tessera\nFast high-resolution Stable Diffusion: pick a preset, write a prompt, generate. "
          "Presets go from a seconds-long **draft** to 4K **ultra** (tiled refine in bounded memory).")
# Gradio's cache sweep (frequency, age) in seconds: every hour, uploads and served copies of results older than
# 6 hours are deleted (the saved PNGs in the outputs folder stay); everything left goes when the server stops.
DELETE_CACHE = (3600, 6 * 3600)


def create_demo(backend: Any, *, queue_size: int = 16, workers: int = 1) -> gr.Blocks:
    """The whole app: Generate, Upscale and PNG info tabs plus the /generate and /upscale API endpoints.

    `workers` is how many jobs the backend runs at once (one per device or cluster replica): the "gpu" queue's
    concurrency."""
    choices = backend.choices()
    gpu = GpuCalls(backend)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(HEADER, elem_id="header")
        if choices.get("notice"):
            gr.Markdown(f"⚠️ {choices['notice']}", elem_id="notice", elem_classes=["warning"])
        with gr.Tabs(selected="generate") as tabs:
            with gr.Tab("Generate", id="generate"):
                gen = build_generate_tab(backend, choices)
            with gr.Tab("Upscale", id="upscale"):
                up_fields, up_view, up_run = build_upscale_tab(choices)
            with gr.Tab("PNG info", id="info"):
                info, send = build_info_tab()
        wire_generate(demo, gen, backend, gpu, choices)
        wire_upscale(up_fields, up_view, up_run, gpu)
        wire_info(info, backend)
        _wire_send_to_generate(send, info, gen, tabs)
        add_api(gpu)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    set_gpu_concurrency(demo, workers)
    return guard_uploads(demo)  # every event takes files only from Gradio's upload route


def set_gpu_concurrency(demo: gr.Blocks, workers: int) -> None:
    """Every event in the "gpu" queue may run `workers` at once (Gradio takes the smallest limit of an id)."""
    for fn in demo.fns.values():
        if fn.concurrency_id == "gpu":
            fn.concurrency_limit = max(1, int(workers))


def _wire_send_to_generate(send: gr.Button, info: Any, gen: Any, tabs: gr.Tabs) -> None:
    """PNG info -> the Generate tab's fields (from read_info's flat values), then switch to that tab."""

    def on_send(values: dict[str, Any]):
        if not values:
            raise gr.Error("Upload an image with generation parameters first.", print_exception=False)
        return {**gen.form.updates({k: v for k, v in values.items() if k in fields}),
                tabs: gr.Tabs(selected="generate")}

    fields = [n for n in gen.form.names() if n != "preset" and n not in IMAGE_FIELDS]
    send.click(on_send, inputs=[info["values"]], outputs=[*gen.form.components(fields), tabs], queue=False,
               api_visibility="private")


def theme() -> gr.themes.Base:
    """A calm theme with system fonts (no web-font downloads: works offline and loads fast)."""
    sans = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate", radius_size="md",
                          font=sans, font_mono=mono)


def launch_kwargs() -> dict[str, Any]:
    """Keyword arguments for `demo.launch` (theme and CSS live here in Gradio 6)."""
    return {
        "theme": theme(),
        "css_paths": [ASSETS / "style.css"],
        "max_file_size": "20mb",
        "footer_links": ["api", "gradio"],
        "ssr_mode": False,
        "show_error": True,
    }
