"""The one place where widgets get names: a `Form` maps request field names to Gradio components.

Handlers never see positional lists. An event's inputs are a *set* of components, so Gradio hands the handler a
dict {component: value}; `Form.values` turns it into {field name: value} and `Form.updates` turns
{field name: value} back into {component: value} for the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import gradio as gr

from pipelines.request.fields import bounds, choices, is_optional, kind_of
from pipelines.request.schema import FlatField, GenerationRequest, schema_fields, unit_fields
from pipelines.serving.units import UI_CONTROL_UNITS, control_name

# Request fields a preset does not touch unless it names them: what the user is working on.
USER_FIELDS = frozenset({"prompt", "negative_prompt", "model", "width", "height", "seed", "batch_size", "strength",
                         "regions", "mask_blur", "masked_content", "inpaint_area", "inpaint_padding", "inpaint_size", "mask_mode",
                         "soft_inpainting", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"})


class Form:
    """Named components of one tab; names are the backend's flat request field names."""

    def __init__(self) -> None:
        self.by_name: dict[str, gr.components.Component] = {}
        self._names: dict[int, str] = {}

    def add(self, name: str, component: gr.components.Component) -> gr.components.Component:
        """Register `component` under `name` (unique) and return it, so builders can write x = form.add(...)."""
        if name in self.by_name:
            raise ValueError(f"form field {name!r} registered twice")
        self.by_name[name] = component
        self._names[component._id] = name
        return component

    def __getitem__(self, name: str) -> Any:  # Any: event listeners (.change, .input) exist per component class
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def names(self) -> list[str]:
        return list(self.by_name)

    def inputs(self, names: Iterable[str] | None = None) -> set[gr.blocks.Block]:
        """A set of components (Gradio's dict-input form) for `names` (default: all)."""
        return {self.by_name[n] for n in (self.by_name if names is None else names)}

    def components(self, names: Iterable[str] | None = None) -> list[gr.components.Component]:
        return [self.by_name[n] for n in (self.by_name if names is None else names)]

    def values(self, data: dict[Any, Any]) -> dict[str, Any]:
        """{component: value} from Gradio -> {name: value} for the components of this form in `data`."""
        return {self._names[c._id]: v for c, v in data.items() if getattr(c, "_id", None) in self._names}

    def updates(self, values: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """{name: backend value} -> {component: widget value}; names this form lacks are ignored."""
        return {self.by_name[n]: widget_value(self.by_name[n], v) for n, v in values.items() if n in self.by_name}

    def outputs(self, values: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """{name: value or gr.update} -> {component: same}, unconverted (for result widgets)."""
        return {self.by_name[n]: v for n, v in values.items()}


def widget_value(component: gr.components.Component, value: Any) -> Any:
    """A backend value as the widget shows it: LoRA tuples and numbers in text boxes as text, None as "", regions
    as the table's rows."""
    if isinstance(component, gr.Dataframe):
        from pipelines.request.regions import rows_from_regions

        return rows_from_regions(value or ()) or None
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if value is None and isinstance(component, gr.Textbox | gr.Dropdown):
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(component, gr.Textbox):
        return f"{value:g}"
    return value


def ui_fields() -> dict[str, FlatField]:
    """Every field a UI widget or API parameter is named by: the request's flat fields (images too), then each
    ControlNet unit's fields under `control_name`."""
    out = dict(schema_fields(GenerationRequest, images=True))
    for i in range(UI_CONTROL_UNITS):
        out.update({control_name(i, n): ff for n, ff in unit_fields().items()})
    return out


_UI_FIELDS = ui_fields()
_NUMBERS = {n: kind_of(ff.type, ff.spec) for n, ff in _UI_FIELDS.items() if kind_of(ff.type, ff.spec) in ("int", "float")}
INT_FIELDS = frozenset({"preview_every", *(n for n, k in _NUMBERS.items() if k == "int")})
# Numbers that may be left empty (= the preset's value or the planner's choice). They are text boxes, because
# gr.Number shows and sends an empty value as 0.
OPTIONAL_NUMBERS = frozenset(n for n in _NUMBERS if is_optional(_UI_FIELDS[n].type))


def _field(name: str, cls: type = GenerationRequest) -> FlatField:
    return _UI_FIELDS[name] if cls is GenerationRequest else schema_fields(cls, images=True)[name]


def ui_range(ff: FlatField) -> tuple[float, float]:
    """A number's widget range: the schema's `ui_range`, else its accepted range."""
    rng = ff.spec.ui_range or bounds(ff.spec)
    if rng is None:
        raise ValueError(f"{ff.name} has no range in the schema")
    return rng


def range_text(ff: FlatField) -> str:
    """"8-256 latent px" for a number's accepted range."""
    lo, hi = bounds(ff.spec) or (None, None)
    return f"{lo:g}-{hi:g}{' ' + ff.spec.unit if ff.spec.unit else ''}" if lo is not None else ""


def slider(name: str, value: Any, label: str, *, cls: type = GenerationRequest, **kw: Any) -> gr.Slider:
    """A number field as a slider: range, step and info from the schema (`info=` overrides the help)."""
    ff = _field(name, cls)
    lo, hi = ui_range(ff)
    kw.setdefault("info", ff.spec.help)
    return gr.Slider(lo, hi, value=value, step=ff.spec.step or 1, label=label, **kw)


def choice(name: str, value: Any, label: str, *, widget: type = gr.Radio, **kw: Any) -> gr.components.Component:
    """A Literal field as a radio (or `widget`): its choices and info from the schema."""
    ff = _field(name)
    kw.setdefault("info", ff.spec.help)
    return widget(list(cast("tuple[Any, ...]", choices(ff.type))), value=value, label=label, **kw)


def checkbox(name: str, value: Any, label: str, **kw: Any) -> gr.Checkbox:
    """A bool field as a checkbox, its info from the schema."""
    kw.setdefault("info", _field(name).spec.help)
    return gr.Checkbox(value=bool(value), label=label, **kw)


def number_box(name: str, value: Any, label: str, *, cls: type = GenerationRequest, **kw: Any) -> gr.Number:
    """A whole number as a number box: minimum, maximum and step from the schema."""
    ff = _field(name, cls)
    lo, hi = ui_range(ff)
    kw.setdefault("info", ff.spec.help)
    return gr.Number(value=value, precision=0, minimum=lo, maximum=hi, step=ff.spec.step or 1, label=label, **kw)


def optional_field(name: str, value: Any, label: str, placeholder: str, **kw: Any) -> gr.Textbox:
    """An optional number (see OPTIONAL_NUMBERS): its accepted range and help from the schema as the info."""
    ff = _field(name)
    return optional_number(value, label, placeholder, f"{range_text(ff)}. {ff.spec.help}", **kw)


def field_info(name: str, cls: type = GenerationRequest) -> str:
    """A field's help sentence (the info line of widgets built without a helper)."""
    return _field(name, cls).spec.help


def request_value(name: str, value: Any) -> Any:
    """A widget value as the backend wants it: "" -> None (= preset/default), LoRA text -> tuple, number text -> number.

    Text that is not a number is passed on unchanged, so the backend's validation names the field and the value.
    """
    if name == "loras":
        items = tuple(s.strip() for s in (value or "").split(",") if s.strip()) if isinstance(value, str) else value
        return items or None
    if name == "regions" and isinstance(value, list):  # the Regions table's rows (the API sends JSON text)
        from pipelines.request.regions import regions_from_rows

        return regions_from_rows(value) or None
    if isinstance(value, str) and not value.strip() and name not in ("prompt", "negative_prompt"):
        return None
    if isinstance(value, str) and name in OPTIONAL_NUMBERS:
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer() and name in INT_FIELDS:
        return int(value)
    return value


def knob_values(defaults: dict[str, Any], preset: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """What a preset sets in the form: each request knob's default, then the preset's values.

    Only flat request fields (keys of `defaults`) are reset; the user's own fields (prompt, size, seed, ...) change
    only when the preset names them, and images and ControlNet settings are never touched.
    """
    names = set(names)
    out = {n: defaults[n] for n in names if n in defaults and n not in USER_FIELDS}
    out.update({n: v for n, v in preset.items() if n in names})
    return out


def optional_number(value: Any, label: str, placeholder: str, info: str | None = None, **kw: Any) -> gr.Textbox:
    """A number that may stay empty (see OPTIONAL_NUMBERS)."""
    return gr.Textbox(value="" if value is None else f"{value:g}", label=label, placeholder=placeholder, info=info,
                      max_lines=1, elem_classes=["optional-number"], **kw)


def hint(text: str, **kw: Any) -> gr.Markdown:
    """A small grey line of help under a group of widgets."""
    return gr.Markdown(text, elem_classes=["hint"], **kw)
