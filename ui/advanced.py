"""The Generate tab's "Advanced" and "ControlNet" accordions: every knob of a request, named by its field.

Empty number boxes and "same as stage 1" choices send None, which means "the preset's value, else the default".
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import gradio as gr

from pipelines.request.schema import ControlUnit
from pipelines.serving.units import UI_CONTROL_UNITS, control_name
from ui.components import Form, checkbox, choice, field_info, hint, optional_field, slider
from ui.inpaint_tab import build_inpaint

CFG_HELP = field_info("cfg") + " interval() turns guidance off outside the window, saving half the UNet work there."
SAME = "same as stage 1"


def build_advanced(form: Form, choices: dict[str, Any], values: dict[str, Any]) -> SimpleNamespace:
    """The Advanced accordion; returns the non-field widgets (CFG plot, warnings) its events need."""
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"), gr.Tabs():
        with gr.Tab("Sampling"):
            extra = _sampling(form, choices, values)
            _feature_cache(form, values)
        with gr.Tab("Hires fix"):
            extra.latent_warning = _hires(form, choices, values)
        with gr.Tab("Tiling & memory"):
            _tiling(form, values)
        with gr.Tab("img2img"):
            _img2img(form)
        with gr.Tab("Inpaint", elem_id="inpaint-tab"):
            build_inpaint(form, values)
    return extra


def _sampling(form: Form, choices: dict[str, Any], v: dict[str, Any]) -> SimpleNamespace:
    with gr.Row():
        form.add("sampler", gr.Dropdown(choices["samplers"], value=v["sampler"], label="Sampler",
                                        info=field_info("sampler")))
        form.add("steps", slider("steps", v["steps"], "Steps", elem_id="steps"))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=220):
            form.add("cfg", gr.Textbox(value=str(v["cfg"]), label="CFG (guidance) schedule", info=CFG_HELP, elem_id="cfg",
                                       max_lines=1))
            cfg_error = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="cfg-error")
        with gr.Column(scale=2, min_width=200):
            cfg_plot = gr.Image(label="CFG scale per step", type="pil", format="png", interactive=False,
                                height=170, buttons=[], elem_id="cfg-plot")
    with gr.Row():
        form.add("emphasis", choice("emphasis", v["emphasis"], "Emphasis"))
        form.add("clip_skip", slider("clip_skip", v["clip_skip"], "CLIP skip"))
        form.add("vae_decode", choice("vae_decode", v["vae_decode"], "VAE decode"))
        form.add("prompt_timeline", choice("prompt_timeline", v["prompt_timeline"], "Prompt timeline"))
    with gr.Row():
        form.add("loras", gr.Textbox(value=", ".join(v.get("loras") or ()), label="LoRAs",
                                     placeholder="lcm-lora-sdv1-5:1.0, my-style:0.7", info=field_info("loras")))
        form.add("preview_every", gr.Slider(0, 20, value=v.get("preview_every", 4), step=1,
                                            label="Live preview every N steps",
                                            info="Decoded with TAESD; 0 turns previews off (slightly faster)."))
    return SimpleNamespace(cfg_plot=cfg_plot, cfg_error=cfg_error)


def _feature_cache(form: Form, v: dict[str, Any]) -> None:
    hint("Feature caching (DeepCache): between full UNet passes only the shallow branch runs, on cached deep "
         "features. Interval 3 skips about two thirds of the UNet work; detail gets slightly softer.")
    with gr.Row(elem_id="feature-cache"):
        form.add("feature_cache", choice("feature_cache", v["feature_cache"], "Feature caching"))
        form.add("feature_cache_interval", slider("feature_cache_interval", v["feature_cache_interval"],
                                                  "Full pass every N steps"))
        form.add("feature_cache_branch", slider("feature_cache_branch", v["feature_cache_branch"], "Cache branch"))
        form.add("feature_cache_schedule", choice("feature_cache_schedule", v["feature_cache_schedule"],
                                                  "Full-pass schedule"))


def _hires(form: Form, choices: dict[str, Any], v: dict[str, Any]) -> gr.Markdown:
    hint("Stage 2: upscale the draft, then refine it with img2img (tiled when large). Scale 1 switches it off.")
    with gr.Row():
        form.add("hires_scale", slider("hires_scale", v["hires_scale"] or 1, "Upscale by", elem_id="hires-scale"))
        form.add("hires_upscaler", gr.Dropdown(choices["upscalers"], value=v["hires_upscaler"], label="Upscaler",
                                               elem_id="hires-upscaler",
                                               info="latent-* upscale the latents (needs denoise ≥ "
                                                    f"{choices['latent_min_denoise']:g}); model files sharpen most."))
    with gr.Row():
        form.add("hires_denoise", optional_field("hires_denoise", v["hires_denoise"], "Denoise", "auto",
                                                 elem_id="hires-denoise"))
        form.add("hires_steps", optional_field("hires_steps", v["hires_steps"], "Refine steps", SAME))
        form.add("hires_sampler", gr.Dropdown([(SAME, ""), *choices["samplers"]], value=v["hires_sampler"] or "",
                                              label="Refine sampler", info=field_info("hires_sampler")))
        form.add("hires_control_tile", slider("hires_control_tile", v["hires_control_tile"] or 0, "Tile ControlNet"))
    latent_warning = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="latent-warning")
    with gr.Row():
        form.add("hires_cfg", gr.Textbox(value=v["hires_cfg"] or "", label="Refine CFG schedule", max_lines=1,
                                         placeholder=SAME, info=field_info("hires_cfg")))
        form.add("hires_prompt", gr.Textbox(value=v["hires_prompt"] or "", label="Refine prompt", max_lines=2,
                                            placeholder=SAME, info=field_info("hires_prompt")))
        form.add("hires_negative_prompt", gr.Textbox(value=v["hires_negative_prompt"] or "", max_lines=2,
                                                     label="Refine negative prompt", placeholder=SAME,
                                                     info=field_info("hires_negative_prompt")))
    return latent_warning


def _tiling(form: Form, v: dict[str, Any]) -> None:
    hint("Tiled diffusion blends overlapping tiles every step, so any size fits in memory. Sizes are in latent "
         "pixels (× 8 in the image). Empty boxes let the planner choose.")
    with gr.Row():
        form.add("tile_mode", choice("tile_mode", v["tile_mode"], "Tiled diffusion"))
        form.add("tile_blend", choice("tile_blend", v["tile_blend"], "Tile blending"))
        form.add("tile_shift", checkbox("tile_shift", v["tile_shift"], "Shift tile grid each step"))
    with gr.Row():
        form.add("tile_size", optional_field("tile_size", v["tile_size"], "Tile size", "auto"))
        form.add("tile_overlap", optional_field("tile_overlap", v["tile_overlap"], "Tile overlap", "auto"))
        form.add("tile_batch", optional_field("tile_batch", v["tile_batch"], "Tiles per UNet call", "auto"))
    with gr.Row():
        form.add("vae_tiling", choice("vae_tiling", v["vae_tiling"], "Tiled VAE"))
        form.add("vae_tile_size", optional_field("vae_tile_size", v["vae_tile_size"], "VAE tile size", "auto"))
        form.add("vae_tile_mode", choice("vae_tile_mode", v["vae_tile_mode"], "Tiled VAE mode"))
        form.add("memory_budget_gb", optional_field("memory_budget_gb", v["memory_budget_gb"], "Memory budget (GB)",
                                                    "free GPU memory"))


def _img2img(form: Form) -> None:
    hint("Start from an image instead of noise. Leave empty for text-to-image.")
    with gr.Row():
        form.add("init_image", gr.Image(type="filepath", image_mode=None, label="Initial image",
                                        sources=["upload", "clipboard"], height=260))
        form.add("strength", slider("strength", 0.75, "Denoise strength"))


def build_controlnet(form: Form, choices: dict[str, Any]) -> SimpleNamespace:
    """The ControlNet accordion: one tab per unit (`UI_CONTROL_UNITS`), fields named by `control_name`; returns
    each unit's map image and preview button (control_map, control_preview, control2_map, ...)."""
    widgets: dict[str, Any] = {}
    with gr.Accordion("ControlNet", open=False, elem_id="controlnet"):
        hint("Guide composition with an edge map, depth or pose. Upload an image to switch a unit on; units with "
             "an image all act together.")
        with gr.Tabs():
            for unit in range(UI_CONTROL_UNITS):
                with gr.Tab(f"Unit {unit + 1}", elem_id=f"control-unit-{unit + 1}"):
                    widgets.update(_control_unit(form, choices, unit))
    return SimpleNamespace(**widgets)


