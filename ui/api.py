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

from pipelines.request.fields import kind_of, python_type
from pipelines.request.schema import FlatField, GenerationRequest, UpscaleRequest, schema_fields, unit_fields
from pipelines.serving.units import UI_CONTROL_UNITS, control_name
from ui.components import request_value
from ui.runner import GpuCalls, RunControl, Stream, deliver, is_done, progress_text, result_files, stream_events
from ui.uploads import open_upload

GPU: dict[str, Any] = {"concurrency_id": "gpu", "concurrency_limit": 1}
IMAGE_PARAMS = ("init_image", "mask", *(control_name(i, "image") for i in range(UI_CONTROL_UNITS)))



def _api_type(ff: FlatField) -> Any:
    """A field's API type: uploads are files, LoRAs and regions text, the rest their Python type."""
    kind = kind_of(ff.type, ff.spec)
    return FileData if kind == "image" else str if kind in ("loras", "regions") else python_type(ff.type, ff.spec)


_AFTER_REGIONS = ("init_image", "strength")
"""img2img's parameters stand after the regions, where /generate had them before the schema: clients that pass
arguments by position keep working."""


def _generate_fields() -> dict[str, tuple[Any, str]]:
    """/generate's parameters from the schema, in order: name -> (type, description). The request's fields (the
    images as files), `preset` after the prompts, then each ControlNet unit's fields (`control_name`)."""
    out: dict[str, tuple[Any, str]] = {}
    request = schema_fields(GenerationRequest, images=True)
    late = {n: request.pop(n) for n in _AFTER_REGIONS}
    for name, ff in request.items():
        if ff.spec.api:
            out[name] = (_api_type(ff), ff.spec.help)
        if name == "negative_prompt":
            out["preset"] = (str, "A preset from presets/ (draft, fast, balanced, quality, ultra, or your own).")
        if name == "region_base":
            out.update({n: (_api_type(f), f.spec.help) for n, f in late.items() if f.spec.api})
    units = unit_fields()
    for i in range(UI_CONTROL_UNITS):
        out.update({control_name(i, n): (_api_type(ff), ff.spec.help) for n, ff in units.items() if ff.spec.api})
    return out


_GENERATE = _generate_fields()
# /generate's parameters, in order: name -> type (every one optional); GENERATE_HELP: name -> description.
GENERATE_PARAMS: dict[str, Any] = {name: kind for name, (kind, _) in _GENERATE.items()}
GENERATE_HELP: dict[str, str] = {name: text for name, (_, text) in _GENERATE.items()}
UPSCALE_PARAMS: dict[str, Any] = {n: _api_type(ff) for n, ff in schema_fields(UpscaleRequest, images=True).items()
                                  if ff.spec.api}

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
        control = RunControl()
        async for event in deliver(_progress_then_done(gpu.generate, values, "Generation", control), control):
            yield ([], [progress_text(event)]) if not is_done(event) else ([file_data(p) for p in result_files(event)],
                                                                list(event.infotexts))

    generate.__signature__ = signature  # type: ignore[attr-defined]
    generate.__annotations__ = {**{p.name: p.annotation for p in params}, "return": returns}
    generate.__doc__ = GENERATE_DOC + "\n\nParameters:\n" + "\n".join(f"    {n}: {t}" for n, t in GENERATE_HELP.items())
    return generate


UPSCALE_DOC = ("Upscale an image (lanczos or an upscaler model), refining it with img2img when denoise > 0. "
               "Returns (the PNG file, its parameters text); while refining, (None, \"Step 3/10 · ...\") progress "
               "updates.")


def make_upscale(gpu: GpuCalls):
    """The /upscale function, its signature built from UPSCALE_PARAMS (`image` required, the rest optional)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) if n == "image" else
              inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=t | None)
              for n, t in UPSCALE_PARAMS.items()]
    returns = tuple[FileData | None, str]  # a generator: Gradio reads the outputs from this annotation
    signature = inspect.Signature(params, return_annotation=returns)
    helps = {n: ff.spec.help for n, ff in schema_fields(UpscaleRequest, images=True).items()}

    async def upscale(*args: Any, **kwargs: Any) -> AsyncIterator[tuple[dict | None, str]]:  # `returns`
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values["image"] = open_upload(values["image"], "image")
        if values["image"] is None:
            raise gr.Error("`image` is required: send an image file", print_exception=False)
        control = RunControl()
        async for event in deliver(_progress_then_done(gpu.upscale, values, "Upscaling", control), control):
            yield (None, progress_text(event)) if not is_done(event) else (file_data(result_files(event)[0]),
                                                                event.infotexts[0] if event.infotexts else "")

    upscale.__signature__ = signature  # type: ignore[attr-defined]
    upscale.__annotations__ = {**{p.name: p.annotation for p in params}, "return": returns}
    upscale.__doc__ = UPSCALE_DOC + "\n\nParameters:\n" + "\n".join(f"    {n}: {helps[n]}" for n in UPSCALE_PARAMS)
    return upscale


def _progress_then_done(stream: Stream, values: dict[str, Any], action: str,
                        control: RunControl | None = None) -> Iterator[Any]:
    """Each Progress, then the Done. A client that cancels its job stops the backend's stream through `control`
    at once, one that goes away closes this generator; either stops the run within a step unless its steps are
    done (`ui.runner.deliver`)."""
    for event in stream_events(stream, values, action, control):
        yield event
        if is_done(event):
            return
    raise gr.Error(f"{action} was stopped before it finished", print_exception=False)


def add_api(gpu: GpuCalls) -> None:
    """Register /generate and /upscale (inside an open gr.Blocks)."""
    gr.api(make_generate(gpu), api_name="generate", api_description=GENERATE_DOC, **GPU)
    gr.api(make_upscale(gpu), api_name="upscale", **GPU)
