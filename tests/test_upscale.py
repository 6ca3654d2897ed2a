"""Upscalers: name listing and validation, safe spandrel loading, exact sizes, tiled == untiled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import ModelError, ValidationError
from pipelines.images import from_pil
from pipelines.lru import LRUCache
from pipelines.models import upscalers as upscale
from pipelines.request.hires import LATENT_MIN_DENOISE, is_latent
from pipelines.tiling import plan_cores, ramp_weights

NUM_BLOCKS = 1


def receptive_radius(num_blocks: int, scale: int = 4) -> float:
    """Receptive-field radius of old-arch RRDBNet in input pixels (all convs 3x3, stride 1)."""
    lr_convs = 1 + 15 * num_blocks + 1  # conv_first, 3 RDBs x 5 convs per RRDB, LR conv
    hr = 0.0
    factor = 1
    for _ in range(int(math.log2(scale))):  # nearest 2x upsample + conv
        factor *= 2
        hr += 1 / factor
    hr += 2 / scale  # HR conv + conv_last
    return lr_convs + hr


def rrdb_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random Real-ESRGAN x4 (old-arch RRDBNet) whose outputs mostly stay inside [0, 1]."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=NUM_BLOCKS, scale=4)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    *_, last_w, last_b = state  # conv_last: scale weights down, centre outputs on grey
    state[last_w] *= 10.0
    state[last_b].fill_(0.5)
    return state


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    folder = root / "upscalers"
    folder.mkdir()
    state = rrdb_state_dict()
    save_file(state, folder / "tiny_x4.safetensors")
    torch.save(state, folder / "tiny_x4.pth")
    (folder / "notes.txt").write_text("not a model")
    return root


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth-ish random image (so the model output is not all clamped)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def test_list_upscalers_builtins_then_files(models_dir):
    names = upscale.list_upscalers(models_dir)
    assert names[:6] == ["auto", "lanczos", "latent", "latent-antialiased", "latent-bicubic",
                         "latent-bicubic-antialiased"]
    assert names[-2:] == ["tiny_x4.pth", "tiny_x4.safetensors"]
    assert "notes.txt" not in names
    assert upscale.list_upscalers(models_dir / "missing") == list(upscale.BUILTIN_UPSCALERS)


def test_auto_picks_the_model_that_says_the_scale_then_esrgan_then_lanczos(tmp_path):
    folder = tmp_path / "upscalers"
    assert upscale.pick_upscaler(tmp_path, 4) == "lanczos"  # no models folder
    folder.mkdir()
    for name in ("a.pth", "RealESRGAN_x4plus.pth", "4x-UltraSharp.pth", "2x_foo.safetensors", "x40.pth", "n.txt"):
        (folder / name).write_bytes(b"")
    assert upscale.pick_upscaler(tmp_path, 4) == "RealESRGAN_x4plus.pth"  # says 4x and ESRGAN
    assert upscale.pick_upscaler(tmp_path, 2) == "2x_foo.safetensors"
    assert upscale.pick_upscaler(tmp_path, 3) == "RealESRGAN_x4plus.pth"  # nothing says 3x: ESRGAN first
    (folder / "RealESRGAN_x4plus.pth").unlink()
    assert upscale.pick_upscaler(tmp_path, 4) == "4x-UltraSharp.pth"
    assert upscale.pick_upscaler(tmp_path, 3) == "2x_foo.safetensors"  # then by name ("x40" is not 4x)
    assert upscale.concrete_upscaler("lanczos", tmp_path, 4) == "lanczos"
    assert upscale.concrete_upscaler("auto", tmp_path, 4) == "4x-UltraSharp.pth"


def test_is_latent():
    assert is_latent("latent") and is_latent("latent-nearest-exact")
    assert not is_latent("lanczos") and not is_latent("tiny_x4.pth")
    assert 0 < LATENT_MIN_DENOISE < 1


def test_resolve(models_dir):
    assert upscale.resolve_upscaler("lanczos", models_dir) == "lanczos"
    assert upscale.resolve_upscaler("tiny_x4.pth", models_dir) == models_dir / "upscalers" / "tiny_x4.pth"


@pytest.mark.parametrize("name", ["nope", "tiny_x4", "notes.txt", "../upscalers/tiny_x4.pth",
                                  "/etc/passwd", "sub\\x.pth", ".."])
def test_resolve_rejects_unknown_and_paths(models_dir, name):
    with pytest.raises(ValidationError) as err:
        upscale.resolve_upscaler(name, models_dir)
    assert err.value.field == "hires_upscaler"
    assert "lanczos" in str(err.value) or "path" in str(err.value)


@pytest.mark.parametrize("file", ["tiny_x4.safetensors", "tiny_x4.pth"])
def test_load_detects_esrgan_x4(models_dir, file):
    cache = LRUCache(2)
    model = upscale.load_upscaler(models_dir / "upscalers" / file, "cpu", torch.float32, cache)
    assert model.architecture.name == "ESRGAN"
    assert model.scale == 4
    assert upscale.load_upscaler(models_dir / "upscalers" / file, "cpu", torch.float32, cache) is model  # cached
    assert upscale.load_upscaler(models_dir / "upscalers" / file, "cpu", torch.float32) is not model  # no cache


def test_upscale_exact_size_and_modes(models_dir):
    model = upscale.load_upscaler(models_dir / "upscalers" / "tiny_x4.safetensors")
    for mode in ("RGB", "RGBA", "L"):
        out = upscale.upscale_with_model(model, noise_image(48, 40, mode))
        assert out.size == (192, 160) and out.mode == "RGB"


def test_tiled_equals_untiled(models_dir):
    model = upscale.load_upscaler(models_dir / "upscalers" / "tiny_x4.safetensors")
    radius = receptive_radius(NUM_BLOCKS)
    overlap = 2 * math.ceil(radius) + 2  # the blend reaches overlap / 2 into the context
    x = from_pil(noise_image(96, 80, seed=1), device="cpu", dtype=torch.float32, value_range="unit")
    whole = upscale.upscale_tensor(model, x, tile=1024)
    calls = []
    tiled = upscale.upscale_tensor(model, x, tile=32, overlap=overlap, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (9, 9)
    assert tiled.shape == whole.shape == (1, 3, 320, 384)
    assert whole.std() > 0.05  # not a constant (clamped) image
    assert torch.allclose(tiled, whole, atol=1e-4)
    # a small overlap is not exact: the test above can fail
    seamy = upscale.upscale_tensor(model, x, tile=32, overlap=4)
    assert (seamy - whole).abs().max() > 1e-3


def _old_blend(model, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """The upscaler's own blend before it used pipelines.tiling's kernel: [1, 1, H, W] weight canvas, plain divide."""
    _, _, h, w = x.shape
    s = model.scale
    canvas, weight = torch.zeros(1, 3, h * s, w * s), torch.zeros(1, 1, h * s, w * s)
    with torch.inference_mode():
        for top, bottom in plan_cores(h, tile):
            y0, y1 = max(0, top - overlap), min(h, bottom + overlap)
            wy = ramp_weights(top, bottom, y0, y1, overlap, s)
            for left, right in plan_cores(w, tile):
                x0, x1 = max(0, left - overlap), min(w, right + overlap)
                wt = wy[:, None] * ramp_weights(left, right, x0, x1, overlap, s)[None, :]
                canvas[:, :, y0 * s:y1 * s, x0 * s:x1 * s] += model(x[:, :, y0:y1, x0:x1]).float().cpu() * wt
                weight[:, :, y0 * s:y1 * s, x0 * s:x1 * s] += wt
    return canvas / weight


@pytest.mark.parametrize(("tile", "overlap"), [(32, 6), (24, 0), (40, 17)])
def test_shared_blend_kernel_is_bit_identical_to_the_old_blend(models_dir, tile, overlap):
    model = upscale.load_upscaler(models_dir / "upscalers" / "tiny_x4.safetensors")
    x = from_pil(noise_image(72, 56, seed=2), device="cpu", dtype=torch.float32, value_range="unit")
    new = upscale.upscale_tensor(model, x, tile=tile, overlap=overlap)
    assert torch.equal(new, _old_blend(model, x, tile, overlap))


def test_receptive_radius_matches_model():
    """The analytic radius bounds how far a one-pixel change spreads (in float64, before clamping)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=NUM_BLOCKS, scale=4).double()
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64)
    y = x.clone()
    y[0, :, 24, 24] += 0.5
    with torch.no_grad():
        changed = (net(x) - net(y)).abs().sum(1)[0] > 0
    rows = torch.nonzero(changed.any(1)).flatten()
    reach = max(24 * 4 - rows.min().item(), rows.max().item() - (25 * 4 - 1)) / 4
    assert reach == receptive_radius(NUM_BLOCKS)


