"""The stage-1 cache of two-stage runs: changing only stage-2 settings (hires denoise, upscaler, steps...) reuses
the draft's latents instead of denoising it again (README: "Two-stage generation").

Keys hold everything stage 1 depends on; images enter them as a hash of their contents (`content_hash`), so an
equal image in another object hits and one changed pixel misses. Values are kept on the CPU, at most `size` of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.denoise.feature_cache import cache_settings
from pipelines.lru import LRUCache
from pipelines.request.schema import GenerationRequest


class Uncachable(TypeError):
    """An input whose contents cannot be hashed: the run goes uncached."""


def content_hash(value: Any) -> str | None:
    """A SHA-256 of an image's (or array's) contents with its mode/dtype and size; None for None."""
    if value is None:
        return None
    digest = hashlib.sha256()
    if isinstance(value, Image.Image):
        digest.update(f"PIL {value.mode} {value.size}".encode())
        digest.update(value.tobytes())
    elif isinstance(value, torch.Tensor):
        array = value.detach().to("cpu").contiguous()
        digest.update(f"torch {array.dtype} {tuple(array.shape)}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    elif isinstance(value, np.ndarray):
        contiguous = np.ascontiguousarray(value)
        digest.update(f"numpy {contiguous.dtype} {contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    else:
        raise Uncachable(f"cannot hash the contents of a {type(value).__name__}")
    return digest.hexdigest()


def stage1_key(req: GenerationRequest, model: Any, seeds: Sequence[int], embeddings: tuple = ()) -> tuple | None:
    """Everything stage 1's latents depend on: model and LoRAs, prompts, size, sampling, seeds, the init image and
    ControlNet units (their images by content), tiling, timeline, textual inversions, feature cache, regions.
    None when an image cannot be hashed (that run is not cached)."""
    try:
        init = content_hash(req.init_image)
        ctrl = tuple((u.type, u.model, u.scale, u.start, u.end, u.low, u.high, u.guess_mode, content_hash(u.image))
                     for u in req.control)
    except Uncachable:
        return None
    return (model.name, model.loras, req.prompt, req.negative_prompt, req.width, req.height, req.steps, req.cfg,
            req.sampler, tuple(seeds), req.emphasis, req.clip_skip, req.strength, init, ctrl, req.tiling,
            req.prompt_timeline, embeddings, cache_settings(req), req.regions, req.region_base)


class Stage1Cache:
    """The last `size` stage-1 results (latents on the CPU), least recently used first out; `runs` counts the
    stage-1 runs it did not save (cached or not)."""

    def __init__(self, size: int = 2):
        self._lru = LRUCache(size)
        self.runs = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def latents(self, key: Hashable | None, run: Callable[[], torch.Tensor], device: torch.device | str
                ) -> torch.Tensor:
        """The cached latents for `key` on `device`, else `run()`'s (stored when `key` is not None)."""
        def counted() -> torch.Tensor:
            self.runs += 1
            return run()

        if key is None:
            return counted()
        return self._lru.get(key, lambda: counted().detach().to("cpu")).to(device)

    def clear(self) -> None:
        self._lru.clear()
