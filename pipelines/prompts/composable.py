"""AND: composable diffusion with A1111's syntax (Liu et al. 2022; A1111 `modules/prompt_parser.py`).

`a cat AND a dog :1.2` is two conditional passes in the same UNet batch, combined with the unconditional one as
uncond + sum_i w_i (cond_i - uncond) (`combine_parts`); CFG (schedule and rescale) then applies to that combined
prediction. The split is A1111's `get_multicond_prompt_list`: the whole prompt is split on the word `AND` (before
scheduling, so emphasis, `[a:b:0.5]` and BREAK work inside each part), and each part may end in `:weight`. The
negative prompt has no AND (A1111 does not split it either).

The split is pure Python; `combine_parts` is the one tensor function.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.errors import ValidationError
from pipelines.request.checks import AND_RE as _RE_AND

if TYPE_CHECKING:
    import torch

_RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111 re_weight


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's AND split: [(part text, weight)]; a trailing `:w` of a part is its weight (default 1).

    A prompt without AND and without a trailing weight is returned unchanged as [(text, 1.0)], so it encodes
    exactly as before (A1111 strips trailing whitespace there, which CLIP ignores anyway).
    """
    parts = _RE_AND.split(text)
    out: list[tuple[str, float]] = []
    weighted = False
    for part in parts:
        m = _RE_WEIGHT.search(part)
        if m is None:  # cannot happen with this pattern, kept as A1111 has it
            out.append((part, 1.0))
            continue
        body, weight = m.groups()
        weighted = weighted or weight is not None
        out.append((body, float(weight) if weight is not None else 1.0))
    if len(out) == 1 and not weighted:
        return [(text, 1.0)]
    return out


def is_plain(weights: Sequence[float]) -> bool:
    """One part of weight 1: the ordinary prompt, no combination needed."""
    return len(weights) == 1 and weights[0] == 1.0


def needs_uncond_for(scale: float, weights: Sequence[float]) -> bool:
    """Whether the unconditional pass is needed: with guidance (scale != 1), or when the part weights do not sum
    to 1 (uncond + sum w_i (c_i - uncond) then keeps a share of uncond even at scale 1)."""
    return scale != 1.0 or sum(weights) != 1.0


def passes_per_step(scale: float, weights: Sequence[float]) -> int:
    """UNet evaluations per step and tile: one per part, plus the unconditional one when it is needed."""
    return len(weights) + (1 if needs_uncond_for(scale, weights) else 0)


def combine_parts(uncond: torch.Tensor | None, conds: Sequence[torch.Tensor], weights: Sequence[float]
                  ) -> torch.Tensor:
    """Composable diffusion: uncond + sum_i w_i (cond_i - uncond); sum_i w_i cond_i when uncond is None (weights
    summing to 1 at scale 1). One plain part is returned as it is."""
    if len(conds) != len(weights):
        raise ValidationError("weights", tuple(weights), f"must have one weight per AND part ({len(conds)})")
    if uncond is None and is_plain(weights):
        return conds[0]
    if uncond is None:
        out = conds[0] * weights[0]
        for c, w in zip(conds[1:], weights[1:], strict=True):
            out = out + c * w
        return out
    if is_plain(weights):
        return conds[0]
    out = uncond
    for c, w in zip(conds, weights, strict=True):
        out = out + (c - uncond) * w
    return out