def test_ramp_weights_partition_of_unity():
    cores = plan_cores(100, 30)
    total = torch.zeros(200)
    for start, end in cores:
        lo, hi = max(0, start - 10), min(100, end + 10)
        total[lo * 2:hi * 2] += ramp_weights(start, end, lo, hi, 10, 2)
    assert torch.allclose(total, torch.ones(200))


def test_upscale_image_sizes(models_dir):
    image = noise_image(48, 40)
    out = upscale.upscale_image(image, "lanczos", scale=1.5, models_dir=models_dir)
    assert out.size == (72, 60)
    out = upscale.upscale_image(image, "lanczos", size=(101, 37), models_dir=models_dir)
    assert out.size == (101, 37)
    out = upscale.upscale_image(image, "tiny_x4.pth", scale=2, models_dir=models_dir)
    assert out.size == (96, 80)  # 4x model, then Lanczos down to the exact 2x target
    with pytest.raises(ValidationError):
        upscale.upscale_image(image, "latent", scale=2, models_dir=models_dir)
    with pytest.raises(ValidationError):
        upscale.upscale_image(image, "lanczos", models_dir=models_dir)


def test_upscale_latents_modes():
    latents = torch.randn(1, 4, 8, 10)
    for mode in upscale.LATENT_MODES:
        out = upscale.upscale_latents(latents, (16, 20), mode)
        assert out.shape == (1, 4, 16, 20) and out.dtype == latents.dtype
    nearest = upscale.upscale_latents(latents, (16, 20), "latent-nearest-exact")
    assert torch.equal(nearest[..., ::2, ::2], latents)
    with pytest.raises(ValidationError):
        upscale.upscale_latents(latents, (16, 20), "lanczos")


def test_text_file_renamed_safetensors(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_text("hello, I am not a model")
    with pytest.raises(ModelError, match="fake.safetensors"):
        upscale.load_upscaler(path)


def test_pth_with_random_tensors(tmp_path):
    path = tmp_path / "random.pth"
    torch.save({"foo.weight": torch.randn(3, 3), "bar": torch.randn(2)}, path)
    with pytest.raises(ModelError, match="random.pth.*spandrel"):
        upscale.load_upscaler(path)


def test_pth_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state": Path("/tmp")}, path)  # an arbitrary object: the restricted unpickler refuses it
    with pytest.raises(ModelError, match="evil.pth"):
        upscale.load_upscaler(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        upscale.load_upscaler(tmp_path / "gone.safetensors")
