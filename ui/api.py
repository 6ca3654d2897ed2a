"""Named API endpoints (`gr.api`): /generate and /upscale, called by parameter name from gradio_client.

Parameters are the request's flat field names; None (the default) means "the preset's value, else the default".
Both return the saved PNG files (with their `parameters` metadata) and the parameters texts, and both run in the
same "gpu" queue as the UI.

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    files, texts = client.predict(prompt="a fox", preset="fast", width=768, api_name="/generate")
    file, text = client.predict(image=handle_file("fox.png"), scale=2, api_name="/upscale")
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from pipelines.request import UI_CONTROL_UNITS, control_name
from ui.components import request_value
from ui.runner import GpuCalls, Stream, deliver, is_done, progress_text, result_files, stream_events
from ui.uploads import open_upload

GPU: dict[str, Any] = {"concurrency_id": "gpu", "concurrency_limit": 1}
IMAGE_PARAMS = ("init_image", "mask", *(control_name(i, "image") for i in range(UI_CONTROL_UNITS)))

# /generate's parameters, in order: name -> type (every one optional).
GENERATE_PARAMS: dict[str, Any] = {
    "prompt": str, "negative_prompt": str, "preset": str, "model": str, "width": int, "height": int,
    "steps": int, "cfg": str, "sampler": str, "seed": int, "batch_size": int, "loras": str,
    "vae_decode": str, "emphasis": str, "clip_skip": int, "prompt_timeline": str,
    "feature_cache": str, "feature_cache_interval": int, "feature_cache_branch": int, "feature_cache_schedule": str,
    "hires_scale": float, "hires_upscaler": str, "hires_denoise": float, "hires_steps": int, "hires_sampler": str,
    "hires_prompt": str, "hires_negative_prompt": str, "hires_cfg": str, "hires_control_tile": float,
    "tile_mode": str, "tile_size": int, "tile_overlap": int, "tile_blend": str, "tile_batch": int,
    "tile_shift": bool, "vae_tiling": str, "vae_tile_size": int, "vae_tile_mode": str,
    "memory_budget_gb": float,
    "regions": str, "region_base": str,
    "init_image": FileData, "strength": float,
    # inpainting (with init_image and/or outpaint_*): the mask file and A1111's options
    "mask": FileData, "mask_blur": int, "masked_content": str, "inpaint_area": str, "inpaint_padding": int,
    "inpaint_size": int, "mask_mode": str, "soft_inpainting": bool, "outpaint_left": int, "outpaint_right": int,
    "outpaint_top": int, "outpaint_bottom": int,
    # ControlNet units: control_image, control_type, ... for the first; control2_image, ... for the next ones
    **{control_name(i, field): kind for i in range(UI_CONTROL_UNITS) for field, kind in (
        ("image", FileData), ("type", str), ("model", str), ("scale", float), ("start", float), ("end", float),
        ("low", int), ("high", int), ("guess_mode", bool))},
}

GENERATE_DOC = ("Generate images. Every parameter is optional: None uses the preset's value, else the default. "
                "cfg is a schedule text (7, linear(4,9), interval(7.5,0.2,0.8), ...); loras is 'name:weight, ...'. "
                "regions is JSON text: [{\"x\":0,\"y\":0,\"w\":0.5,\"h\":1,\"prompt\":\"a cat\"}, ...] with "
                "optional negative_prompt, weight, feather (px) and seed; fractions when x, y, w, h are all <= 1, "
                "else pixels. "
                "Returns (PNG files, their parameters texts); before that, each step sends ([], ['Step 3/20 · ...']) "
                "to a client that submits a job, and cancelling the job stops the run within a step.")


def file_data(path: str) -> dict[str, Any]:
    """A returned file as Gradio's FileData dict, which gradio_client downloads."""
    return FileData(path=path, orig_name=Path(path).name, mime_type="image/png").model_dump()


def make_generate(gpu: GpuCalls):
    """The /generate function, its signature built from GENERATE_PARAMS so clients call it by name."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=t | None)
              for n, t in GENERATE_PARAMS.items()]
    returns = tuple[list[FileData], list[str]]
    signature = inspect.Signature(params, return_annotation=returns)

    async def generate(*args: Any, **kwargs: Any) -> AsyncIterator[tuple[list[dict], list[str]]]:  # `returns`
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {n: request_value(n, v) for n, v in bound.arguments.items()}
        for name in IMAGE_PARAMS:
            values[name] = open_upload(values[name], name)
        values["preview_every"] = 0
        async for event in deliver(_progress_then_done(gpu.generate, values, "Generation")):
            yield ([], [progress_text(event)]) if not is_done(event) else ([file_data(p) for p in result_files(event)],
                                                                list(event.infotexts))

    generate.__signature__ = signature  # type: ignore[attr-defined]
    generate.__annotations__ = {**{p.name: p.annotation for p in params}, "return": returns}
    generate.__doc__ = GENERATE_DOC
    return generate


def make_upscale(gpu: GpuCalls):
    """The /upscale function."""

    async def upscale(image: FileData, upscaler: str | None = None, scale: float | None = None,
                      denoise: float | None = None, prompt: str | None = None, negative_prompt: str | None = None,
                      model: str | None = None, steps: int | None = None, seed: int | None = None
                      ) -> tuple[FileData | None, str]:  # a generator: Gradio reads the outputs from this annotation
        """Upscale an image (lanczos or an upscaler model), refining it with img2img when denoise > 0.
        Returns (the PNG file, its parameters text); while refining, (None, "Step 3/10 · ...") progress updates."""
        values = {"image": open_upload(image, "image"), "upscaler": upscaler, "scale": scale, "denoise": denoise,
                  "prompt": prompt, "negative_prompt": negative_prompt, "model": model, "steps": steps, "seed": seed}
        if values["image"] is None:
            raise gr.Error("`image` is required: send an image file", print_exception=False)
        async for event in deliver(_progress_then_done(gpu.upscale, values, "Upscaling")):
            yield (None, progress_text(event)) if not is_done(event) else (file_data(result_files(event)[0]),
                                                                event.infotexts[0] if event.infotexts else "")

    return upscale


def _progress_then_done(stream: Stream, values: dict[str, Any], action: str) -> Iterator[Any]:
    """Each Progress, then the Done. Gradio closes this generator when the client cancels its job, which stops the
    backend within a step (`ui.runner.stream_events`) unless its steps are done (`ui.runner.deliver`)."""
    for event in stream_events(stream, values, action):
        yield event
        if is_done(event):
            return
    raise gr.Error(f"{action} was stopped before it finished", print_exception=False)


def add_api(gpu: GpuCalls) -> None:
    """Register /generate and /upscale (inside an open gr.Blocks)."""
    gr.api(make_generate(gpu), api_name="generate", api_description=GENERATE_DOC, **GPU)
    gr.api(make_upscale(gpu), api_name="upscale", **GPU)
