"""The Generate tab's "Inpaint" settings: a brush over the image (gr.ImageEditor), an uploaded-mask option,
A1111's inpainting options and outpainting, every widget named by its request field.

The editor's value goes to the backend undecoded (files in Gradio's cache); the backend opens the background and
the painted layers with its checks and takes the strokes' alpha as the mask (`pipelines.edit.inpaint.editor_images`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.components import Form, checkbox, choice, hint, number_box, optional_field, slider

OUTPAINT_STEP = 128
SIDES = ("left", "right", "top", "bottom")
_ARROWS = {"left": "◀", "right": "▶", "top": "▲", "bottom": "▼"}


def build_inpaint(form: Form, v: dict[str, Any]) -> None:
    """The Inpaint tab's widgets (inside an open gr.Tab); the outpaint buttons are wired here."""
    hint("Paint over the area to repaint (white brush), or upload a black-and-white mask. Denoise strength (img2img "
         "tab) sets how much it changes. Outpainting extends the canvas; it works without a mask.")
    with gr.Row(equal_height=False):
        form.add("inpaint_editor", gr.ImageEditor(
            type="filepath", format="png", label="Image and mask (paint what to repaint)", sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"), layers=False,
            transforms=(), height=360, elem_id="inpaint-editor"))
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
