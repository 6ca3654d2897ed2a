"""The PNG info tab: read the `parameters` of an uploaded image and send them to the Generate tab."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from PIL import Image

from pipelines.errors import TesseraError
from ui.components import Form, hint

log = logging.getLogger(__name__)


def read_info(backend: Any, path: str | None) -> tuple[str, dict[str, Any], Any]:
    """An uploaded file -> (parameters text, values for the generator, status message update)."""
    if not path:
        return "", {}, gr.update(value="", visible=False)
    try:
        with Image.open(path) as image:
            text, values = backend.read_info(image)
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


def wire_info(v: Form, backend: Any) -> None:
    v["image"].change(lambda p: read_info(backend, p), inputs=[v["image"]],
                      outputs=[v["text"], v["values"], v["status"]], queue=False, api_visibility="private")
