"""The Generate tab's "Inpaint" settings: a brush over the image (gr.ImageEditor), an uploaded-mask option,
A1111's inpainting options and outpainting, every widget named by its request field.

The editor's value goes to the backend undecoded (files in Gradio's cache, `undecoded`); the backend
opens the background and the painted layers with its checks (format, 64 MP from the header) and takes the strokes'
alpha as the mask (`pipelines.edit.inpaint.editor_images`).
"""

from __future__ import annotations

from types import MethodType
from typing import Any, cast

import gradio as gr
from gradio.data_classes import FileData
from gradio.processing_utils import save_bytes_to_cache

from ui.components import Form, checkbox, choice, hint, number_box, optional_field, slider
from ui.editor_blobs import bounded

OUTPAINT_STEP = 128
SIDES = ("left", "right", "top", "bottom")
_ARROWS = {"left": "◀", "right": "▶", "top": "▲", "bottom": "▼"}


def undecoded(editor: gr.ImageEditor) -> gr.ImageEditor:
    """`editor`, made to hand its files over as they came, never decoded.

    Gradio's ImageEditor preprocess opens and converts every image (`convert_and_format_image`:
    `im.convert(image_mode)`) whatever `type` says, so a 144 MP PNG of 20 KB would be decoded (~0.6 GB per image)
    before any check of ours could refuse it from its header. This widget's per-file step is replaced (the class
    is untouched; a subclass would make Gradio write a .pyi stub next to this module): a background the browser
    uploaded (a FileData that Gradio has checked is an upload) is passed as its path, and the canvas exports the
    editor posts to its `accept_blobs` route (bytes, each at most the app's max_file_size) are written unchanged
    to Gradio's cache. The backend then opens them with its header checks. Those exports are held in bounded,
    expiring memory behind a checked route (`ui.editor_blobs.bounded`)."""
    cast(Any, editor).convert_and_format_image = MethodType(_as_file, editor)  # an instance attribute, as before
    return bounded(editor)


def _as_file(editor: gr.ImageEditor, file: FileData | bytes | None, flatten_on_white: bool = False) -> str | None:
    """One of the editor's images -> a file path, without opening it."""
    if file is None:
        return None
    if isinstance(file, FileData):
        return file.path
    return save_bytes_to_cache(bytes(file), "editor.png", cache_dir=editor.GRADIO_CACHE)


def build_inpaint(form: Form, v: dict[str, Any]) -> None:
    """The Inpaint tab's widgets (inside an open gr.Tab); the outpaint buttons are wired here."""
    hint("Paint over the area to repaint (white brush), or upload a black-and-white mask. Denoise strength (img2img "
         "tab) sets how much it changes. Outpainting extends the canvas; it works without a mask.")
    with gr.Row(equal_height=False):
        form.add("inpaint_editor", undecoded(gr.ImageEditor(
            type="filepath", format="png", label="Image and mask (paint what to repaint)", sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"), layers=False,
            transforms=(), height=360, elem_id="inpaint-editor")))
        form.add("mask", gr.Image(type="filepath", image_mode=None, format="png", label="Or upload a mask (white = repaint)",
                                  sources=["upload"], height=360, elem_id="inpaint-mask"))
    with gr.Row():
        form.add("mask_blur", slider("mask_blur", v["mask_blur"], "Mask blur"))
        form.add("masked_content", choice("masked_content", v["masked_content"], "Masked content"))
        form.add("mask_mode", choice("mask_mode", v["mask_mode"], "Mask mode"))
    with gr.Row():
        form.add("inpaint_area", choice("inpaint_area", v["inpaint_area"], "Inpaint area"))
        form.add("inpaint_padding", slider("inpaint_padding", v["inpaint_padding"], "Only masked padding (px)"))
        form.add("inpaint_size", optional_field("inpaint_size", v["inpaint_size"], "Only masked size", "model's native"))
        form.add("soft_inpainting", checkbox("soft_inpainting", v["soft_inpainting"], "Soft inpainting"))
    _outpaint(form, v)


def _outpaint(form: Form, v: dict[str, Any]) -> None:
    with gr.Row(elem_id="outpaint-row"):
        for side in SIDES:
            with gr.Column(min_width=120):
                name = f"outpaint_{side}"
                box = form.add(name, number_box(name, v[name], f"Outpaint {side} (px)", elem_id=f"outpaint-{side}",
                                                info=None))
                button = gr.Button(f"{_ARROWS[side]} +{OUTPAINT_STEP}", size="sm", elem_id=f"outpaint-{side}-more")
                button.click(_more, inputs=[box], outputs=[box], queue=False, api_visibility="private")


def _more(value: Any) -> int:
    """One outpaint button press: OUTPAINT_STEP more px on that side."""
    try:
        return max(0, int(value or 0)) + OUTPAINT_STEP
    except (TypeError, ValueError):
        return OUTPAINT_STEP