def _control_unit(form: Form, choices: dict[str, Any], unit: int) -> dict[str, gr.Image | gr.Button]:
    """One unit's fields (into `form`); returns its map image and preview button by name."""

    def name(field: str) -> str:
        return control_name(unit, field)

    suffix = f"-{unit + 1}" if unit else ""
    defaults = ControlUnit(image=None)
    with gr.Row(equal_height=False):
        form.add(name("image"), gr.Image(type="filepath", image_mode=None, label="Control image",
                                         sources=["upload", "clipboard"], height=260, elem_id="control-image" + suffix))
        control_map = gr.Image(label="Preprocessed map", type="pil", format="png", interactive=False,
                               height=260, buttons=["download"], elem_id="control-map" + suffix)
    with gr.Row():
        form.add(name("type"), gr.Dropdown(choices["preprocessors"], value=_first(choices["preprocessors"],
                                                                                   defaults.type),
                                           label="Preprocessor", info=field_info(name("type"))))
        form.add(name("model"), gr.Dropdown([("matching default", ""), *choices["controlnets"]], value="",
                                            allow_custom_value=True, label="ControlNet model",
                                            info=field_info(name("model"))))
        form.add(name("scale"), slider(name("scale"), defaults.scale, "Strength"))
    with gr.Row():
        form.add(name("start"), slider(name("start"), defaults.start, "Start"))
        form.add(name("end"), slider(name("end"), defaults.end, "End"))
        form.add(name("low"), slider(name("low"), defaults.low, "Canny low threshold"))
        form.add(name("high"), slider(name("high"), defaults.high, "Canny high threshold"))
    with gr.Row():
        form.add(name("guess_mode"), checkbox(name("guess_mode"), defaults.guess_mode, "Guess mode"))
        preview = gr.Button("Preview map", size="sm", elem_id="preview-map" + suffix)
    return {name("map"): control_map, name("preview"): preview}


