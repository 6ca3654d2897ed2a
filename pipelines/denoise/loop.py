"""The one denoising loop: views x tiles x CFG x AND x ControlNet x previews x cancel.

Used by txt2img, img2img, inpainting, the hires refine pass and tiled runs alike. Per step (docs/ARCHITECTURE.md):
1. plan the views: one tile = the whole canvas when untiled, else the step's tiles (inpainting drops the tiles
   with nothing to repaint); regional prompts add one view per region over the tiles its mask touches;
2. for each batch of tiles of a view, crop the latents and the control maps and run the UNet on
   [uncond, cond_1..cond_k] rows (k AND parts; no uncond where this step's guidance scale is 1), through the
   feature cache when it is on, spread over several devices' replicas when the image is split;
3. accumulate the outputs on the canvas with per-tile (x region mask) weights and divide by the weight sum;
4. apply guidance (schedule + rescale) ONCE on the whole canvas and take ONE scheduler step, so every
   scheduler works without per-tile state; then the post-step hook (inpainting's latent blend);
5. check the cancel token (a cancel during the step discards it, the last step too), report progress (with the
   predicted x0 for previews).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipelines.denoise.executor import SERIAL, Lane, TileExecutor, to_device
from pipelines.denoise.guidance import apply_cfg
from pipelines.denoise.regions import tiles_touching
from pipelines.errors import CancelledError
from pipelines.prompts.composable import combine_parts, is_plain, needs_uncond_for
from pipelines.tiling import BlendMode, Tile, accumulate, finish, grid_offset, new_canvas, plan_tiles, tile_weights


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for one step: embeddings [1, S, D] and, for SDXL, pooled [1, P] + time ids [1, 6]."""

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    extra: tuple[torch.Tensor, ...] = ()
    """AND parts after the first (`pipelines.prompts.composable`): embeddings [1, S, D], the same S as `cond`."""
    extra_pooled: tuple[torch.Tensor, ...] = ()
    """SDXL: each extra part's pooled embedding [1, P]."""
    weights: tuple[float, ...] = (1.0,)
    """AND weight of each part: `cond` first, then `extra`."""


@dataclass(frozen=True)
class ControlInput:
    """One prepared ControlNet unit: the model, the full-size control image [1 or B,3,H,W] in [0,1], its window."""

    model: Any
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def active(self, step: int, steps: int) -> bool:
        """Active on steps i with start <= i/steps < end (end == 1 includes the last step)."""
        p = step / steps
        return self.scale > 0 and self.start <= p and (p < self.end or (self.end >= 1.0 and self.start < 1.0))


@dataclass(frozen=True)
class TileSpec:
    """How to tile the latent canvas: sizes in latent pixels."""

    size: int
    overlap: int
    blend: BlendMode = "gaussian"
    batch: int = 4
    shift: bool = False


@dataclass
class LoopStats:
    """What the loop did: UNet evaluations (one per image-tile pass), passes saved by scale-1 steps."""

    unet_evals: int = 0
    unet_calls: int = 0
    evals_saved: int = 0
    steps_done: int = 0
    tiles_per_step: int = 1
    scales: list[float] = field(default_factory=list)
    cache_full: int = 0  # feature caching: UNet calls run in full / on the shallow branch only
    cache_shallow: int = 0


@dataclass
class StepInfo:
    """Handed to the per-step callback."""

    step: int
    total: int
    timestep: Any
    latents: torch.Tensor
    denoised: torch.Tensor  # predicted x0 (latent space), for previews


