"""Presets: one JSON file per tier in presets/, keys = flat request field names.

The keys are checked against the schema (`pipelines.request.schema_fields`, through `from_flat`): an unknown key
is refused naming the file and the key, so a field added to the schema is a valid preset key with no other edit.

Two optional sections adapt a tier to where it runs (`Preset.resolved`):
- "cpu": values (and a "description") laid over the tier when the device is a CPU: CPU-sensible sizes and steps;
- "few_step": {kind: values} for few-step LoRAs ("lcm", "turbo", "lightning", in order of preference): when a LoRA
  of that kind for the model's family is present in models/lora, the tier uses it with those values (first choice
  over the CPU values).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.errors import ValidationError
from pipelines.request.schema import GenerationRequest, from_flat

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
TIER_ORDER = ("draft", "fast", "balanced", "quality", "ultra")
META_KEYS = ("description", "label", "cpu", "few_step")
FEW_STEP_KINDS = ("lcm", "turbo", "lightning")


@dataclass(frozen=True)
class Preset:
    """A named set of request values with a one-line description of what it does."""

    name: str
    description: str
    values: dict[str, Any]
    cpu: dict[str, Any] = field(default_factory=dict)
    """Values laid over `values` on a CPU; its "description" replaces the tier's."""
    few_step: dict[str, dict[str, Any]] = field(default_factory=dict)
    """{LoRA kind: values} used with a present few-step LoRA of that kind."""

    def apply(self, base: GenerationRequest | None = None) -> GenerationRequest:
        """The request `base` with this preset's values laid over it."""
        return from_flat(self.values, base, source=f"preset {self.name}")

    def resolved(self, device_type: str = "cuda", loras: Iterable[str] = (), family: str | None = None) -> Preset:
        """This preset as it runs on `device_type` ("cpu", "cuda", ...) with the local LoRAs `loras` (names) for a
        model of `family` ("sd1", "sdxl", None = unknown, read as sd1): a few-step LoRA's values first, else the CPU
        tier on a CPU, else as written. The description says which."""
        lora = few_step_lora(loras, family, kinds=tuple(self.few_step))
        if lora is not None:
            kind, name = lora
            tier = self.resolved(device_type)  # the CPU sizes still hold
            values = {**tier.values, **self.few_step[kind], "loras": [f"{name}:1"]}
            note = f"{kind.upper()} LoRA {name} (few-step, present in models/lora): {self.few_step[kind].get('steps')} steps"
            return replace(self, description=f"{note}; {self.description}", values=values, cpu={}, few_step={})
        if device_type == "cpu" and self.cpu:
            values = {**self.values, **{k: v for k, v in self.cpu.items() if k != "description"}}
            description = f"CPU tier: {self.cpu.get('description', self.description)}"
            return replace(self, description=description, values=values, cpu={}, few_step={})
        return self


def few_step_lora(loras: Iterable[str], family: str | None, kinds: tuple[str, ...] = FEW_STEP_KINDS
                  ) -> tuple[str, str] | None:
    """(kind, name) of the first few-step LoRA among `loras` for `family`, kinds in `kinds`' order; an "xl" in the
    name marks an SDXL LoRA."""
    sdxl = family == "sdxl"
    names = sorted(set(loras))
    for kind in kinds:
        for name in names:
            if re.search(kind, name, re.I) and bool(re.search("xl", name, re.I)) == sdxl:
                return kind, name
    return None


def load_preset(path: Path) -> Preset:
    """Read and check one preset file; unknown keys or bad JSON raise naming the file and key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"preset {Path(path).name}", str(exc)[:80], "must be a readable JSON object") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"preset {Path(path).name}", type(data).__name__, "must be a JSON object")
    values = {k: v for k, v in data.items() if k not in META_KEYS}
    cpu, few = data.get("cpu", {}), data.get("few_step", {})
    if not isinstance(cpu, dict) or not isinstance(few, dict) or not all(isinstance(v, dict) for v in few.values()):
        raise ValidationError(f"preset {Path(path).name}", "cpu/few_step", "must be JSON objects of request values")
    unknown = sorted(set(few) - set(FEW_STEP_KINDS))
    if unknown:
        raise ValidationError(f"preset {Path(path).name}", unknown[0], f"few_step kinds are {', '.join(FEW_STEP_KINDS)}")
    preset = Preset(Path(path).stem, str(data.get("description", "")), values, cpu, few)
    preset.apply()  # unknown keys raise here, naming the file and the key
    for variant in (preset.resolved("cpu"), *(preset.resolved("cuda", [k]) for k in few)):
        variant.apply()  # ... and in the CPU and few-step sections
    return preset


def load_presets(folder: Path | None = None) -> dict[str, Preset]:
    """All presets in `folder`, tiers first in their order, then users' own alphabetically."""
    folder = Path(folder or PRESETS_DIR)
    found = {p.stem: load_preset(p) for p in sorted(folder.glob("*.json"))}
    order = [n for n in TIER_ORDER if n in found] + sorted(n for n in found if n not in TIER_ORDER)
    return {n: found[n] for n in order}


def local_loras(models_dir: str | Path) -> list[str]:
    """Names of the LoRAs in models_dir/lora (present offline)."""
    return sorted(p.stem for p in (Path(models_dir) / "lora").glob("*.safetensors"))


def preset_for(preset: Preset, manager: Any, model: str | None = None) -> Preset:
    """`preset` as it runs on `manager`'s device with its local LoRAs, for `model` (the family read from its name
    when it resolves; else unknown)."""
    family = None
    if model:
        try:
            family = manager.resolve(model).family
        except Exception:  # an unknown model is refused later, by the request's own check
            family = None
        if family is None and re.search("xl", model, re.I):
            family = "sdxl"
    return preset.resolved(manager.device_dtype[0].type, local_loras(manager.models_dir), family)