def _first(options: list[str], preferred: str) -> str | None:
    return preferred if preferred in options else (options[0] if options else None)


REGION_HEADERS = ["x", "y", "w", "h", "prompt", "negative prompt", "weight", "feather px", "seed"]
REGION_TYPES: list[Literal["number", "str"]] = ["number", "number", "number", "number", "str", "str", "number", "number",
                                               "number"]  # one per header
REGION_HELP = ("One row per region: a rectangle in fractions of the image (all of x, y, w, h ≤ 1) or in pixels, its "
               "prompt, an optional negative prompt (empty = the main one), a weight, a soft edge in pixels and a "
               "seed for its noise (-1 = the image's). Empty rows are ignored; at most 16 regions.")


def build_regions(form: Form, values: dict[str, Any]) -> SimpleNamespace:
    """The Regions accordion: a table of rectangles and prompts (`regions`), where the base prompt acts
    (`region_base`), and a preview of the boxes drawn on the canvas; returns the preview widgets."""
    from pipelines.request.regions import rows_from_regions

    with gr.Accordion("Regions", open=False, elem_id="regions-box"):
        hint("Regional prompts: each rectangle gets its own prompt; the main prompt covers the rest (or everything, "
             "as a background). Works tiled, in the hires pass, with ControlNet and SDXL.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                form.add("regions", gr.Dataframe(
                    value=rows_from_regions(values.get("regions") or ()) or None, headers=REGION_HEADERS,
                    datatype=REGION_TYPES, row_count=2, column_count=9,
                    type="array", interactive=True, label="Regions", elem_id="regions"))
                hint(REGION_HELP)
                form.add("region_base", choice("region_base", values.get("region_base", "rest"),
                                               "Main prompt covers"))
            with gr.Column(scale=2, min_width=200):
                preview = gr.Image(label="Regions on the canvas", type="pil", format="png", interactive=False,
                                   height=260, buttons=[], elem_id="regions-preview")
                error = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="regions-error")
    return SimpleNamespace(regions_preview=preview, regions_error=error)
