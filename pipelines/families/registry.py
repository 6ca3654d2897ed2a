"""Every model family Tessera knows, in the order a model is recognised (the most specific first)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.errors import ModelError, ValidationError
from pipelines.families import sd1, sd2, sdxl
from pipelines.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (sdxl.FAMILY, sd2.FAMILY, sd1.FAMILY)}
"""Family id -> family; a new family module adds its `FAMILY` here (before the ones it would also match)."""


def register(family: Family) -> None:
    """Add (or replace) a family, recognised before the built-in ones (a plug-in or a test's family)."""
    rest = {k: v for k, v in FAMILIES.items() if k != family.name}
    FAMILIES.clear()
    FAMILIES.update({family.name: family, **rest})


def family(name: str) -> Family:
    """The family with this id."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValidationError("family", name, f"must be one of {', '.join(FAMILIES)}") from None


def family_of_checkpoint(keys: Iterable[str], file_name: str) -> Family:
    """The family of an original-format checkpoint, from its tensor names."""
    keys = list(keys)
    for f in FAMILIES.values():
        if f.matches_checkpoint(keys):
            return f
    raise ModelError(f"{file_name} is not a Stable Diffusion checkpoint (no UNet weights found)")


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline (SD 1.x when nothing more specific matches)."""
    return next((f for f in FAMILIES.values() if f.matches_pipeline(pipe)), sd1.FAMILY)
