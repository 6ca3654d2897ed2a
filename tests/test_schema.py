"""One schema for request fields (issue 17): the UI's widgets, the CLI's options, the API's parameters and the
validation all come from the field declarations in pipelines/request.py; a field added there appears everywhere."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import gradio as gr
import pytest
from gradio.data_classes import FileData
from PIL import Image

import cli
from pipelines.errors import ValidationError
from pipelines.request.fields import bounds, choices, is_optional, kind_of, python_type, spec
from pipelines.request.schema import (
    ControlUnit,
    GenerationRequest,
    UpscaleRequest,
    from_flat,
    schema_fields,
    unit_fields,
)
from pipelines.request.validation import validate
from tests.test_ui import FakeBackend
from ui import api
from ui.components import range_text, ui_fields, ui_range

# Widgets whose info line says something UI-specific instead of (or besides) the field's help sentence, or that
# have none: uploads, the prompt boxes (an example as placeholder), the regions table (help under it).
OWN_INFO = {"hires_upscaler", "init_image", "mask", "control_image", "control2_image", "control3_image", "prompt",
            "negative_prompt", "regions", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"}
# Fields the CLI sets through options of their own (cli="" in the schema) -> that option.
OWN_OPTIONS = {"loras": "--lora", "regions": "--region", "outpaint_left": "--outpaint", "outpaint_right": "--outpaint",
               "outpaint_top": "--outpaint", "outpaint_bottom": "--outpaint"}


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The Generate tab's and the Upscale tab's forms, built against a fake backend."""
    from ui.generate_tab import build_generate_tab
    from ui.upscale_tab import build_upscale_tab

    backend = FakeBackend(tmp_path_factory.mktemp("out"))
    with gr.Blocks():
        tab = build_generate_tab(backend, backend.choices())
        upscale, _, _ = build_upscale_tab(backend.choices())
    return tab.form, upscale


