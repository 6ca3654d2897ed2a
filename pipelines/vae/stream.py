"""Streamed tiled VAE: every tile runs the whole up (or down) path on its own, so memory stays one tile deep.

The layer-wise runner (`pipelines.vae.tiling.run_stages`) is exact but keeps about three full-resolution
activations of one layer on its store device: for SD's VAE at 4096² that is ~17 GB of host RAM in fp16. This
runner keeps nothing at full resolution but the output:

1. each tile reads its core plus a margin of context (the stages' summed receptive field, ~13 latent px for SD's
   whole up path) from the stored input (the mid-block output or a layer-wise head's output when decoding, the
   image when encoding),
   runs every stage, and keeps only its core: with the SAME GroupNorm statistics in every tile, cores agree
   with each other and with the full decode, so there are no seams and nothing to feather;
2. those statistics are the whole image's, exact: GroupNorm j's come from a sweep that runs every tile up to
   stage j (with the exact statistics of GroupNorms 0..j-1, found by the sweeps before) and adds the moments of
   its core there (the two passes of the tiled-VAE design: gather per-tile sums over non-overlapping cores, then
   normalise with the global values). The first GroupNorm's input is stored whole, so it needs no sweep.

So the result equals the full decode up to float rounding, like the layer-wise runner. Cheaper estimates were
measured on the tiny VAE at 768² (tiles 32/8; diffusers' `enable_tiling` has mean abs error 0.040 there) and
dropped: each tile's own statistics 0.018 (max 0.83: visible tile edges); statistics of a 2x-downsampled input
1.18 on noise latents; of a 4x4 mosaic of 16² crops 0.0065 on noise but 0.022 (max 1.35) on smooth latents; and
re-sweeping with the previous sweep's estimates (a fixed-point iteration) diverged: 0.046, 0.21, 0.18, 0.67
after 1-4 sweeps, because a GroupNorm fed inputs normalised differently from when its statistics were gathered
amplifies the mismatch.

Cost: one sweep per GroupNorm, each stopping at it: the sum of the stages' prefix costs, on tiles of (tile + 2 *
margin)² instead of tile². So `splits`/`choose` (below) stream only the high-resolution stages, where the memory
is, and run the low-resolution ones layer by layer (`pipelines.vae.tiling.run_stages`) as far as a host-memory
budget allows: fewer sweeps, each shorter, and a margin of a few latent px instead of 13. FLOPs of the real runners
for SD's VAE at 4096² in fp16 with 128² tiles (FlopCounterMode on the meta device, relative to one plain decode,
whose mid-block attention over 262,144 latent tokens is included): layer by layer 1.02x for 17.2 GB of host
canvases; streaming the last 9 stages 2.3x for 8.6 GB; the 13 from 2048² up 3.3x for 6.4 GB; 17 stages 4.8x for 3.2
GB; all 25 8.6x for 0.4 GB (on the tiny VAE at 1024², 32² tiles, measured time: 0.75 s layer-wise, 1.08 s streaming
5 of 17 stages, 1.62 s streaming 9, 3.2 s streaming all). The planner (`pipelines.planner`) asks for this only when
the layer-wise canvases would not fit, with the largest tile the device budget allows; encoding mirrors it (the
encoder's high-resolution head streamed, its tail layer by layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.tiling import Tile
from pipelines.vae.lanes import Canvas, Lanes
from pipelines.vae.stages import (
    Moments,
    Stage,
    TileMoments,
    core_stats,
    crop_span,
    group_norm,
    tile_moments,
    window,
)

Stats = dict[int, tuple[torch.Tensor, torch.Tensor]]


def margin(stages: list[Stage], res: int) -> int:
    """Context (in latent pixels) a core needs so every stage sees the same inputs as in the full decode."""
    total, r = 0.0, float(res)
    for stage in stages:
        total += stage.reach / r
        r *= stage.scale
    return math.ceil(total)


def _core_slice(core: Tile, origin_y: int, origin_x: int, r: int) -> tuple[slice, slice]:
    """The core's rows and columns inside a tile whose top-left latent pixel is (origin_y, origin_x)."""
    y, x = (core.y - origin_y) * r, (core.x - origin_x) * r
    return slice(y, y + core.h * r), slice(x, x + core.w * r)


def _tile(
    stages: list[Stage], h: torch.Tensor, core: Tile, res: int, pad: int, stats: Stats, device: torch.device,
    gather: int | None = None, span: tuple[int, int] = (0, 0),
) -> torch.Tensor | TileMoments:
    """Run the stages on one core plus `pad` latent px of context (a `span` = (rows, columns) window of latent px
    around it, if given) and return the core of the output; with `gather=j`, stop at stage j instead and return
    the moments of the core of its input (for GroupNorm j's statistics)."""
    lat_h, lat_w = h.shape[-2] // res, h.shape[-1] // res
    y0, y1 = crop_span(core.y, core.y + core.h, pad, lat_h, span[0])
    x0, x1 = crop_span(core.x, core.x + core.w, pad, lat_w, span[1])
    x = h[..., y0 * res : y1 * res, x0 * res : x1 * res].to(device)
    r, skip = res, None
    for i, stage in enumerate(stages):
        if gather is not None and i == gather:
            rows, cols = _core_slice(core, y0, x0, r)
            assert stage.norm is not None  # gather: a GroupNorm stage
            return tile_moments(x[..., rows, cols], stage.norm.num_groups)
        inp = x
        if stage.norm is not None:
            x = group_norm(x, stage.norm, stats[i])
        x = stage.body(x, skip if stage.uses_skip else None)
        skip = inp if stage.keeps_input else None
        r = int(r * stage.scale)
    rows, cols = _core_slice(core, y0, x0, r)
    return x[..., rows, cols]


