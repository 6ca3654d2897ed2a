"""Request ControlNet units -> loop inputs: preprocess, pick and load the model, size the map to the stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from pipelines.control.images import load_control_image, prepare_control_image
from pipelines.control.models import load_controlnet
from pipelines.control.preprocessors import preprocess
from pipelines.denoise.loop import ControlInput
from pipelines.models.tiny import ensure_tiny_controlnet
from pipelines.request.schema import ControlUnit

if TYPE_CHECKING:
    from pipelines.models.caches import WeightCaches

TINY_CONTROLNET = "tiny-controlnet"


def default_model(unit: ControlUnit, model) -> str:
    """The ControlNet used when the unit names none: the tiny one for tiny models, else `<type>-<family>`."""
    if model.source.kind == "tiny":
        return TINY_CONTROLNET
    kind = "canny" if unit.type == "none" else unit.type
    return f"{kind}-{model.spec.controlnet_suffix}"


def _tiny_controlnet_dir(model) -> Path:
    return ensure_tiny_controlnet(model.source.ref)  # per tiny model (SD- or SDXL-shaped), rebuilt on TINY_VERSION


def control_map(unit: ControlUnit, models_dir: Path, caches: WeightCaches | None = None) -> Image.Image:
    """The preprocessed control map the user sees (canny edges, depth, ... or the image itself for 'none');
    an annotator is kept in `caches` (the manager's) when given."""
    image = load_control_image(unit.image)
    return preprocess(unit.type, image, low=unit.low, high=unit.high, annotators_dir=Path(models_dir) / "annotators",
                      cache=None if caches is None else caches.annotators)


def prepare_units(model, units, width: int, height: int, models_dir: Path,
                  caches: WeightCaches | None = None) -> tuple[ControlInput, ...]:
    """Each unit's model and control map at (width, height) pixels, ready for the denoising loop; ControlNets and
    annotators are kept in `caches` (the manager's) when given, else loaded for this call only."""
    out = []
    for unit in units:
        name = unit.model or default_model(unit, model)
        if name == TINY_CONTROLNET and model.source.kind == "tiny":
            spec = str(_tiny_controlnet_dir(model))
        else:
            spec = name
        cn = load_controlnet(spec, device=model.device, dtype=model.dtype, models_dir=Path(models_dir),
                             allow_paths=spec != name, cache=None if caches is None else caches.controlnets)
        image = prepare_control_image(control_map(unit, models_dir, caches), width, height)
        image = image.to(model.device, model.dtype)
        out.append(ControlInput(cn, image, unit.scale, unit.start, unit.end, unit.guess_mode))
    return tuple(out)


def tile_model_name(model, models_dir: Path) -> tuple[str, bool]:
    """(spec, allow_paths) of the tile ControlNet for `model`: tiny stand-in, a local tile*, or tile-sd15."""
    if model.source.kind == "tiny" and model.spec.tile_controlnet is not None:
        return str(_tiny_controlnet_dir(model)), True
    local = sorted(p.name for p in (Path(models_dir) / "controlnet").glob("*tile*"))
    if local:
        return local[0], False
    if model.spec.tile_controlnet is None:
        from pipelines.errors import ModelError

        raise ModelError(f"no {model.spec.label} tile ControlNet in the catalogue; put one in models/controlnet/ "
                         "(name with 'tile')")
    return model.spec.tile_controlnet, False
