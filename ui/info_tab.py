"""The PNG info tab: read the `parameters` of an uploaded image and send them to the Generate tab."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from pipelines.errors import TesseraError
from ui.components import Form, hint

log = logging.getLogger(__name__)


def read_info(backend: Any, path: str | None) -> tuple[str, dict[str, Any], Any]:
    """An uploaded file -> (parameters text, values for the generator, status message update).

    The backend checks the file from its header (format, 64 MP) and reads its text without decoding the pixels."""
    if not path:
        return "", {}, gr.update(value="", visible=False)
    try:
        text, values = backend.read_info(path)
    except (TesseraError, OSError, ValueError) as exc:
        return "", {}, gr.update(value=f"⚠️ {exc}", visible=True)
    except Exception as exc:
        log.exception("reading parameters failed")
        return "", {}, gr.update(value=f"⚠️ Could not read this image ({type(exc).__name__}).", visible=True)
    return text, values, gr.update(value="", visible=False)


def build_info_tab() -> tuple[Form, gr.Button]:
    """Lay out the tab (inside an open gr.Tab): (widgets by name, the send button)."""
    v = Form()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            hint("Drop a PNG made by Tessera, AUTOMATIC1111, Forge or ComfyUI-with-A1111-metadata.")
            v.add("image", gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                    height=380, elem_id="info-image"))
        with gr.Column(scale=6, min_width=320):
            v.add("status", gr.Markdown(visible=False, elem_classes=["warning"]))
            v.add("text", gr.Textbox(label="Parameters", lines=8, max_lines=20, interactive=False, buttons=["copy"],
                                     elem_id="info-text"))
            send = gr.Button("Send to Generate", variant="primary", elem_id="send-to-generate")
            v.add("values", gr.State({}))
    return v, send


INFO_QUEUE: dict[str, Any] = {"concurrency_id": "info", "concurrency_limit": 2}
"""PNG info runs in the queue (its length bounded by the app's queue size), two at a time: reading the header and
the text chunks costs little memory, and it need not wait behind a generation in the "gpu" queue."""


def wire_info(v: Form, backend: Any) -> None:
    v["image"].change(lambda p: read_info(backend, p), inputs=[v["image"]],
                      outputs=[v["text"], v["values"], v["status"]], show_progress="hidden",
                      api_visibility="private", **INFO_QUEUE)
