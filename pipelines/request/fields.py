"""The schema of request fields: each field's type, range, unit and help declared once, next to the field.

A field is declared with `spec(default, help, ...)`: a `dataclasses.field` whose metadata holds a `FieldSpec`.
Its annotation gives the type; choices are a `Literal[...]` read back with `get_args` (as `denoise/guidance.py`
does with `Kind`). Validation (`pipelines.request.validation`), the UI's widgets (`ui.components`), the CLI's options
(`cli.py`), the API's parameters (`ui.api`), preset keys and infotext keys (`pipelines.metadata`) are all
derived from these declarations, so a new field is added in one place (docs/ARCHITECTURE.md, "How to add a field").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pipelines.request.limits import Limits

Kind = Literal["choice", "bool", "int", "float", "text", "name", "cfg", "loras", "regions", "image", "units"]


@dataclass(frozen=True)
class FieldSpec:
    """How one field is checked, shown and named; every attribute but `help` is optional."""

    help: str
    """One sentence for the UI's info line, the CLI's --help and the API's description."""
    range: tuple[float | str, float | str] | None = None
    """Inclusive (low, high) of a number; a str names a `Limits` attribute (e.g. "max_steps")."""
    step: float | None = None
    """Granularity of a number (a slider's step); 8 for sizes that must be multiples of 8."""
    unit: str = ""
    """Unit of a number: "px", "latent px", "steps", "GB", ... (shown in help texts)."""
    multiple_of: int | None = None
    """A whole number that must be a multiple of this (sizes: 8)."""
    kind: str | None = None
    """Check for str fields: text (prompts), name (looked up in a table or on disk), cfg (a guidance schedule);
    None = derived from the annotation (Literal -> choice, bool, int, float)."""
    what: str = ""
    """For names: what the value must be, as the error's fix says it ("a sampler name")."""
    cli: str | None = None
    """The CLI flag without "--" when it is not the flat name with "-"; "" = no generic CLI option."""
    api: bool = True
    """Whether the /generate API has the parameter."""
    infotext: str | None = None
    """The A1111 infotext key that records the field, when there is one."""
    ui_range: tuple[float, float] | None = None
    """A slider's (low, high) when narrower than the accepted `range` (e.g. sizes up to 4096 in the UI)."""


def spec(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its `FieldSpec` (`default` may be a zero-argument factory via `factory=`)."""
    factory = kw.pop("factory", None)
    meta = {"spec": FieldSpec(help=help, **kw)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec_of(f: dataclasses.Field) -> FieldSpec:
    """The FieldSpec of a dataclass field (a bare FieldSpec with an empty help when it has none)."""
    return f.metadata.get("spec") or FieldSpec(help="")


def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def is_optional(tp: Any) -> bool:
    """Whether `tp` is `X | None`."""
    return _is_union(tp) and type(None) in get_args(tp)


def base_type(tp: Any) -> Any:
    """`X` of `X | None`; other types unchanged."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` (or `Literal[...] | None`); None for other types."""
    tp = base_type(tp)
    return get_args(tp) if get_origin(tp) is Literal else None


def kind_of(tp: Any, fs: FieldSpec) -> str:
    """The check a field gets: its spec's `kind`, else choice / bool / int / float from the annotation."""
    if fs.kind:
        return fs.kind
    if choices(tp) is not None:
        return "choice"
    base = base_type(tp)
    for py, name in ((bool, "bool"), (int, "int"), (float, "float")):
        if base is py:
            return name
    return "text"


def python_type(tp: Any, fs: FieldSpec) -> type:
    """The plain Python type of a field's values (str for choices and texts), for argparse and the API."""
    kind = kind_of(tp, fs)
    return {"bool": bool, "int": int, "float": float}.get(kind, str)


def bounds(fs: FieldSpec, limits: Any = None) -> tuple[float, float] | None:
    """A spec's range with a named high resolved against `limits` (a `Limits`; None = the defaults)."""
    if fs.range is None:
        return None
    if limits is None:
        limits = Limits()
    lo, hi = (getattr(limits, x) if isinstance(x, str) else x for x in fs.range)
    return lo, hi


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)
