"""Tiled VAE decode/encode against the full decode and diffusers' own tiling, on the tiny VAE."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipelines.errors import ValidationError
from pipelines.tiling import Tile
from pipelines.vae_tiling import decode_cores, encode_cores, tile_cores, tiled_decode, tiled_encode

log = logging.getLogger(__name__)


@pytest.fixture
def vae(tiny_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()


def _latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float rounding: max error within `rel` of the output's scale (tiny VAE outputs reach ~10)."""
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@torch.no_grad()
def test_one_big_tile_is_exactly_the_plain_decode(vae) -> None:
    z = _latents(1, 4, 24, 40)
    assert torch.equal(tiled_decode(vae, z, tile_size=64, overlap=16), vae.decode(z).sample)


@torch.no_grad()
def test_tiled_path_with_one_tile_matches_plain_decode(vae) -> None:
    z = _latents(1, 4, 24, 40)
    _close(decode_cores(vae, z, [Tile(0, 0, 24, 40)]), vae.decode(z).sample)


@torch.no_grad()
def test_small_tiles_beat_diffusers_tiling(vae) -> None:
    z = _latents(1, 4, 96, 96)  # 768 x 768 output
    full = vae.decode(z).sample
    ours = tiled_decode(vae, z, tile_size=32, overlap=8)
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 32, 256, 0.25
    theirs = vae.decode(z).sample
    vae.disable_tiling()
    mae_ours, mae_theirs = (ours - full).abs().mean().item(), (theirs - full).abs().mean().item()
    log.warning("tiled VAE decode MAE vs full decode: ours %.3g, diffusers enable_tiling %.3g", mae_ours, mae_theirs)
    assert mae_ours <= 0.5 * mae_theirs
    _close(ours, full)  # layer-wise tiles with whole-image GroupNorm: exact up to float rounding


@torch.no_grad()
@pytest.mark.parametrize(("tile", "overlap"), [(8, 2), (13, 0), (16, 12)])
def test_non_square_batched_decode_shape_and_values(vae, tile: int, overlap: int) -> None:
    z = _latents(2, 4, 20, 36)
    out = tiled_decode(vae, z, tile_size=tile, overlap=overlap)
    assert out.shape == (2, 3, 160, 288)
    _close(out[1:], vae.decode(z[1:]).sample)


@torch.no_grad()
def test_tiled_encode_matches_full_encode(vae) -> None:
    images = torch.tanh(_latents(1, 3, 136, 200, seed=1))  # 17 x 25 latent: odd sizes
    full = vae.encode(images).latent_dist.mode()
    out = tiled_encode(vae, images, tile_size=64, overlap=16)
    assert out.shape == full.shape == (1, 4, 17, 25)
    _close(out, full)
    assert torch.equal(tiled_encode(vae, images, tile_size=256, overlap=16), full)
    _close(encode_cores(vae, images, [Tile(0, 0, 17, 25)]), full)


def test_tile_cores_partition_the_canvas() -> None:
    for height, width, tile, overlap in [(131, 250, 32, 8), (20, 36, 8, 2), (7, 9, 16, 4)]:
        cover = torch.zeros(height, width, dtype=torch.int64)
        for core in tile_cores(height, width, tile, overlap):
            assert core.h <= tile and core.w <= tile
            cover[core.slices] += 1
        assert bool((cover == 1).all())


def _max_conv_output(vae, run) -> int:
    """Largest activation any convolution of the decoder produces while `run()` executes."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o.numel())) for m in vae.decoder.modules()
             if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


@torch.no_grad()
def test_device_working_set_is_one_tile(vae) -> None:
    z = _latents(1, 4, 64, 64)
    full = _max_conv_output(vae, lambda: vae.decode(z))
    tiled = _max_conv_output(vae, lambda: tiled_decode(vae, z, tile_size=16, overlap=4))
    assert tiled * 8 < full


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to measure device memory")
@torch.no_grad()
def test_cuda_peak_memory_far_below_full_decode(vae) -> None:
    vae = vae.to("cuda")
    z = _latents(1, 4, 128, 128).to("cuda")
    torch.cuda.reset_peak_memory_stats()
    full = vae.decode(z).sample
    full_peak = torch.cuda.max_memory_allocated() - full.numel() * 4
    del full
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = tiled_decode(vae, z, tile_size=32, overlap=8)
    tiled_peak = torch.cuda.max_memory_allocated() - base
    log.warning("CUDA peak: full decode %.1f MB, tiled %.1f MB", full_peak / 1e6, tiled_peak / 1e6)
    assert out.shape == (1, 3, 1024, 1024)
    assert tiled_peak * 3 < full_peak


def test_invalid_arguments_rejected(vae) -> None:
    with pytest.raises(ValidationError) as err:
        tiled_decode(vae, _latents(1, 4, 16, 16), tile_size=8, overlap=8)
    assert err.value.field == "overlap"
    with pytest.raises(ValidationError) as err:
        tiled_encode(vae, torch.zeros(1, 3, 100, 100))
    assert err.value.field == "images"