def run_streamed(
    stages: list[Stage] | Lanes, h: torch.Tensor, cores: list[Tile], res: int, device: torch.device | None = None,
) -> torch.Tensor:
    """Run stages tile by tile, end to end, with exact whole-image GroupNorm statistics (one sweep per GroupNorm).

    `h` (on any device) is at `res` x latent resolution; the output canvas is allocated on `h`'s device. With
    `Lanes`, every sweep's tiles are spread over their devices (`pipelines.vae.lanes`), else all run on `device`.
    """
    if isinstance(stages, Lanes):
        lanes = stages
    else:
        assert device is not None  # a plain stage list runs on `device`
        lanes = Lanes.one(stages, device)
    path = lanes.first
    stats: Stats = {}
    for j, stage in enumerate(path):
        if stage.norm is None:
            continue
        if j == 0:  # the stored input itself
            stats[0] = core_stats(h, cores, res, stage.norm.num_groups, lanes.device)
            continue
        moments, pad = Moments(stage.norm.num_groups), margin(path[:j], res)
        span = window(cores, pad)

        def sweep(own: list[Stage], dev: torch.device, core: Tile, j: int = j, pad: int = pad, span=span):
            return _tile(own, h, core, res, pad, stats, dev, gather=j, span=span)

        for part in lanes.map(sweep, cores):
            moments.merge(part)
        stats[j] = moments.finalize()
    pad, r = margin(path, res), float(res)
    for stage in path:
        r *= stage.scale
    r = int(r)
    canvas, span = Canvas(h.device, h.shape[-2] // res * r, h.shape[-1] // res * r), window(cores, pad)

    def final(own: list[Stage], dev: torch.device, core: Tile) -> None:
        out = _tile(own, h, core, res, pad, stats, dev, span=span)
        assert isinstance(out, torch.Tensor)  # no gather: the core's output
        canvas.put(out, core.y * r, core.x * r)

    lanes.map(final, cores)
    assert canvas.tensor is not None  # at least one core was put
    return canvas.tensor


# ---------------------------------------------------------------- hybrid: layer-wise where it fits, streamed where not


@dataclass(frozen=True)
class Split:
    """Where a streamed tiled VAE hands over between runners, and the store-device memory that costs.

    Decoding, `stages[:at]` run layer by layer (`pipelines.vae.tiling.run_stages`) and the rest tile by tile;
    encoding, `stages[:at]` run tile by tile and the rest layer by layer: either way the high-resolution stages
    are the streamed ones. at = 0 (decode) or n (encode) streams every stage; the other end is the layer-wise run.
    """

    at: int
    """Stage index of the hand-over."""
    stages: int
    """Number of stages in the path."""
    host_bytes: int
    """Peak bytes of full-size canvases on the store device (the host when decoding on an accelerator)."""
    margin: int
    """Latent px of context each streamed tile reads (0 when nothing is streamed)."""
    encode: bool = False
    """Whether this splits the encoder's down path (streamed head) rather than the decoder's up path (tail)."""

    @property
    def streamed(self) -> int:
        """How many stages run tile by tile."""
        return self.at if self.encode else self.stages - self.at


def _canvases(stages: Sequence[Stage], res: float, px: int) -> list[tuple[int, int, int, float]]:
    """Per stage: bytes of its input, skip and output canvases (`px` = latent pixels x item size x batch), and
    its input resolution (x latent)."""
    rows, prev_in, r = [], 0, float(res)
    for stage in stages:
        c_in, c_out = stage.channels
        inp = int(c_in * r * r * px)
        rows.append((inp, prev_in if stage.uses_skip else 0, int(c_out * (r * stage.scale) ** 2 * px), r))
        prev_in, r = inp, r * stage.scale
    return rows


def _peak(rows: Sequence[tuple[int, int, int, float]]) -> int:
    """What the layer-wise runner holds at once: one stage's input, skip and output canvases."""
    return max((a + b + c for a, b, c, _ in rows), default=0)


def splits(stages: Sequence[Stage], res: int, lat_h: int, lat_w: int, itemsize: int, *, encode: bool = False,
           batch: int = 1) -> list[Split]:
    """Every hand-over point between the runners (never between a resnet's halves, which share a skip) and the
    host bytes it needs, from the layer-wise run (most memory, one pass) to the fully streamed one."""
    rows, n = _canvases(stages, res, lat_h * lat_w * itemsize * batch), len(stages)
    out = []
    for k in range(n + 1):
        if k < n and stages[k].uses_skip:
            continue
        if encode:  # the input image stays referenced; the streamed head's output feeds the layer-wise tail
            head_out = rows[k - 1][2] if k else 0
            host = rows[0][0] + max(head_out, _peak(rows[k:]))
            pad = margin(list(stages[:k]), res) if k else 0
        else:  # the streamed tail reads the layer-wise head's output and writes the final image
            host = max(_peak(rows[:k]), rows[k][0] + rows[-1][2]) if k < n else _peak(rows)
            pad = margin(list(stages[k:]), int(rows[k][3])) if k < n else 0
        out.append(Split(k, n, host, pad, encode))
    return out


def choose(options: Sequence[Split], host_budget: int | None) -> Split:
    """The split streaming the fewest stages whose canvases fit `host_budget`; all streamed if None or none fits."""
    ordered = sorted(options, key=lambda s: s.streamed)
    if host_budget is not None:
        for option in ordered:
            if option.host_bytes <= host_budget:
                return option
    return ordered[-1]
