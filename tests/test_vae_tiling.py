"""Tiled VAE decode/encode against the full decode and diffusers' own tiling, on the tiny VAE."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipelines.errors import ValidationError
from pipelines.tiling import Tile
from pipelines.vae.stages import decoder_stages, encoder_stages, tile_cores
from pipelines.vae.stream import choose, margin, splits
from pipelines.vae.tiling import decode_cores, decode_splits, encode_cores, tiled_decode, tiled_encode

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


@torch.no_grad()
@pytest.mark.parametrize(("shape", "tile", "overlap"), [((1, 4, 48, 48), 16, 4), ((2, 4, 20, 36), 8, 2),
                                                        ((1, 4, 25, 13), 13, 0)])
def test_streamed_decode_equals_full_decode(vae, shape, tile: int, overlap: int) -> None:
    z = _latents(*shape, seed=3)
    out = tiled_decode(vae, z, tile_size=tile, overlap=overlap, mode="stream")
    _close(out, vae.decode(z).sample)  # exact statistics + a context margin >= the receptive field


@torch.no_grad()
def test_streamed_encode_equals_full_encode(vae) -> None:
    images = torch.tanh(_latents(1, 3, 136, 200, seed=1))
    full = vae.encode(images).latent_dist.mode()
    _close(tiled_encode(vae, images, tile_size=64, overlap=16, mode="stream"), full)


def test_stream_margin_is_the_receptive_field(vae) -> None:
    # hand count from the modules: each resnet has two 3x3 convs (1 px each at its resolution), an upsampler's
    # conv adds 1 px at twice the resolution (0.5 px at the block's), conv_out 1 px at full resolution
    stages = decoder_stages(vae.decoder)
    hand = 0.0
    res = 1
    for block in vae.decoder.up_blocks:
        n = len(block.resnets)
        hand += (2 * n + (0.5 if block.upsamplers is not None else 0)) / res
        res *= 2 if block.upsamplers is not None else 1
    hand += 1 / res
    assert margin(stages, 1) == int(-(-hand // 1))
    assert margin(encoder_stages(vae.encoder), 8) >= 1


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@torch.no_grad()
def test_stream_never_holds_a_full_size_activation(vae) -> None:
    def largest(side: int, mode: str) -> int:
        with _Largest() as seen:
            tiled_decode(vae, _latents(1, 4, side, side), tile_size=16, overlap=4, mode=mode)
        return seen.numel

    exact, stream, stream_big = largest(72, "exact"), largest(72, "stream"), largest(144, "stream")
    log.warning("largest tensor (elements) at 576²: exact %d, stream %d (at 1152²: %d)", exact, stream, stream_big)
    assert exact >= 16 * 576 * 576  # layer-wise canvases: the tiny decoder's widest full-resolution layer
    # streamed: one tile's working set (about the same at any size: windows of the largest core plus the margin)
    # or the 3-channel output, whichever is larger
    assert stream_big <= max(3 * 1152 * 1152, 1.25 * stream)
    assert stream * 4 < exact


class _Live(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the peak bytes of live full-size canvases: tensors as large as the whole `side`² latent at some
    resolution (1x-8x), which no tile temporary is when tiles are smaller than the image."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.sides, self.live, self.peak = {side * r for r in (1, 2, 4, 8)}, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[-1] in self.sides and o.shape[-2] in self.sides:
                key = o.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = o.untyped_storage().nbytes()
                    weakref.finalize(o.untyped_storage(), self.live.pop, key, None)
                self.peak = max(self.peak, sum(self.live.values()))
        return out


def test_layerwise_store_estimate_covers_the_canvases(vae) -> None:
    z = _latents(1, 4, 64, 64)
    options = decode_splits(vae, 64, 64)
    layerwise = options[-1]
    assert (layerwise.at, layerwise.streamed, layerwise.margin) == (layerwise.stages, 0, 0)
    with _Live(64) as live, torch.no_grad():
        tiled_decode(vae, z, tile_size=16, overlap=4, mode="exact")
    log.warning("layer-wise canvases at 512²: measured %d B, estimated %d B", live.peak, layerwise.host_bytes)
    assert 0.7 * layerwise.host_bytes <= live.peak <= 1.3 * layerwise.host_bytes
    # SD's VAE at 4096² in fp16: about 17 GB layer-wise, the reason stream mode exists; ~6 GB streaming the
    # stages above 2048², ~0.4 GB streaming all of them
    from diffusers import AutoencoderKL

    from benchmarks.realsize import VAE

    with torch.device("meta"):
        sd = AutoencoderKL(**VAE).to(torch.float16)
    sd_options = decode_splits(sd, 512, 512)
    assert 15e9 < sd_options[-1].host_bytes < 20e9
    assert any(5e9 < s.host_bytes < 8e9 for s in sd_options)
    assert sd_options[0].at == 0 and sd_options[0].host_bytes < 0.5e9 and sd_options[0].margin == 13


@torch.no_grad()
def test_every_hand_over_between_layer_wise_and_streamed_is_exact(vae) -> None:
    # decode: the low-resolution head layer by layer, the rest tile by tile, for every hand-over point
    z = _latents(1, 4, 40, 48, seed=5)
    full = vae.decode(z).sample
    options = decode_splits(vae, 40, 48)
    assert len(options) >= 4 and [s.at for s in options] == sorted(s.at for s in options)
    budgets = sorted({s.host_bytes for s in options})
    chosen = [choose(options, b) for b in budgets]
    assert [c.streamed for c in chosen] == sorted((c.streamed for c in chosen), reverse=True)  # more room, fewer
    assert all(c.host_bytes <= b for c, b in zip(chosen, budgets, strict=True))
    assert choose(options, None).streamed == options[0].stages and choose(options, 1).at == 0  # nothing fits
    for budget in budgets:
        _close(tiled_decode(vae, z, tile_size=16, overlap=4, mode="stream", host_budget=budget), full)
    # encode: the high-resolution head tile by tile, the rest layer by layer
    images = torch.tanh(_latents(1, 3, 136, 200, seed=1))
    full_enc = vae.encode(images).latent_dist.mode()
    enc = splits(encoder_stages(vae.encoder), 8, 17, 25, 4, encode=True)
    assert choose(enc, None).at == enc[0].stages and enc[-1].streamed == enc[-1].stages and enc[0].streamed == 0
    for budget in sorted({s.host_bytes for s in enc}):
        assert choose(enc, budget).host_bytes <= budget
        _close(tiled_encode(vae, images, tile_size=64, overlap=16, mode="stream", host_budget=budget), full_enc)


@torch.no_grad()
def test_hybrid_stream_holds_only_the_canvases_of_its_layer_wise_head(vae) -> None:
    z = _latents(1, 4, 64, 64, seed=2)
    options = decode_splits(vae, 64, 64)
    middle = next(s for s in options if 0 < s.at < s.stages and s.host_bytes < options[-1].host_bytes)
    peaks = {}
    for name, budget in (("hybrid", middle.host_bytes), ("layer-wise", None)):
        with _Live(64) as live:
            tiled_decode(vae, z, tile_size=16, overlap=4, mode="stream" if budget else "exact", host_budget=budget)
        peaks[name] = live.peak
    log.warning("canvas peak at 512²: hybrid %d B (estimate %d), layer-wise %d B", peaks["hybrid"],
                middle.host_bytes, peaks["layer-wise"])
    assert peaks["hybrid"] <= 1.3 * middle.host_bytes
    assert peaks["hybrid"] < 0.8 * peaks["layer-wise"]


def test_invalid_arguments_rejected(vae) -> None:
    with pytest.raises(ValidationError) as err:
        tiled_decode(vae, _latents(1, 4, 16, 16), tile_size=8, overlap=8)
    assert err.value.field == "overlap"
    with pytest.raises(ValidationError) as err:
        tiled_encode(vae, torch.zeros(1, 3, 100, 100))
    assert err.value.field == "images"
    with pytest.raises(ValidationError) as err:
        tiled_decode(vae, _latents(1, 4, 16, 16), tile_size=8, overlap=2, mode="fast")
    assert err.value.field == "mode"


@pytest.fixture
def one_thread():
    """One intra-op thread: tile-by-tile work on the shared CI cores ran 10x slower with two (OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_replicas(vae):
    """The VAE and an identical copy as two CPU "devices", with a counter of the copy's own convolutions."""
    import copy

    from pipelines.serving.multi_device import DeviceReplicas

    twin = copy.deepcopy(vae)
    ran = []
    for m in twin.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda *_: ran.append(1))
    return DeviceReplicas([(vae, "cpu"), (twin, "cpu")]), ran


