"""Presets: one JSON file per tier in presets/, keys = flat request field names.

The keys are checked against the schema (`pipelines.request.schema_fields`, through `from_flat`): an unknown key
is refused naming the file and the key, so a field added to the schema is a valid preset key with no other edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ValidationError
from pipelines.request.schema import GenerationRequest, from_flat

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
TIER_ORDER = ("draft", "fast", "balanced", "quality", "ultra")
META_KEYS = ("description", "label")


@dataclass(frozen=True)
class Preset:
    """A named set of request values with a one-line description of what it does."""

    name: str
    description: str
    values: dict[str, Any]

    def apply(self, base: GenerationRequest | None = None) -> GenerationRequest:
        """The request `base` with this preset's values laid over it."""
        return from_flat(self.values, base, source=f"preset {self.name}")


def load_preset(path: Path) -> Preset:
    """Read and check one preset file; unknown keys or bad JSON raise naming the file and key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"preset {Path(path).name}", str(exc)[:80], "must be a readable JSON object") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"preset {Path(path).name}", type(data).__name__, "must be a JSON object")
    values = {k: v for k, v in data.items() if k not in META_KEYS}
    preset = Preset(Path(path).stem, str(data.get("description", "")), values)
    preset.apply()  # unknown keys raise here, naming the file and the key
    return preset


def load_presets(folder: Path | None = None) -> dict[str, Preset]:
    """All presets in `folder`, tiers first in their order, then users' own alphabetically."""
    folder = Path(folder or PRESETS_DIR)
    found = {p.stem: load_preset(p) for p in sorted(folder.glob("*.json"))}
    order = [n for n in TIER_ORDER if n in found] + sorted(n for n in found if n not in TIER_ORDER)
    return {n: found[n] for n in order}
