"""The control map really reaches the network: the tiny ControlNet's conditioning path is live, and the map under
each tile is the untiled map's region (a pointwise fake ControlNet: tiled == untiled)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.denoise.loop import ControlInput, TileSpec
from pipelines.denoise.stages import StageSpec, run_stage
from pipelines.request.schema import ControlUnit


def _maps() -> dict[str, Image.Image]:
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {"black": Image.new("RGB", (64, 64)), "square": Image.fromarray(square), "noise": Image.fromarray(noise)}


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_tiny_controlnet_conditioning_embedding_is_not_zero(manager):
    from pipelines.control.models import load_controlnet
    from pipelines.models.tiny import ensure_tiny_controlnet

    manager.get("tiny")
    cn = load_controlnet(str(ensure_tiny_controlnet("tiny")), allow_paths=True, models_dir=manager.models_dir)
    assert cn.controlnet_cond_embedding.conv_out.weight.abs().max() > 0  # from_unet leaves it all zeros


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_different_maps_give_different_images_and_the_same_map_the_same(engine, req_factory, model):
    def run(name: str) -> np.ndarray:
        unit = ControlUnit(_maps()[name], "none", scale=1.0)  # "none": the image is the map, no preprocessing
        return _arr(engine.generate(req_factory(model=model, control=(unit,)), save=False).images[0])

    images = {name: run(name) for name in _maps()}
    for a, b in (("black", "square"), ("black", "noise"), ("square", "noise")):
        assert np.abs(images[a] - images[b]).max() > 0, f"{a} and {b} maps gave the same image"
    assert np.array_equal(run("square"), images["square"])


class PointwiseControlNet:
    """Closed-form ControlNet: the residual at a latent pixel is the mean of the map's pixels over that latent
    pixel (an 8x8 block), so it depends only on the map region under it."""

    dtype = torch.float32

    def __call__(self, sample, t, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                 guess_mode=False, added_cond_kwargs=None, return_dict=False):
        scale = controlnet_cond.shape[-1] // sample.shape[-1]
        assert controlnet_cond.shape[-2:] == (sample.shape[-2] * scale, sample.shape[-1] * scale)
        block = F.avg_pool2d(controlnet_cond.float(), scale)  # [B, 3, h, w]
        res = (block * torch.tensor([1.0, -0.5, 0.25]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        res = (res * conditioning_scale).expand_as(sample).to(sample.dtype)
        return [res], res


class PointwiseControlledUNet:
    """A pointwise UNet (output at a pixel from that pixel only) that adds the ControlNet residual pixel by pixel."""

    dtype = torch.float32

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(4, 4, generator=g) * 0.1 + torch.eye(4) * 0.5
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        self.shapes.append(tuple(sample.shape))
        text = encoder_hidden_states.float().mean(dim=(1, 2))[:, None, None, None]
        a = 0.5 + 0.4 * torch.cos(torch.as_tensor(timestep, dtype=torch.float32) / 300.0)
        out = torch.einsum("bchw,cd->bdhw", sample.float(), self.mix) * a + 0.3 * text
        if down_block_additional_residuals is not None:
            out = out + down_block_additional_residuals[0].float()
        return (out.to(sample.dtype),)


def _control_map(h: int, w: int) -> torch.Tensor:
    """A map in which every 8x8 block differs from its neighbours (any misplaced crop changes the result)."""
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_tiled_control_equals_untiled_for_pointwise_controlnet(manager, engine, sampler):
    tiny = manager.get("tiny")
    w, h = 1000, 520  # latent 125 x 65: uneven tiles, the last one clamped to the edge
    spec = StageSpec(prompt="a fox", negative_prompt="blur", width=w, height=h, steps=3, sampler=sampler,
                     cfg="6", seeds=[11], control=[ControlInput(PointwiseControlNet(), _control_map(h, w), 0.8)])
    untiled = run_stage(tiny, spec, cache=engine.prompt_cache, unet=PointwiseControlledUNet()).latents
    unet = PointwiseControlledUNet()
    tiled = run_stage(tiny, replace(spec, tiles=TileSpec(size=32, overlap=8, blend="gaussian", batch=3, shift=True)),
                      cache=engine.prompt_cache, unet=unet).latents
    assert max(s[-1] for s in unet.shapes) == 32  # really tiled
    no_map = run_stage(tiny, replace(spec, control=[]), cache=engine.prompt_cache, unet=PointwiseControlledUNet())
    assert (untiled - no_map.latents).abs().max() > 0.05  # the map matters here, so a wrong crop would show
    torch.testing.assert_close(tiled, untiled, atol=2e-5, rtol=1e-5)
