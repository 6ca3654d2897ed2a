"""The Generate tab's layout: prompts, preset and model, size and seed, buttons, results and history.

Request fields go into `tab.form` (named like the backend's flat fields); other widgets into `tab.view`, also
by name. Events are wired in `ui.generate_events`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ui.advanced import build_advanced, build_controlnet, build_regions
from ui.components import Form, field_info, knob_values, number_box, slider

DEFAULT_PRESET = "fast"


@dataclass
class GenerateTab:
    """The tab's named widgets: request fields (`form`), outputs and helpers (`view`), and its buttons."""

    form: Form = field(default_factory=Form)
    view: Form = field(default_factory=Form)
    buttons: dict[str, gr.Button] = field(default_factory=dict)


def initial_values(backend: Any, choices: dict[str, Any]) -> dict[str, Any]:
    """Field values the page opens with: the defaults with the first preset (fast when present) applied."""
    presets = list(choices["presets"])
    preset = DEFAULT_PRESET if DEFAULT_PRESET in presets else (presets[0] if presets else None)
    values = dict(choices["defaults"])
    values["model"] = choices.get("default_model") or values.get("model")
    if preset is not None:
        values.update(knob_values(choices["defaults"], backend.preset_values(preset), values))
    values["preset"] = preset
    return values


def build_generate_tab(backend: Any, choices: dict[str, Any]) -> GenerateTab:
    """Lay out the tab (inside an open gr.Tab) and return its named widgets."""
    tab = GenerateTab()
    values = initial_values(backend, choices)
    with gr.Row(equal_height=False, elem_id="generate-row"):
        with gr.Column(scale=6, min_width=380, elem_id="controls"):
            _prompts(tab)
            _preset_and_model(tab, choices, values)
            _size_and_seed(tab, values)
            _buttons(tab)
            extra = build_advanced(tab.form, choices, values)
            control = build_controlnet(tab.form, choices)
            regions = build_regions(tab.form, values)
            for name, widget in {**vars(extra), **vars(control), **vars(regions)}.items():
                if isinstance(widget, gr.Button):
                    tab.buttons[name] = widget
                else:
                    tab.view.add(name, widget)
        with gr.Column(scale=5, min_width=340, elem_id="results"):
            _results(tab)
    return tab


def _prompts(tab: GenerateTab) -> None:
    f, v = tab.form, tab.view
    with gr.Group(elem_classes=["prompt-box"]):  # the counter sits right under its box, no gap
        f.add("prompt", gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id="prompt", autofocus=True,
                                   placeholder="a lighthouse on a cliff at dawn, (dramatic clouds:1.2), detailed"))
        v.add("prompt_tokens", gr.Markdown(elem_classes=["token-count"], elem_id="prompt-tokens", visible=False))
    with gr.Group(elem_classes=["prompt-box"]):
        f.add("negative_prompt", gr.Textbox(label="Negative prompt", lines=1, max_lines=6,
                                            elem_id="negative-prompt", placeholder="blurry, low quality, watermark"))
        v.add("negative_tokens", gr.Markdown(elem_classes=["token-count"], elem_id="negative-tokens",
                                             visible=False))


def _preset_and_model(tab: GenerateTab, choices: dict[str, Any], values: dict[str, Any]) -> None:
    with gr.Row():
        tab.form.add("preset", gr.Dropdown(list(choices["presets"]), value=values["preset"], label="Preset",
                                           elem_id="preset", scale=2,
                                           info="Quality tier: fills the settings below (you can still change them)."))
        tab.form.add("model", gr.Dropdown(choices["models"], value=values["model"], label="Model", scale=3,
                                          allow_custom_value=True, elem_id="model",
                                          info=field_info("model")))
    tab.view.add("plan", gr.Markdown(elem_id="plan", elem_classes=["plan"]))


def _size_and_seed(tab: GenerateTab, values: dict[str, Any]) -> None:
    f = tab.form
    with gr.Row():
        f.add("width", slider("width", values["width"], "Width", elem_id="width"))
        f.add("height", slider("height", values["height"], "Height", elem_id="height"))
    with gr.Row(equal_height=True, elem_id="seed-row"):
        f.add("seed", number_box("seed", -1, "Seed", elem_id="seed", scale=3))
        with gr.Column(scale=1, min_width=110, elem_classes=["tools"]):
            tab.buttons["random_seed"] = gr.Button("Random", size="sm", elem_id="random-seed")
            tab.buttons["reuse_seed"] = gr.Button("Reuse last", size="sm", elem_id="reuse-seed")
        f.add("batch_size", slider("batch_size", values["batch_size"], "Batch size", scale=3, elem_id="batch-size"))


def _buttons(tab: GenerateTab) -> None:
    with gr.Row(elem_id="run-buttons"):
        tab.buttons["generate"] = gr.Button("Generate", variant="primary", size="lg", scale=3, elem_id="generate")
        tab.buttons["stop"] = gr.Button("Stop", variant="stop", size="lg", scale=1, elem_id="stop")


def _results(tab: GenerateTab) -> None:
    v = tab.view
    v.add("progress", gr.Markdown(elem_id="progress", elem_classes=["progress-text"]))
    v.add("preview", gr.Image(label="Live preview", type="pil", format="png", interactive=False, visible=False,
                              height=360, elem_id="preview"))
    v.add("gallery", gr.Gallery(label="Results", format="png", columns=2, height=520, object_fit="contain",
                                preview=True, elem_id="gallery", buttons=["download", "fullscreen"]))
    with gr.Row():
        tab.buttons["use_seed"] = gr.Button("Use this image's seed", size="sm", elem_id="use-seed")
    v.add("infotext", gr.Textbox(label="Parameters (saved in the PNG)", lines=3, max_lines=10, interactive=False,
                                 buttons=["copy"], elem_id="infotext"))
    v.add("notes", gr.Markdown(elem_id="notes", elem_classes=["notes"]))
    with gr.Accordion("This session's images", open=False, elem_id="history-box"):
        v.add("history_gallery", gr.Gallery(label="History", format="png", columns=6, height=300,
                                            object_fit="contain", elem_id="history"))
    v.add("results", gr.State({"paths": [], "infotexts": [], "seeds": []}))
    v.add("selected", gr.State(0))
    v.add("history", gr.State([]))
