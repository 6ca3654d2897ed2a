"""Once per process, before the first run: the libraries' lazy classes imported, the heap tuned. No weights, no
device probing (Hugging Face Spaces imports app.py)."""

from __future__ import annotations

from pipelines.heap import tune_heap


def preload_libraries() -> None:
    """Import diffusers' and transformers' lazily-loaded classes once, up front.

    Their lazy modules are not thread-safe: a first import racing in two threads (a generation worker and a UI
    callback) can fail with "cannot import name 'DiffusionPipeline'". No weights, no device probing.
    """
    import diffusers
    import transformers

    from pipelines.denoise.schedulers import SAMPLERS

    names = ["DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "AutoencoderKL",
             "AutoencoderTiny", "ControlNetModel", "UNet2DConditionModel", *{c for c, _ in SAMPLERS.values()}]
    for name in names:
        getattr(diffusers, name)
    for name in ("CLIPTokenizer", "CLIPTextModel", "CLIPTextModelWithProjection"):
        getattr(transformers, name)


def prepare_process() -> None:
    """What an Engine needs of the process: the lazy imports done, and glibc's heap thresholds fixed for large
    CPU tensors (their defaults fragment the heap, `pipelines.heap`)."""
    preload_libraries()
    tune_heap()
