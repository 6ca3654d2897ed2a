"""The Generate tab's "Advanced" and "ControlNet" accordions: every knob of a request, named by its field.

Empty number boxes and "same as stage 1" choices send None, which means "the preset's value, else the default".
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import gradio as gr

from pipelines.request import UI_CONTROL_UNITS, control_name
from ui.components import Form, hint, optional_number
from ui.inpaint_tab import build_inpaint

CFG_HELP = ("7 · linear(4,9) · cosine(9,4) · step(9,5,0.5) · interval(7.5,0.2,0.8), optionally `, rescale=0.7`. "
            "interval() turns guidance off outside the window, saving half the UNet work there.")
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
                                        info="DPM++ 2M Karras is a good default; LCM needs an LCM model or LoRA."))
        form.add("steps", gr.Slider(1, 150, value=v["steps"], step=1, label="Steps", elem_id="steps",
                                    info="Denoising steps of stage 1."))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=220):
            form.add("cfg", gr.Textbox(value=str(v["cfg"]), label="CFG (guidance) schedule", info=CFG_HELP, elem_id="cfg",
                                       max_lines=1))
            cfg_error = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="cfg-error")
        with gr.Column(scale=2, min_width=200):
            cfg_plot = gr.Image(label="CFG scale per step", type="pil", format="png", interactive=False,
                                height=170, buttons=[], elem_id="cfg-plot")
    with gr.Row():
        form.add("emphasis", gr.Radio(["a1111", "none"], value=v["emphasis"], label="Emphasis",
                                      info="How (word:1.3) weights apply: a1111 rescales to keep the mean."))
        form.add("clip_skip", gr.Slider(1, 12, value=v["clip_skip"], step=1, label="CLIP skip",
                                        info="2 for many anime models; 1 otherwise."))
        form.add("vae_decode", gr.Radio(["full", "taesd"], value=v["vae_decode"], label="VAE decode",
                                        info="taesd: a tiny decoder, much faster, slightly softer."))
        form.add("prompt_timeline", gr.Radio(["a1111", "legacy"], value=v["prompt_timeline"], label="Prompt timeline",
                                             info="[a:b:N]: a1111 = 0.5 is a fraction, 5 a step, 1.5 half-way "
                                                  "through hires; legacy = N < 1 a fraction, else a step."))
    with gr.Row():
        form.add("loras", gr.Textbox(value=", ".join(v.get("loras") or ()), label="LoRAs",
                                     placeholder="lcm-lora-sdv1-5:1.0, my-style:0.7",
                                     info="Comma-separated name:weight (files in models/loras or catalogue names)."))
        form.add("preview_every", gr.Slider(0, 20, value=v.get("preview_every", 4), step=1,
                                            label="Live preview every N steps",
                                            info="Decoded with TAESD; 0 turns previews off (slightly faster)."))
    return SimpleNamespace(cfg_plot=cfg_plot, cfg_error=cfg_error)


def _feature_cache(form: Form, v: dict[str, Any]) -> None:
    hint("Feature caching (DeepCache): between full UNet passes only the shallow branch runs, on cached deep "
         "features. Interval 3 skips about two thirds of the UNet work; detail gets slightly softer.")
    with gr.Row(elem_id="feature-cache"):
        form.add("feature_cache", gr.Radio(["off", "on"], value=v["feature_cache"], label="Feature caching",
                                           info="Not with 'Shift tile grid each step'."))
        form.add("feature_cache_interval", gr.Slider(1, 20, value=v["feature_cache_interval"], step=1,
                                                     label="Full pass every N steps", info="1 = same image as off."))
        form.add("feature_cache_branch", gr.Slider(0, 15, value=v["feature_cache_branch"], step=1,
                                                   label="Cache branch",
                                                   info="0 = fastest; higher keeps more of the UNet (SD1.5 ≤ 10, "
                                                        "SDXL ≤ 7)."))
        form.add("feature_cache_schedule", gr.Radio(["uniform", "nonuniform"], value=v["feature_cache_schedule"],
                                                    label="Full-pass schedule",
                                                    info="nonuniform: as many full passes, denser early."))


def _hires(form: Form, choices: dict[str, Any], v: dict[str, Any]) -> gr.Markdown:
    hint("Stage 2: upscale the draft, then refine it with img2img (tiled when large). Scale 1 switches it off.")
    with gr.Row():
        form.add("hires_scale", gr.Slider(1, 8, value=v["hires_scale"] or 1, step=0.25, label="Upscale by",
                                          elem_id="hires-scale",
                                          info="Final size = width/height × this; 1 = off."))
        form.add("hires_upscaler", gr.Dropdown(choices["upscalers"], value=v["hires_upscaler"], label="Upscaler",
                                               elem_id="hires-upscaler",
                                               info="latent-* upscale the latents (needs denoise ≥ "
                                                    f"{choices['latent_min_denoise']:g}); model files sharpen most."))
    with gr.Row():
        form.add("hires_denoise", optional_number(v["hires_denoise"], "Denoise", "auto",
                                                  "0-1: how much the refine pass changes; empty = 0.35 (0.55 latent).",
                                                  elem_id="hires-denoise"))
        form.add("hires_steps", optional_number(v["hires_steps"], "Refine steps", SAME,
                                                "Steps actually run in stage 2; empty = same as stage 1."))
        form.add("hires_sampler", gr.Dropdown([(SAME, ""), *choices["samplers"]], value=v["hires_sampler"] or "",
                                              label="Refine sampler"))
        form.add("hires_control_tile", gr.Slider(0, 2, value=v["hires_control_tile"] or 0, step=0.05,
                                                 label="Tile ControlNet",
                                                 info="Holds the draft's structure at higher denoise (0 = off; "
                                                      "needs tile-sd15 or a tile model in models/controlnet)."))
    latent_warning = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="latent-warning")
    with gr.Row():
        form.add("hires_cfg", gr.Textbox(value=v["hires_cfg"] or "", label="Refine CFG schedule", max_lines=1,
                                         placeholder=SAME, info="Empty = the stage-1 schedule."))
        form.add("hires_prompt", gr.Textbox(value=v["hires_prompt"] or "", label="Refine prompt", max_lines=2,
                                            placeholder=SAME))
        form.add("hires_negative_prompt", gr.Textbox(value=v["hires_negative_prompt"] or "", max_lines=2,
                                                     label="Refine negative prompt", placeholder=SAME))
    return latent_warning


def _tiling(form: Form, v: dict[str, Any]) -> None:
    hint("Tiled diffusion blends overlapping tiles every step, so any size fits in memory. Sizes are in latent "
         "pixels (× 8 in the image). Empty boxes let the planner choose.")
    with gr.Row():
        form.add("tile_mode", gr.Radio(["auto", "on", "off"], value=v["tile_mode"], label="Tiled diffusion",
                                       info="auto: tile only when the image does not fit the memory budget."))
        form.add("tile_blend", gr.Radio(["gaussian", "average"], value=v["tile_blend"], label="Tile blending",
                                        info="gaussian (Mixture of Diffusers) hides seams best."))
        form.add("tile_shift", gr.Checkbox(value=bool(v["tile_shift"]), label="Shift tile grid each step",
                                           info="A seeded random offset per step hides seams further."))
    with gr.Row():
        form.add("tile_size", optional_number(v["tile_size"], "Tile size", "auto", "16-256; planner: 96 (SD1) / 128 (SDXL)."))
        form.add("tile_overlap", optional_number(v["tile_overlap"], "Tile overlap", "auto", "0-128, smaller than the tile; planner: 32."))
        form.add("tile_batch", optional_number(v["tile_batch"], "Tiles per UNet call", "auto",
                                                     "1-64; more is faster if memory allows."))
    with gr.Row():
        form.add("vae_tiling", gr.Radio(["auto", "on", "off"], value=v["vae_tiling"], label="Tiled VAE",
                                        info="Decode in tiles with whole-image GroupNorm statistics."))
        form.add("vae_tile_size", optional_number(v["vae_tile_size"], "VAE tile size", "auto",
                                                        "16-512 latent pixels."))
        form.add("vae_tile_mode", gr.Radio(["auto", "exact", "stream"], value=v["vae_tile_mode"],
                                           label="Tiled VAE mode",
                                           info="exact: fastest, keeps full-size layers in RAM. stream: bounded "
                                                "memory at any size, slower. auto: exact when it fits, else "
                                                "streams only what it must. Same pixels."))
        form.add("memory_budget_gb", optional_number(v["memory_budget_gb"], "Memory budget (GB)", "free GPU memory",
                                                           "The planner tiles to stay under this."))


def _img2img(form: Form) -> None:
    hint("Start from an image instead of noise. Leave empty for text-to-image.")
    with gr.Row():
        form.add("init_image", gr.Image(type="filepath", image_mode=None, label="Initial image",
                                        sources=["upload", "clipboard"], height=260))
        form.add("strength", gr.Slider(0, 1, value=0.75, step=0.05, label="Denoise strength",
                                       info="0 keeps the image, 1 replaces it entirely."))


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
    with gr.Row(equal_height=False):
        form.add(name("image"), gr.Image(type="filepath", image_mode=None, label="Control image",
                                         sources=["upload", "clipboard"], height=260, elem_id="control-image" + suffix))
        control_map = gr.Image(label="Preprocessed map", type="pil", format="png", interactive=False,
                               height=260, buttons=["download"], elem_id="control-map" + suffix)
    with gr.Row():
        form.add(name("type"), gr.Dropdown(choices["preprocessors"], value=_first(choices["preprocessors"], "canny"),
                                           label="Preprocessor", info="none = the image already is a map."))
        form.add(name("model"), gr.Dropdown([("matching default", ""), *choices["controlnets"]], value="",
                                            allow_custom_value=True, label="ControlNet model"))
        form.add(name("scale"), gr.Slider(0, 2, value=1.0, step=0.05, label="Strength",
                                          info="Conditioning scale; 0 = no effect."))
    with gr.Row():
        form.add(name("start"), gr.Slider(0, 1, value=0.0, step=0.05, label="Start", info="Fraction of steps."))
        form.add(name("end"), gr.Slider(0, 1, value=1.0, step=0.05, label="End", info="Fraction of steps."))
        form.add(name("low"), gr.Slider(0, 255, value=100, step=1, label="Canny low threshold"))
        form.add(name("high"), gr.Slider(0, 255, value=200, step=1, label="Canny high threshold"))
    with gr.Row():
        form.add(name("guess_mode"), gr.Checkbox(value=False, label="Guess mode",
                                                 info="Apply the control to the conditional pass only."))
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
    from pipelines.denoise.region_spec import rows_from_regions

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
                form.add("region_base", gr.Radio(["rest", "background"], value=values.get("region_base", "rest"),
                                                 label="Main prompt covers",
                                                 info="rest: only outside the regions. background: everywhere, "
                                                      "regions blended over it."))
            with gr.Column(scale=2, min_width=200):
                preview = gr.Image(label="Regions on the canvas", type="pil", format="png", interactive=False,
                                   height=260, buttons=[], elem_id="regions-preview")
                error = gr.Markdown(visible=False, elem_classes=["warning"], elem_id="regions-error")
    return SimpleNamespace(regions_preview=preview, regions_error=error)