@torch.no_grad()
@pytest.mark.parametrize("budget", [None, "hybrid"])
def test_tiled_decode_over_two_replicas_is_bit_identical_to_one_device(vae, budget, one_thread) -> None:
    z = _latents(1, 4, 24, 32, seed=7)
    options = decode_splits(vae, 24, 32)
    host = next(s.host_bytes for s in options if 0 < s.at < s.stages) if budget else None
    mode = "stream" if budget else "exact"  # hybrid: a layer-wise head, the rest streamed (both runners)
    one = tiled_decode(vae, z, tile_size=12, overlap=2, mode=mode, host_budget=host)
    replicas, ran = _two_replicas(vae)
    split = tiled_decode(vae, z, tile_size=12, overlap=2, mode=mode, host_budget=host, replicas=replicas)
    assert torch.equal(split, one)  # same tiles, same kernels, moments merged in the same order
    first, second = replicas.calls
    assert second > 0 and abs(first - second) <= 1 and ran  # the copy's own modules ran its share


@torch.no_grad()
@pytest.mark.parametrize("mode", ["exact", "stream"])
def test_tiled_encode_over_two_replicas_is_bit_identical_to_one_device(vae, mode, one_thread) -> None:
    images = torch.tanh(_latents(1, 3, 96, 128, seed=1))
    one = tiled_encode(vae, images, tile_size=48, overlap=16, mode=mode)
    replicas, ran = _two_replicas(vae)
    split = tiled_encode(vae, images, tile_size=48, overlap=16, mode=mode, replicas=replicas)
    assert torch.equal(split, one)
    first, second = replicas.calls
    assert second > 0 and abs(first - second) <= 1 and ran
