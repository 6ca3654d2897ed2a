"""Tessera's engine: everything that touches weights and tensors (no Gradio here).

Layout (docs/ARCHITECTURE.md has the whole map):

- top level: `request` (what a job asks for), `errors`, `metadata`, `presets`, `planner` (+ `request_plan`), `engine`
  (+ `job`, `outputs`, `stage_cache`, `process`), `factory` (ModelManager + Engine for app.py and cli.py);
- `hires/`: the two-stage flow (draft -> upscale -> refine) and the refine's settings;
- `vae/`: encode/decode, the exact tiled VAE and its streamed stages;
- `prompts/`: the A1111 prompt parser, encoding, AND, embeddings;
- `control/`: control images, preprocessors, ControlNet models, per-job units;
- `models/`: the model manager (the one owner of weights), tiny test models, upscalers, size estimates;
- `denoise/`: the denoising loop, guidance, schedulers, regions, feature caching;
- `edit/`: inpainting and outpainting;
- `serving/`: the backend interface, the worker pool, multi-device tiles and the Ray Serve cluster.

Modules that moved into a subpackage keep their old flat name (``pipelines.vae_io``...) as an alias of
the same module object, so old imports and ``monkeypatch`` targets keep working; see `MOVED`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED: dict[str, str] = {
    "vae_io": "vae.io", "vae_tiling": "vae.tiling", "vae_stages": "vae.stages", "vae_stream": "vae.stream",
    "prompt_encoding": "prompts.encoding", "composable": "prompts.composable", "embeddings": "prompts.embeddings",
    "control_units": "control.units",
    "tiny": "models.tiny", "upscale": "models.upscalers", "model_sizes": "models.sizes",
    "sampling": "denoise.loop", "guidance": "denoise.guidance", "schedulers": "denoise.schedulers",
    "feature_cache": "denoise.feature_cache", "unet_split": "denoise.unet_split", "regions": "denoise.regions",
    "region_spec": "denoise.region_spec", "stages": "denoise.stages",
    "inpaint": "edit.inpaint", "inpaint_run": "edit.run",
    "service": "serving.service", "workers": "serving.workers", "cluster": "serving.cluster",
    "multi_device": "serving.multi_device",
}
"""Old flat module name -> its place now. (`prompts`, `models` and `control` became packages that
re-export what the old module offered.)"""


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``pipelines.<old>`` as the very module object at its new place (lazily, on first import)."""

    def find_spec(self, fullname, path, target=None):
        prefix, _, leaf = fullname.rpartition(".")
        if prefix != __name__ or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system overwrites __spec__; put it back below
        return module

    def exec_module(self, module):
        alias_spec = module.__spec__
        module.__spec__ = alias_spec.loader_state


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())
