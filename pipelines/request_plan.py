"""A request and its model -> the planner's input (`pipelines.planner.PlanInput`) -> its `Plan`.

Before the model loads the planner gets the chosen model's own size (`pipelines.models.sizes.known_sizes`);
after, the loaded weights' real bytes and its tiled VAE's canvases at this size, with the free device memory as
the budget when the request names none.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from pipelines.models.loading import precision_label
from pipelines.models.sizes import known_sizes
from pipelines.planner import (
    ModelFootprint,
    Plan,
    PlanInput,
    RegionLayout,
    TilingAsk,
    available_ram,
    free_device_memory,
    plan_generation,
)
from pipelines.request.schema import GenerationRequest, TileConfig
from pipelines.vae.tiling import decode_splits


def model_sizes(model: Any) -> dict[str, Any]:
    """The loaded model's real weight bytes, and its width relative to the real architecture (320 channels)."""
    modules = [model.unet, model.vae, *model.text_encoders]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return {"weights": int(weights), "activation_scale": model.unet.config.block_out_channels[0] / 320}


def vae_store(model: Any, width: int, height: int, budget: int | None) -> dict[str, Any]:
    """The tiled VAE's canvas bytes at this size (per hand-over between its layer-wise and streamed runners), and
    the host memory they may take: on a CPU the planner's budget less the weights (the same RAM), on an
    accelerator half the available RAM."""
    if model is None:
        return {}
    store = decode_splits(model.vae, height // 8, width // 8)
    if model.device.type == "cpu":
        host = None if budget is None else max(budget - model_sizes(model)["weights"], 0)
    else:
        ram = available_ram()
        host = None if ram is None else ram // 2
    return {"vae_splits": store, "host_budget_bytes": host}


def max_and_parts(req: GenerationRequest) -> int:
    """The most AND parts of any prompt the run encodes (main, hires, regions): UNet rows besides uncond."""
    from pipelines.prompts.composable import split_and

    texts = [req.prompt, req.hires.prompt or "", *(r.prompt for r in req.regions)]
    return max(len(split_and(t)) if isinstance(t, str) else 1 for t in texts)


def tiling_ask(t: TileConfig) -> TilingAsk:
    """The request's tiling fields under the planner's names."""
    return TilingAsk(tile_size=t.size, overlap=t.overlap, tile_batch=t.batch, force=t.mode, vae_tiling=t.vae_tiling,
                     vae_tile_size=t.vae_tile_size, vae_mode=t.vae_tile_mode)


def plan_request(manager: Any, req: GenerationRequest, model: Any = None, *, width: int | None = None,
                 height: int | None = None, allow_paths: bool = False) -> Plan:
    """The plan of `req` at its size (or `width` x `height`, a hires stage's), on the loaded `model` when given,
    else on the model `manager` would load for it."""
    source = None if model is not None else manager.resolve(req.model, allow_paths=allow_paths)
    family = model.family if source is None else source.family
    budget = int(req.tiling.memory_budget_gb * 1e9) if req.tiling.memory_budget_gb else None
    if budget is None and model is not None:
        budget = free_device_memory(model.device)
    if model is not None:
        dtype_bytes = 4 if model.dtype == torch.float32 else 2
        sizes = model_sizes(model)
        sizes["weights"] += manager.auxiliary_bytes()  # the cached ControlNets, upscalers, annotators
    else:  # before loading: the chosen model's own size in the dtype it will be loaded in
        dtype_bytes = 4 if manager.device_dtype[1] == torch.float32 else 2
        sizes = known_sizes(source, dtype_bytes)
    width, height = width or req.width, height or req.height
    if model is not None:
        vae = getattr(getattr(model.pipe, "vae", None), "dtype", None)
        precision = precision_label(model.device, model.dtype, vae)
    else:
        device, dtype = manager.device_dtype
        precision = precision_label(device, dtype)
    plan = plan_generation(PlanInput(
        width, height, family=family, budget_bytes=budget, batch=req.batch_size,
        dtype_bytes=dtype_bytes, cond_rows=1 + max_and_parts(req), tiling=tiling_ask(req.tiling),
        model=ModelFootprint(**sizes, **vae_store(model, width, height, budget)),
        regions=RegionLayout(req.regions, req.region_base, (req.width, req.height))))
    return replace(plan, precision=precision)
