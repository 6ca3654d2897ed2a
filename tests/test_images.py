"""The one PIL <-> tensor module: the conversions the VAE, ControlNet maps and upscalers had before, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import images


def _photo(w: int = 40, h: int = 24, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_from_pil_matches_the_former_formulas(mode):
    image = _photo(mode=mode)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    signed = torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1)[None]  # vae_io.from_pil before
    unit = torch.from_numpy((rgb / 255.0).copy()).permute(2, 0, 1)[None]  # control / upscale before
    assert torch.equal(images.from_pil(image, 40, 24, "cpu", torch.float32), signed)
    assert torch.equal(images.from_pil(image, value_range="unit"), unit)
    resized = images.from_pil(image, 20, 16)
    expected = np.asarray(image.convert("RGB").resize((20, 16), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(resized, torch.from_numpy(expected).permute(2, 0, 1)[None])
    assert images.from_pil(image, dtype=torch.float16).dtype == torch.float16


def test_to_pil_matches_the_former_formulas_and_rounds_to_nearest():
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some out of range
    before = x.clone()
    signed = [np.asarray(im) for im in images.to_pil(x)]
    old = x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack(signed), old)
    u = (x + 1) / 2
    unit = np.asarray(images.to_pil(u, value_range="unit")[0])
    old_unit = u[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()  # upscale._to_image
    assert np.array_equal(unit, old_unit)
    assert torch.equal(x, before)  # the caller's tensor is left alone
    assert np.asarray(images.to_pil(torch.full((1, 3, 1, 1), 0.6 / 127.5 - 1))[0])[0, 0, 0] == 1  # 0.6 -> 1, not 0


def test_round_trip_is_exact():
    image = _photo()
    for value_range in images.VALUE_RANGES:
        back = images.to_pil(images.from_pil(image, value_range=value_range), value_range=value_range)[0]
        assert np.array_equal(np.asarray(back), np.asarray(image))
    with pytest.raises(ValueError, match="value_range"):
        images.from_pil(image, value_range="bytes")
