"""Tile geometry, blend weights, blending exactness and the seam metric (pipelines.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import ValidationError
from pipelines.tiling import (
    Tile,
    accumulate,
    finish,
    grid_offset,
    new_canvas,
    plan_tiles,
    seam_score,
    tile_boundaries,
    tile_starts,
    tile_weights,
)


def _cover_count(tiles: list[Tile], height: int, width: int) -> np.ndarray:
    """How many tiles cover each latent pixel (2-D difference array, vectorised for big plans)."""
    diff = np.zeros((height + 1, width + 1), dtype=np.int64)
    y0, x0, h, w = (np.array(v) for v in zip(*[(t.y, t.x, t.h, t.w) for t in tiles], strict=True))
    y1, x1 = y0 + h, x0 + w
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(diff, (ys, xs), sign)
    return diff.cumsum(0).cumsum(1)[:height, :width]


def _check_plan(tiles: list[Tile], height: int, width: int) -> None:
    """Every pixel covered, one tile shape, every tile inside the canvas."""
    assert len({(t.h, t.w) for t in tiles}) == 1
    for t in tiles:
        assert t.y >= 0 and t.y + t.h <= height and t.x >= 0 and t.x + t.w <= width
    assert bool((_cover_count(tiles, height, width) > 0).all())


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(8, 400),
    width=st.integers(8, 400),
    tile=st.integers(8, 160),
    overlap_frac=st.floats(0, 0.9),
    dy=st.integers(0, 500),
    dx=st.integers(0, 500),
)
def test_tiles_cover_canvas(height: int, width: int, tile: int, overlap_frac: float, dy: int, dx: int) -> None:
    overlap = int(tile * overlap_frac)
    for offset in ((0, 0), (dy, dx)):
        _check_plan(plan_tiles(height, width, tile, overlap, offset), height, width)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 600), tile=st.integers(2, 200), overlap_frac=st.floats(0, 0.9))
def test_neighbours_overlap_at_least_requested(size: int, tile: int, overlap_frac: float) -> None:
    overlap = int(tile * overlap_frac)
    starts = tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] == size - t
    assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_2000px_wide_has_no_uncovered_strip() -> None:
    height, width = 1048 // 8, 2000 // 8  # 131 x 250 latent: 250 - 96 is not a multiple of the stride 64
    tiles = plan_tiles(height, width, 96, 32)
    _check_plan(tiles, height, width)
    assert max(t.x + t.w for t in tiles) == width and max(t.y + t.h for t in tiles) == height
    wsum = torch.zeros(height, width)
    for t in tiles:
        wsum[t.slices] += tile_weights(t.h, t.w, "gaussian")
    assert bool((wsum > 0).all())


def test_small_canvas_is_one_tile() -> None:
    assert plan_tiles(40, 60, 96, 32) == [Tile(0, 0, 40, 60)]
    assert plan_tiles(40, 60, 96, 32, offset=(13, 7)) == [Tile(0, 0, 40, 60)]


def test_offset_moves_the_grid() -> None:
    plain = plan_tiles(200, 200, 64, 16)
    shifted = plan_tiles(200, 200, 64, 16, offset=(10, 20))
    assert tile_boundaries(plain) != tile_boundaries(shifted)
    _check_plan(shifted, 200, 200)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((64, 64, 32, 32), "overlap"),
        ((64, 64, 0, 0), "tile_size"),
        ((64, 64, 32, -1), "overlap"),
        ((0, 64, 32, 8), "height"),
    ],
)
def test_invalid_arguments_name_the_field(args: tuple[int, int, int, int], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        plan_tiles(*args)
    assert err.value.field == field


@pytest.mark.parametrize(("h", "w"), [(96, 96), (17, 40), (1, 5), (128, 64)])
def test_gaussian_weights_symmetric_and_positive(h: int, w: int) -> None:
    weights = tile_weights(h, w, "gaussian")
    assert weights.shape == (h, w) and weights.dtype == torch.float32
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))
    assert bool((weights > 0).all())
    assert weights[h // 2, w // 2] == weights.max()
    assert torch.equal(tile_weights(h, w, "average"), torch.ones(h, w))


def test_unknown_blend_mode_rejected() -> None:
    with pytest.raises(ValidationError):
        tile_weights(8, 8, "median")  # type: ignore[arg-type]


def test_grid_offset_reproducible_and_in_range() -> None:
    offsets = [grid_offset(42, step, 96, 32) for step in range(50)]
    assert offsets == [grid_offset(42, step, 96, 32) for step in range(50)]
    assert all(0 <= o < 64 for pair in offsets for o in pair)
    assert len(set(offsets)) > 40
    assert offsets != [grid_offset(43, step, 96, 32) for step in range(50)]
    state = torch.random.get_rng_state()
    grid_offset(1, 1, 96, 32)
    assert torch.equal(state, torch.random.get_rng_state())


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    """A model whose output at a pixel depends only on that pixel: a fixed 1x1 convolution plus a bias."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 4, generator=gen)
    return torch.einsum("oc,bchw->bohw", weight, x) + 0.25


@pytest.mark.parametrize("mode", ["average", "gaussian"])
@pytest.mark.parametrize("offset", [(0, 0), (11, 29)])
def test_blending_pointwise_model_is_exact(mode: str, offset: tuple[int, int]) -> None:
    height, width = 131, 250  # 1048 x 2000 px
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(0))
    canvas, wsum = new_canvas(2, 4, height, width)
    for tile in plan_tiles(height, width, 96, 32, offset):
        out = _pointwise(x[..., tile.slices[0], tile.slices[1]])
        accumulate(canvas, wsum, tile, out, tile_weights(tile.h, tile.w, mode))
    expected = _pointwise(x)
    torch.testing.assert_close(finish(canvas, wsum), expected, rtol=1e-6, atol=1e-6)


def test_accumulate_in_float32_for_half_values() -> None:
    canvas, wsum = new_canvas(1, 1, 4, 4)
    tile = Tile(0, 0, 4, 4)
    accumulate(canvas, wsum, tile, torch.full((1, 1, 4, 4), 3.0, dtype=torch.float16), tile_weights(4, 4))
    assert canvas.dtype == torch.float32 and torch.equal(finish(canvas, wsum), torch.full((1, 1, 4, 4), 3.0))


def test_tile_boundaries_inside_image() -> None:
    tiles = [Tile(0, 0, 10, 10), Tile(0, 6, 10, 10), Tile(6, 0, 10, 10), Tile(6, 6, 10, 10)]
    assert tile_boundaries(tiles, scale=8) == ([48, 80], [48, 80])
    assert tile_boundaries([Tile(0, 0, 10, 10)]) == ([], [])


def _gradient_image(h: int = 96, w: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx / w * 200, yy / h * 150, (xx + yy) / (h + w) * 255], axis=-1)


def test_seam_score_smooth_image_is_one() -> None:
    score = seam_score(_gradient_image(), [32, 64, 96], [48])
    assert score == pytest.approx(1.0, abs=0.05)


def test_seam_score_detects_a_step_on_a_boundary() -> None:
    image = _gradient_image()
    image[:, 64:] += 40.0
    assert seam_score(image, [32, 64, 96], [48]) > 10


def test_seam_score_accepts_pil_and_handles_no_boundaries() -> None:
    from PIL import Image

    pil = Image.fromarray(_gradient_image().clip(0, 255).astype(np.uint8))
    assert seam_score(pil, [64], []) == pytest.approx(1.0, abs=0.35)
    assert np.isnan(seam_score(pil, [], []))