@dataclass
class LoopInputs:
    """Everything the loop needs; built by the engine."""

    unet: Any
    scheduler: Any
    latents: torch.Tensor  # [B, C, h, w], already noised / scaled by init_noise_sigma
    timesteps: Sequence[Any]
    conditioning: Callable[[int], Conditioning]  # per-step (prompt scheduling lives here)
    scales: Sequence[float]  # guidance scale per step
    rescale: float = 0.0
    tiles: TileSpec | None = None
    control: Sequence[ControlInput] = ()
    generators: Sequence[torch.Generator] | None = None
    seed: int = 0
    callback: Callable[[StepInfo], None] | None = None
    cancel: Any = None  # anything with is_set()
    vae_scale: int = 8
    feature_cache: Any = None  # a pipelines.denoise.feature_cache.FeatureCache: the UNet calls go through it
    executor: TileExecutor = SERIAL  # runs each step's batches of tiles (`pipelines.denoise.executor`)
    regions: Sequence[Any] = ()  # `pipelines.denoise.regions.RegionView`s: extra views with their own prompt and mask
    base_mask: torch.Tensor | None = None  # [h, w] weight of the base prompt when regions are set
    # inpainting (`pipelines.edit.inpaint`): a hook after each scheduler step (step index, latents) -> latents, channels
    # concatenated to the UNet input under each tile (9-channel inpainting UNets), and a filter dropping tiles
    post_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    extra_channels: torch.Tensor | None = None  # [1 or B, C, h, w]
    tile_filter: Callable[[list[Tile]], list[Tile]] | None = None


@dataclass(frozen=True)
class StepCall:
    """What every UNet call of one step shares: the scaled model input, the timestep, whether uncond rows run."""

    x_in: torch.Tensor  # [B, C, h, w], `scheduler.scale_model_input` applied
    t: Any
    index: int  # this step
    steps: int
    do_cfg: bool
    stats: LoopStats


@dataclass(frozen=True)
class View:
    """One view of a step: its conditioning over the tiles it runs on; a regional view's weight mask [h, w]."""

    cond: Conditioning
    tiles: Sequence[Tile]
    mask: torch.Tensor | None = None
    index: int = 0  # 0 = the base prompt, 1.. = the regions (the feature cache keys by it)


@dataclass(frozen=True)
class UNetRows:
    """One UNet call's inputs for a batch of tiles: [uncond,] cond_1..cond_k row blocks of `images` samples x tiles."""

    x: torch.Tensor
    t: Any
    enc: torch.Tensor
    added: dict | None
    tiles: Sequence[Tile]
    images: int


def _unet_for(inp: LoopInputs, call: StepCall, view: View, group: Sequence[Tile], images: int, replica=None):
    """The UNet itself (or the `replica` of a split image running this batch), or the feature cache's stand-in for
    this batch of tiles (DeepCache, on that replica), keyed by view too."""
    if inp.feature_cache is None:
        return inp.unet if replica is None else replica
    return inp.feature_cache.bind(call.index, group, call.do_cfg, images, call.stats, parts=len(view.cond.weights),
                                  view=view.index, unet=replica)


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("generation stopped")


