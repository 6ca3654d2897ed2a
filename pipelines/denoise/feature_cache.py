"""Feature caching in the denoising loop (DeepCache, Ma et al. CVPR 2024).

On a full step the UNet runs whole and the feature entering its shallow path (`pipelines/denoise/unet_split.py`) is
cached per key = (tile position, CFG half); on the other steps only the shallow branch runs, on the cached
feature. Keys make it compose with the rest of the loop:
- CFG: both halves are cached; a cond-only step (guidance interval, scale 1) reuses the cond half;
- tiling: one entry per tile position (the grid must not shift while caching; `request.validate` refuses it);
- ControlNet: residuals are added on both kinds of pass (the shallow pass uses those of its skip features);
- hires: each stage builds its own `FeatureCache` (a fresh cache per `LoopInputs`).
A call whose keys are not all cached (first step, a CFG step after cond-only ones) runs full, whatever the
schedule says; `plan_passes` predicts exactly that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.denoise.unet_split import branch_count, split_for, unsupported_reason
from pipelines.errors import ValidationError

SCHEDULES = ("uniform", "nonuniform")
NONUNIFORM_POWER = 1.4  # DeepCache's quadratic-ish spacing exponent (their README uses pow 1.4)
_STATS_LOCK = threading.Lock()


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """Steps whose UNet pass runs in full: ceil(steps / interval) of them, step 0 always among them.

    uniform: 0, N, 2N, ... (DeepCache's uniform 1:N strategy). nonuniform: the same count placed at
    floor(steps * (k/K)^p), p = 1.4 (made strictly increasing), denser early where features change fastest
    (DeepCache's non-uniform strategy, section 3.3, simplified to a power law from step 0).
    """
    if interval <= 1 or steps <= 1:
        return frozenset(range(steps))
    if schedule == "uniform":
        return frozenset(range(0, steps, interval))
    count = math.ceil(steps / interval)
    out: list[int] = []
    for k in range(count):
        pos = math.floor(steps * (k / count) ** NONUNIFORM_POWER)
        out.append(max(pos, out[-1] + 1) if out else 0)
    return frozenset(out)


def plan_passes(full: frozenset[int], cfg_per_step: Sequence[bool]) -> list[str]:
    """Predicted kind ("full" / "shallow") of each step's UNet calls, given which steps run CFG.

    A step is shallow when it is not scheduled full and every half it needs was cached by an earlier full step
    (the cond half always; the uncond half too when the step runs CFG)."""
    have_uncond = have_cond = False
    kinds = []
    for i, cfg in enumerate(cfg_per_step):
        if i not in full and have_cond and (have_uncond or not cfg):
            kinds.append("shallow")
            continue
        kinds.append("full")
        have_cond, have_uncond = True, have_uncond or cfg
    return kinds


@dataclass(frozen=True)
class CacheSettings:
    """The request's feature-cache settings, resolved for one stage."""

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"


@dataclass
class FeatureCache:
    """One stage's cache: built with the UNet and the step count, bound per UNet call by the loop."""

    unet: Any
    steps: int
    settings: CacheSettings = field(default_factory=CacheSettings)
    entries: dict[tuple, torch.Tensor] = field(default_factory=dict)
    replicas: tuple = ()
    """A split image's UNet replicas, the canvas device's first (empty: `unet` alone)."""

    def __post_init__(self):
        # A split image's UNet replicas (its executor's `unets`): each device's UNet gets its own split
        # passes, made here, before the replicas' threads; the entries are shared and moved to the device using them.
        replicas = list(self.replicas) or [self.unet]
        self._splits = {id(u): _split_of(u, self.settings.branch) for u in replicas}
        self.split = self._splits[id(replicas[0])]
        self.full = full_steps(self.steps, self.settings.interval, self.settings.schedule)

    def bind(self, step: int, tiles: Sequence[Any], do_cfg: bool, images: int, stats=None, *, parts: int = 1,
             view: int = 0, unet: Any = None) -> _BoundCall:
        """The callable the loop runs in place of `unet(...)` for one batch of tiles at one step; `parts` AND parts
        (conditional row blocks) and `view` (0 = the base prompt, i = the i-th regional prompt) key the cache too;
        `unet`: the replica running the batch (None: the first)."""
        split = self.split if unet is None else self._splits[id(unet)]
        return _BoundCall(self, step, [(t.y, t.x, t.h, t.w) for t in tiles], do_cfg, images, stats, parts, view,
                          split)


def _split_of(unet: Any, branch: int) -> Any:
    """A UNet2DConditionModel's split passes; an object with `full`/`shallow` (a closed-form test model) as it is."""
    return unet if hasattr(unet, "full") and hasattr(unet, "shallow") else split_for(unet, branch)


@dataclass
class _BoundCall:
    cache: FeatureCache
    step: int
    tiles: list[tuple[int, int, int, int]]
    do_cfg: bool
    images: int
    stats: Any = None
    parts: int = 1
    view: int = 0
    split: Any = None  # the passes of the UNet running this call (a split image: its device's); None: the cache's

    def _keys(self) -> list[tuple]:
        """One key per row block of the UNet batch, in its order: [uncond,] cond (the first AND part), cond1, ..."""
        conds = ["cond", *(f"cond{p}" for p in range(1, self.parts))]
        halves = ["uncond", *conds] if self.do_cfg else conds
        return [(self.view, tile, half) for half in halves for tile in self.tiles]

    def __call__(self, sample, timestep, *, encoder_hidden_states, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        """Same signature and result as `unet(..., return_dict=False)`: a 1-tuple holding the output."""
        c, keys, b = self.cache, self._keys(), self.images
        split = self.split or c.split
        shallow = self.step not in c.full and all(k in c.entries for k in keys)
        if shallow:  # an entry may come from another device's replica (a split image): moved here, exactly
            cached = torch.cat([c.entries[k].to(sample.device) for k in keys])
            out = split.shallow(sample, timestep, encoder_hidden_states, cached, added_cond_kwargs,
                                  down_block_additional_residuals)
        else:
            out, cached = split.full(sample, timestep, encoder_hidden_states, added_cond_kwargs,
                                       down_block_additional_residuals, mid_block_additional_residual)
            for j, k in enumerate(keys):
                c.entries[k] = cached[j * b:(j + 1) * b]
        if self.stats is not None:
            name = "cache_shallow" if shallow else "cache_full"
            with _STATS_LOCK:  # a split image's replicas count from their own threads
                setattr(self.stats, name, getattr(self.stats, name, 0) + 1)
        return (out,)


def cache_settings(req) -> CacheSettings | None:
    """A validated request's feature-cache settings; None when `feature_cache` is off."""
    if req.feature_cache != "on":
        return None
    return CacheSettings(req.feature_cache_interval, req.feature_cache_branch, req.feature_cache_schedule)


def make_feature_cache(unet, steps: int, settings: CacheSettings | None, replicas: Sequence[Any] = ()
                       ) -> FeatureCache | None:
    """The stage's cache, or None when caching is off (`settings` None) or there are no steps."""
    if settings is None or steps <= 0:
        return None
    try:
        return FeatureCache(unet, steps, settings, replicas=tuple(replicas))
    except ValueError as err:
        count = branch_count(unet) if unsupported_reason(unet) is None else 0
        fix = (f"must be at most {count - 1} for this model" if count else f"cannot be used here ({err}); set "
               "feature_cache off")
        field_name = "feature_cache_branch" if count else "feature_cache"
        raise ValidationError(field_name, settings.branch if count else "on", fix) from None