def _options(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {opt: a for a in sub._actions for opt in a.option_strings}


def _flag(ff) -> str:
    return "--" + (ff.spec.cli or ff.name).replace("_", "-")


def _api_type(ff):
    kind = kind_of(ff.type, ff.spec)
    return FileData if kind == "image" else str if kind in ("loras", "regions") else python_type(ff.type, ff.spec)


def _check_widget(name: str, widget, ff) -> None:
    """The widget's choices, range, step and info are the schema's."""
    kind = kind_of(ff.type, ff.spec)
    if kind == "choice":
        assert [value for _, value in widget.choices] == list(choices(ff.type)), name
    elif kind == "bool":
        assert isinstance(widget, gr.Checkbox), name
    elif kind in ("int", "float"):
        if is_optional(ff.type):  # an empty-able text box: the accepted range is in its info
            assert isinstance(widget, gr.Textbox) and range_text(ff) in widget.info, name
        else:
            assert isinstance(widget, gr.Slider | gr.Number), name
            assert (widget.minimum, widget.maximum) == ui_range(ff), name
            assert widget.step == (ff.spec.step or 1), name
            lo, hi = bounds(ff.spec)
            assert lo <= widget.minimum <= widget.maximum <= hi, name  # the UI never offers what validation refuses
    if name not in OWN_INFO:
        assert ff.spec.help and ff.spec.help in (widget.info or ""), name


def test_every_request_field_has_its_widget_from_the_schema(forms):
    generate, _ = forms
    fields = ui_fields()
    assert len(fields) > 60
    for name, ff in fields.items():  # every flat field (images too) and every ControlNet unit's fields
        assert name in generate, f"{name} has no widget"
        _check_widget(name, generate[name], ff)


def test_upscale_tab_widgets_come_from_the_upscale_request(forms):
    _, upscale = forms
    for name, ff in schema_fields(UpscaleRequest, images=True).items():
        if not ff.spec.api:
            continue
        assert name in upscale, name
        if name not in ("image", "upscaler", "model", "prompt", "negative_prompt"):
            _check_widget(name, upscale[name], ff)
        if name in ("scale", "denoise", "steps", "seed"):
            assert upscale[name].value == ff.field.default  # the request's default, not a copy


def test_every_request_field_has_its_cli_option_from_the_schema():
    options = _options(cli.build_parser(), "generate")
    for name, ff in schema_fields(GenerationRequest, images=True).items():
        if ff.spec.cli == "":
            assert OWN_OPTIONS[name] in options, name
            continue
        action = options[_flag(ff)]
        kind = kind_of(ff.type, ff.spec)
        if kind == "bool":
            assert isinstance(action, argparse._StoreTrueAction) and action.default is None, name
        else:
            assert (list(action.choices) if action.choices else None) == (list(choices(ff.type)) if kind == "choice" else None), name
            assert action.type == (None if kind == "image" else python_type(ff.type, ff.spec)), name
        assert action.help.startswith(ff.spec.help.replace("%", "%%")), name
        if kind in ("int", "float") and ff.spec.range:
            lo, hi = bounds(ff.spec)
            assert f"From {lo:g} to {hi:g}" in action.help or f"From {int(lo)} to {int(hi)}" in action.help, name


def test_upscale_command_options_come_from_the_upscale_request():
    options = _options(cli.build_parser(), "upscale")
    assert options["--image"].required
    for name, ff in schema_fields(UpscaleRequest).items():
        if ff.spec.cli == "":
            continue
        action = options[_flag(ff)]
        assert action.default is None, name  # no copied defaults: UpscaleRequest's apply
        assert action.type == python_type(ff.type, ff.spec) and action.help.startswith(ff.spec.help), name


def test_every_request_field_has_its_api_parameter_from_the_schema():
    expected = {name: ff for name, ff in ui_fields().items() if ff.spec.api}
    assert set(api.GENERATE_PARAMS) == {*expected, "preset"}
    for name, ff in expected.items():
        assert api.GENERATE_PARAMS[name] is _api_type(ff), name
        assert api.GENERATE_HELP[name] == ff.spec.help, name
    generate = api.make_generate(gpu=None)
    assert list(inspect.signature(generate).parameters) == list(api.GENERATE_PARAMS)
    assert all(f"    {n}: {api.GENERATE_HELP[n]}" in generate.__doc__ for n in expected)
    upscale = inspect.signature(api.make_upscale(gpu=None)).parameters
    assert list(upscale) == [n for n, ff in schema_fields(UpscaleRequest, images=True).items() if ff.spec.api]
    assert upscale["image"].default is inspect.Parameter.empty and upscale["scale"].default is None


def _too_big(ff) -> float:
    lo, hi = bounds(ff.spec)
    return hi + (ff.spec.multiple_of or 1)


def test_validation_uses_the_schema_ranges_and_choices():
    for name, ff in schema_fields(GenerationRequest).items():
        kind = kind_of(ff.type, ff.spec)
        if kind in ("int", "float") and ff.spec.range:
            bad = _too_big(ff)
        elif kind == "choice":
            bad = "no-such-choice"
        elif kind == "bool":
            bad = "yes"
        else:
            continue
        with pytest.raises(ValidationError) as err:
            validate(from_flat({name: bad}))
        assert err.value.field == name, (name, err.value)
    for name, ff in unit_fields().items():
        if ff.spec.range:
            unit = ControlUnit(image=Image.new("RGB", (8, 8)), **{name: _too_big(ff)})
            with pytest.raises(ValidationError, match=rf"`control\[0\]\.{name}` must be between"):
                validate(GenerationRequest(control=(unit,)))


def test_one_tile_size_range_and_one_canny_range_everywhere(forms):
    from pipelines.control.preprocessors import preprocess

    generate, _ = forms
    tile = schema_fields()["tile_size"]
    assert bounds(tile.spec) == (8, 256)
    assert validate(from_flat({"tile_size": 8, "tile_overlap": 2})).tiling.size == 8
    for bad in (7, 257):
        with pytest.raises(ValidationError, match="`tile_size` must be between 8 and 256"):
            validate(from_flat({"tile_size": bad}))
    assert generate["tile_size"].info.startswith("8-256 latent px")
    assert "From 8 to 256 latent px" in _options(cli.build_parser(), "generate")["--tile-size"].help
    # Canny: A1111's 1-255 sliders, the request's check and the preprocessor's agree
    assert (generate["control_low"].minimum, generate["control2_high"].maximum) == (1, 255)
    image = Image.new("RGB", (16, 16), "white")
    for low, high in ((0, 200), (100, 256)):
        with pytest.raises(ValidationError, match="between 1 and 255"):
            validate(GenerationRequest(control=(ControlUnit(image=image, low=low, high=high),)))
        with pytest.raises(ValidationError, match="between 1 and 255"):
            preprocess("canny", image, low=low, high=high)
    assert preprocess("canny", image, low=1, high=255).size == (16, 16)


def test_hires_negative_prompt_reaches_cli_request_and_metadata():
    """The API had hires_negative_prompt and the CLI had not; the CLI option now comes from the field."""
    from pipelines.metadata import infotext, request_from_infotext

    args = cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--hires-scale", "2",
                                          "--hires-negative-prompt", "blurry, text"])
    req = validate(cli._request(args))
    assert req.hires.negative_prompt == "blurry, text"
    assert "hires_negative_prompt" in api.GENERATE_PARAMS
    text = infotext(req, seed=1, model_hash="")
    assert 'Hires negative prompt: "blurry, text"' in text
    assert request_from_infotext(text).hires.negative_prompt == "blurry, text"


def test_a_field_added_to_the_schema_appears_in_cli_api_validation_and_presets(monkeypatch):
    """Add a field in one place: a request class with one more declared field gets its CLI option, its API
    parameter, its range check and its preset key with no other edit."""
    extended = dataclasses.make_dataclass(
        "GenerationRequest", [("grain", int, spec(3, "Film grain strength.", range=(0, 9), step=1))],
        bases=(GenerationRequest,), frozen=True)
    monkeypatch.setattr(cli, "GenerationRequest", extended)
    monkeypatch.setattr(api, "GenerationRequest", extended)

    action = _options(cli.build_parser(), "generate")["--grain"]
    assert action.type is int and action.help.startswith("Film grain strength. From 0 to 9. Default: 3.")
    req = cli._request(cli.build_parser().parse_args(["generate", "--grain", "5"]))
    assert isinstance(req, extended) and req.grain == 5
    assert api._generate_fields()["grain"] == (int, "Film grain strength.")
    with pytest.raises(ValidationError, match="`grain` must be between 0 and 9"):
        validate(from_flat({"grain": 12}, extended()))
    assert validate(from_flat({"grain": "7"}, extended(), source="preset x")).grain == 7
    with pytest.raises(ValidationError, match="not a known setting in preset x"):
        from_flat({"grian": 1}, extended(), source="preset x")


def test_control_model_error_names_the_option_and_lists_tiny(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    code = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--control", f"canny:{tmp_path / 'edges.png'}",
                     "--control-model", "tiny", "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: `--control-model` must be one of tiny-controlnet") and "got 'tiny'" in err