def predict_x0(scheduler, x_in: torch.Tensor, model_out: torch.Tensor, step_index: int, t) -> torch.Tensor:
    """x0 from the (scaled, VP-form) model input and the model output: eps or v prediction."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step_index and not hasattr(scheduler, "alpha_t"):
        sigma = sigmas[step_index].to(torch.float32)
        alpha_bar = 1.0 / (1.0 + sigma**2)
    else:
        alpha_bar = scheduler.alphas_cumprod[int(t)].to(torch.float32)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x, m = x_in.float(), model_out.float()
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return a * x - s * m
    return (x - s * m) / a


def _tiles_for_step(inp: LoopInputs, step: int) -> list[Tile]:
    h, w = inp.latents.shape[-2:]
    spec = inp.tiles
    if spec is None or (spec.size >= h and spec.size >= w):
        return [Tile(0, 0, h, w)]
    offset = grid_offset(inp.seed, step, spec.size, spec.overlap) if spec.shift else (0, 0)
    tiles = plan_tiles(h, w, spec.size, spec.overlap, offset=offset)
    return inp.tile_filter(tiles) if inp.tile_filter is not None else tiles


def _with_extra_channels(inp: LoopInputs, model_in: torch.Tensor, tiles: Sequence[Tile], n_img: int) -> torch.Tensor:
    """The UNet input with `inp.extra_channels` under each tile appended (diffusers' order: latents first)."""
    if inp.extra_channels is None:
        return model_in
    extra = inp.extra_channels.to(model_in.device, model_in.dtype).expand(n_img, -1, -1, -1)
    crops = torch.cat([extra[..., t.y:t.y + t.h, t.x:t.x + t.w] for t in tiles])
    return torch.cat([model_in, crops.repeat(model_in.shape[0] // crops.shape[0], 1, 1, 1)], dim=1)


def _control_residuals(inp: LoopInputs, call: StepCall, rows: UNetRows) -> tuple[list | None, torch.Tensor | None]:
    """Sum of ControlNet residuals for a batch of tiles; each tile gets the control map under it."""
    down, mid = None, None
    s = inp.vae_scale
    x, t, enc, added = rows.x, rows.t, rows.enc, rows.added
    for unit in inp.control:
        if not unit.active(call.index, call.steps):
            continue
        crops = torch.cat([unit.image[..., t_.y * s:(t_.y + t_.h) * s, t_.x * s:(t_.x + t_.w) * s]
                           for t_ in rows.tiles])
        if unit.image.shape[0] == 1:  # one map for every image of the batch; else one map per image
            crops = crops.repeat_interleave(rows.images, dim=0)
        crops = crops.to(x.device, unit.model.dtype)
        if unit.guess_mode and call.do_cfg:
            half = crops.shape[0]  # the unconditional rows come first
            conds = torch.cat([crops] * (x.shape[0] // half - 1))  # AND: one copy per conditional block
            d, m = unit.model(x[half:], t, encoder_hidden_states=enc[half:], controlnet_cond=conds,
                              conditioning_scale=unit.scale, guess_mode=True,
                              added_cond_kwargs=_half(added, half), return_dict=False)
            d = [torch.cat([torch.zeros_like(r[:half]), r]) for r in d]
            m = torch.cat([torch.zeros_like(m[:half]), m])
        else:
            cond_img = torch.cat([crops] * (x.shape[0] // crops.shape[0]))  # one copy per row block
            d, m = unit.model(x, t, encoder_hidden_states=enc, controlnet_cond=cond_img,
                              conditioning_scale=unit.scale, guess_mode=unit.guess_mode,
                              added_cond_kwargs=added, return_dict=False)
        down = list(d) if down is None else [a + b for a, b in zip(down, d, strict=True)]
        mid = m if mid is None else mid + m
    return down, mid


def _half(added: dict | None, half: int) -> dict | None:
    return None if added is None else {k: v[half:] for k, v in added.items()}


def _batch_inputs(c: Conditioning, n: int, do_cfg: bool):
    """Encoder states (and SDXL added conditions) for `n` samples, [uncond x n, cond x n] with CFG."""
    enc = c.cond.expand(n, -1, -1)
    if c.extra:  # AND: one block of rows per part, [uncond, cond_1, cond_2, ...]
        enc = torch.cat([enc, *(e.expand(n, -1, -1) for e in c.extra)])
    if do_cfg:
        enc = torch.cat([c.uncond.expand(n, -1, -1), enc])
    added = None
    if c.cond_pooled is not None:
        assert c.uncond_pooled is not None and c.time_ids is not None  # SDXL: set together (`run_stage`)
        pooled = c.cond_pooled.expand(n, -1)
        if c.extra_pooled:
            pooled = torch.cat([pooled, *(p.expand(n, -1) for p in c.extra_pooled)])
        if do_cfg:
            pooled = torch.cat([c.uncond_pooled.expand(n, -1), pooled])
        time_ids = c.time_ids.expand(pooled.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return enc, added


def _new_canvas(call: StepCall) -> tuple[torch.Tensor, torch.Tensor]:
    """One accumulation canvas for the step's outputs (cond rows, then uncond rows with CFG) and its weight sum:
    both halves get the same weights, so one sum serves them."""
    b, c, h, w = call.x_in.shape
    return new_canvas(b * (2 if call.do_cfg else 1), c, h, w, device=call.x_in.device)


def _finish_canvas(canvas: tuple[torch.Tensor, torch.Tensor], call: StepCall):
    """(cond, uncond or None) outputs: the canvas divided by its weight sum (MultiDiffusion eq. 5)."""
    out = finish(*canvas).to(call.x_in.dtype)
    return tuple(out.chunk(2)) if call.do_cfg else (out, None)


def _split_parts(out: torch.Tensor, c: Conditioning, do_cfg: bool):
    """(uncond or None, cond) from the UNet's row blocks; AND parts combined (composable diffusion)."""
    if is_plain(c.weights):
        return out.chunk(2) if do_cfg else (None, out)
    blocks = out.chunk(len(c.weights) + (1 if do_cfg else 0))
    uncond, parts = (blocks[0], blocks[1:]) if do_cfg else (None, blocks)
    return uncond, combine_parts(uncond, parts, c.weights)


def _run_tiles(inp: LoopInputs, call: StepCall, view: View,
               canvas: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Model outputs (cond, uncond or None) on the canvas, blended over the view's tiles (MultiDiffusion). A
    regional view adds into the shared `canvas` with weight x its mask (`_run_views`) and returns (None, None)."""
    x_in, tiles, do_cfg = call.x_in, view.tiles, call.do_cfg
    b = x_in.shape[0]
    single = canvas is None and len(tiles) == 1 and tiles[0].h == x_in.shape[-2] and tiles[0].w == x_in.shape[-1]
    spec = inp.tiles
    own = canvas is None and not single
    if own:
        canvas = _new_canvas(call)
    per_call = len(tiles) if spec is None else max(1, spec.batch)
    groups = [tiles[i:i + per_call] for i in range(0, len(tiles), per_call)]
    for group, out in zip(groups, _batch_outputs(inp, call, view, groups), strict=True):
        call.stats.unet_calls += 1
        call.stats.unet_evals += (len(view.cond.weights) + (1 if do_cfg else 0)) * len(group)
        out_u, out_c = _split_parts(out, view.cond, do_cfg)
        if single:
            return out_c, out_u
        assert canvas is not None  # the view's own canvas, or the shared one of the regional views
        weight = tile_weights(group[0].h, group[0].w, spec.blend if spec else "average", device=x_in.device)
        for j, tl in enumerate(group):
            sl = slice(j * b, (j + 1) * b)
            w = weight if view.mask is None else weight * view.mask[tl.slices]
            accumulate(canvas[0], canvas[1], tl, torch.cat([out_c[sl], out_u[sl]]) if do_cfg else out_c[sl], w)
    return _finish_canvas(canvas, call) if own and canvas is not None else (None, None)


def _run_views(inp: LoopInputs, call: StepCall, cond: Conditioning, tiles: list[Tile]):
    """Regional prompts (MultiDiffusion, Bar-Tal et al. 2023, sec. 4.2): the base prompt and each region are views
    over the tiles their mask touches (a region costs nothing elsewhere), blended on one canvas with weight
    mask x tile weight and normalised there."""
    canvas = _new_canvas(call)
    views = [(cond, inp.base_mask), *((r.conditioning(call.index), r.mask) for r in inp.regions)]
    for index, (view_cond, mask) in enumerate(views):
        touched = tiles_touching(mask, tiles)
        if touched:
            _run_tiles(inp, call, View(view_cond, touched, mask, index), canvas)
    return _finish_canvas(canvas, call)


def _needs_uncond(inp: LoopInputs, scale: float, cond: Conditioning, step: int) -> bool:
    """The unconditional pass is needed with guidance, or for AND weights not summing to 1 (any view)."""
    weights = [cond.weights, *(r.conditioning(step).weights for r in inp.regions)]
    return any(needs_uncond_for(scale, w) for w in weights)


def _unet_batch(inp: LoopInputs, unet, call: StepCall, view: View, group: Sequence[Tile], device=None):
    """One UNet call (+ ControlNet) on a batch of tiles: the [uncond,] cond (AND parts: cond_1..cond_k) row blocks'
    outputs, on `device` (None: x_in's). `unet` None is the loop's own: the UNet or its feature cache."""
    x_in, cond = call.x_in, view.cond
    b = x_in.shape[0]
    crops = torch.cat([x_in[..., tl.y:tl.y + tl.h, tl.x:tl.x + tl.w] for tl in group])
    n = crops.shape[0]
    rows = len(cond.weights) + (1 if call.do_cfg else 0)  # [uncond, cond] or [uncond, cond_1, ..., cond_k]
    model_in = torch.cat([crops] * rows) if rows > 1 else crops
    enc, added = _batch_inputs(cond, n, call.do_cfg)
    t = call.t
    if device is not None and device != x_in.device:  # a replica on another device (a split image's executor)
        model_in, t, enc, added = to_device((model_in, t, enc, added), device)
    down, mid = _control_residuals(inp, call, UNetRows(model_in, t, enc, added, group, b))
    model_in = _with_extra_channels(inp, model_in, group, b)  # after ControlNet, which takes the latents only
    unet = _unet_for(inp, call, view, group, b, replica=unet)
    return unet(model_in, t, encoder_hidden_states=enc, added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]


def _batch_outputs(inp: LoopInputs, call: StepCall, view: View, groups: list):
    """The UNet outputs of each batch of tiles, in order, from the loop's executor (`pipelines.denoise.executor`):
    one after the other on `inp.unet`, or spread over the devices of a split image."""

    def run(lane: Lane | None, group):
        _check_cancel(inp.cancel)
        if lane is None:
            return _unet_batch(inp, None, call, view, group)
        return _unet_batch(replace(inp, control=lane.control), lane.unet, call, view, group, lane.device)

    yield from inp.executor.run_batches(run, groups, call.x_in.device, inp.control)


@torch.no_grad()
def denoise(inp: LoopInputs, stats: LoopStats | None = None) -> torch.Tensor:
    """Run the scheduler over `inp.timesteps`; returns the final latents."""
    stats = stats if stats is not None else LoopStats()
    sched, latents = inp.scheduler, inp.latents
    steps = len(inp.timesteps)
    gen = list(inp.generators) if inp.generators else None
    for i, t in enumerate(inp.timesteps):
        _check_cancel(inp.cancel)
        scale = float(inp.scales[i])
        cond = inp.conditioning(i)
        do_cfg = _needs_uncond(inp, scale, cond, i)
        tiles = _tiles_for_step(inp, i)
        stats.tiles_per_step = len(tiles)
        x_in = sched.scale_model_input(latents, t)
        call = StepCall(x_in, t, i, steps, do_cfg, stats)
        if inp.regions:
            out_c, out_u = _run_views(inp, call, cond, tiles)
        else:
            out_c, out_u = _run_tiles(inp, call, View(cond, tiles))
        if not do_cfg:
            stats.evals_saved += len(tiles)
        model_out = apply_cfg(out_u, out_c, scale, inp.rescale) if do_cfg else out_c
        stats.scales.append(scale)
        step_index = getattr(sched, "step_index", None)
        extra = {"generator": gen} if gen is not None else {}
        latents = sched.step(model_out, t, latents, return_dict=False, **extra)[0]
        if inp.post_step is not None:
            latents = inp.post_step(i, latents)
        stats.steps_done += 1
        _check_cancel(inp.cancel)  # a cancel during this step, the last one too: its result is not reported
        if inp.callback is not None:
            idx = step_index if step_index is not None else i
            x0 = predict_x0(sched, x_in, model_out, idx, t)
            inp.callback(StepInfo(i, steps, t, latents, x0))
    return latents
