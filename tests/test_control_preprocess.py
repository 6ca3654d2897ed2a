"""ControlNet preprocessing and loading: canny, pass-through, missing annotators, resize rule, uploads, models."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.control.images import MAX_CONTROL_PIXELS, crop_box, load_control_image, prepare_control_image
from pipelines.control.models import CONTROLNET_CATALOGUE, list_controlnets, load_controlnet
from pipelines.control.preprocessors import preprocess
from pipelines.errors import ModelError, OfflineError, ValidationError
from pipelines.lru import LRUCache


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Random blocks, so there are plenty of edges of different strengths."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return image


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# ----- canny / none / annotators --------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(100, 200), (20, 60), (150, 250)])
def test_canny_matches_opencv(low, high):
    image = photo()
    out = preprocess("canny", image, low=low, high=high)
    expected = cv2.Canny(np.asarray(image.convert("L")), low, high)
    assert out.mode == "RGB" and out.size == image.size
    array = np.asarray(out)
    for c in range(3):
        assert np.array_equal(array[..., c], expected)
    assert set(np.unique(array)) <= {0, 255}


def test_canny_accepts_whole_floats_from_sliders():
    image = photo()
    assert preprocess("canny", image, low=50.0, high=150.0) == preprocess("canny", image, low=50, high=150)


def test_canny_thresholds_matter():
    image = photo()
    loose = np.asarray(preprocess("canny", image, low=10, high=30))
    strict = np.asarray(preprocess("canny", image, low=200, high=255))  # the top of A1111's 1-255
    assert loose.sum() > strict.sum()


@pytest.mark.parametrize(("low", "high"), [(-1, 100), (0, 100), (100, 256), (200, 100), (10.5, 100)])
def test_canny_bad_thresholds(low, high):
    with pytest.raises(ValidationError, match="canny"):
        preprocess("canny", photo(), low=low, high=high)


def test_none_passes_through():
    image = photo()
    out = preprocess("none", image.convert("RGBA"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))


def test_unknown_preprocessor():
    with pytest.raises(ValidationError, match="canny"):
        preprocess("sobel", photo())


def test_missing_controlnet_aux_names_package_and_file(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import controlnet_aux -> ImportError
    with pytest.raises(ModelError) as err:
        preprocess("depth", photo(), annotators_dir=tmp_path / "annotators")
    message = str(err.value)
    assert "controlnet-aux" in message
    assert "dpt_hybrid-midas-501f0c75.pt" in message and str(tmp_path / "annotators") in message
    assert "canny" in message


def test_missing_weight_file_names_file(monkeypatch, tmp_path):
    fake = type(sys)("controlnet_aux")
    monkeypatch.setitem(sys.modules, "controlnet_aux", fake)  # the package is "installed", weights are not
    (tmp_path / "body_pose_model.pth").write_bytes(b"x")
    with pytest.raises(ModelError) as err:
        preprocess("openpose", photo(), annotators_dir=tmp_path)
    message = str(err.value)
    assert "hand_pose_model.pth" in message and "facenet.pth" in message
    assert "body_pose_model.pth" not in message and "pip install" not in message


def test_annotator_uses_local_folder(monkeypatch, tmp_path):
    """A stand-in controlnet-aux: the detector is built from the local folder and called with its options."""
    seen = {}

    class FakeHED:
        @classmethod
        def from_pretrained(cls, path):
            seen["path"] = path
            return cls()

        def __call__(self, image, **kwargs):
            seen.update(kwargs)
            return Image.new("RGB", (32, 32), "white")

    fake = type(sys)("controlnet_aux")
    fake.HEDdetector = FakeHED
    monkeypatch.setitem(sys.modules, "controlnet_aux", fake)
    (tmp_path / "ControlNetHED.pth").write_bytes(b"x")
    out = preprocess("scribble", photo(), annotators_dir=tmp_path)
    assert out.size == photo().size and seen["path"] == str(tmp_path) and seen["scribble"] is True


# ----- control images -------------------------------------------------------------------------------


def test_prepare_same_aspect_resizes_directly():
    tensor = prepare_control_image(photo(96, 64), 48, 32)
    assert tensor.shape == (1, 3, 32, 48) and tensor.dtype == torch.float32
    assert tensor.min() >= 0 and tensor.max() <= 1
    assert crop_box(200, 100, 101, 50) == (0, 0, 200, 100)  # 1% off: no crop


def x_ramp(width: int, height: int) -> Image.Image:
    """Red channel = x coordinate (0..255 across), green = y coordinate."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8))


def test_prepare_wide_image_takes_centre_crop():
    # 200x100 into 64x64: cover scale -> 128x64, keep the middle half of the width (x 50..150).
    tensor = prepare_control_image(x_ramp(200, 100), 64, 64)
    assert tensor.shape == (1, 3, 64, 64)
    red = tensor[0, 0] * 255
    assert red[:, 0].mean() == pytest.approx(50 / 199 * 255, abs=4)
    assert red[:, -1].mean() == pytest.approx(150 / 199 * 255, abs=4)
    green = tensor[0, 1] * 255  # full height kept
    assert green[0].mean() == pytest.approx(0, abs=4) and green[-1].mean() == pytest.approx(255, abs=4)


def test_prepare_tall_image_takes_centre_crop():
    tensor = prepare_control_image(x_ramp(100, 300), 80, 40)  # keep y 125..175
    assert tensor.shape == (1, 3, 40, 80)
    green = tensor[0, 1] * 255
    assert green[0].mean() == pytest.approx(125 / 299 * 255, abs=4)
    assert green[-1].mean() == pytest.approx(175 / 299 * 255, abs=4)
    assert crop_box(100, 300, 80, 40) == (0.0, 125.0, 100.0, 175.0)


def test_prepare_rejects_bad_size():
    with pytest.raises(ValidationError, match="width"):
        prepare_control_image(photo(), 0, 64)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_load_control_image_formats(tmp_path, fmt):
    path = tmp_path / f"c.{fmt.lower()}"
    photo().convert("RGB").save(path, format=fmt)
    image = load_control_image(path)
    assert image.mode == "RGB" and image.size == (96, 64)
    assert load_control_image(png_bytes(photo(), fmt)).size == (96, 64)


def test_load_control_image_inputs():
    assert load_control_image(photo().convert("L")).mode == "RGB"
    assert load_control_image(np.zeros((8, 9, 3), np.uint8)).size == (9, 8)


@pytest.mark.parametrize("data", [b"definitely not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_non_image_bytes(data):
    with pytest.raises(ValidationError) as err:
        load_control_image(data)
    assert err.value.field == "control image" and "PNG/JPEG/WebP" in str(err.value)


def test_truncated_and_wrong_format(tmp_path):
    data = png_bytes(photo(256, 256), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValidationError, match="cut.jpg"):
        load_control_image(path)
    gif = tmp_path / "anim.gif"
    photo().save(gif, format="GIF")
    with pytest.raises(ValidationError, match="GIF"):
        load_control_image(gif)


def test_decompression_bomb_rejected_from_header():
    # A 10000 x 10000 PNG (100 MP) compresses to a few hundred KB; it must be refused before decoding.
    bomb = Image.new("L", (10000, 10000))
    data = png_bytes(bomb)
    with pytest.raises(ValidationError, match="MP"):
        load_control_image(data)
    assert Image.MAX_IMAGE_PIXELS != MAX_CONTROL_PIXELS  # the global limit is left alone


# ----- ControlNet models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cn_models(tiny_dir, tmp_path_factory) -> Path:
    from pipelines.models.tiny import build_tiny_controlnet

    models = tmp_path_factory.mktemp("models")
    folder = build_tiny_controlnet(tiny_dir, models / "controlnet" / "cn")
    single = models / "controlnet" / "single.safetensors"
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", single)
    shutil.copyfile(folder / "config.json", models / "controlnet" / "single.json")
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", models / "controlnet" / "orphan.safetensors")
    return models


def test_list_controlnets(cn_models):
    names = list_controlnets(cn_models)
    assert names[: len(CONTROLNET_CATALOGUE)] == list(CONTROLNET_CATALOGUE)
    assert {"cn", "single.safetensors", "orphan.safetensors"} <= set(names)
    assert "single.json" not in names


def test_load_tiny_controlnet_folder(cn_models):
    from diffusers import ControlNetModel

    cache = LRUCache(2)
    by_name = load_controlnet("cn", models_dir=cn_models, cache=cache)
    assert isinstance(by_name, ControlNetModel)
    by_path = load_controlnet(str(cn_models / "controlnet" / "cn"), models_dir=cn_models, cache=cache)
    assert by_path is by_name  # same resolved folder: cached
    assert load_controlnet("cn", models_dir=cn_models) is not by_name  # no cache: loaded afresh
    single = load_controlnet("single.safetensors", models_dir=cn_models)
    for a, b in zip(single.state_dict().values(), by_name.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_single_file_without_config(cn_models):
    with pytest.raises(ModelError, match="orphan.json"):
        load_controlnet("orphan.safetensors", models_dir=cn_models)


@pytest.mark.parametrize("spec", ["../controlnet/../x", "/etc", "cn/../../outside", "nope", "lllyasviel/other"])
def test_rejects_paths_outside_and_unknown(cn_models, spec):
    with pytest.raises(ValidationError) as err:
        load_controlnet(spec, models_dir=cn_models)
    assert err.value.field == "controlnet"


def test_hub_offline(monkeypatch, cn_models):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("lllyasviel/control_v11p_sd15_canny", "config.json"), str):
        pytest.skip("the real ControlNet is in the local hub cache, so offline loading would succeed")
    with pytest.raises(OfflineError, match="offline") as err:
        load_controlnet("canny-sd15", models_dir=cn_models)
    assert "lllyasviel/control_v11p_sd15_canny" in str(err.value)


def test_allow_paths_for_trusted_callers(cn_models, tmp_path):
    outside = str(cn_models / "controlnet" / "cn")
    with pytest.raises(ValidationError, match="outside"):
        load_controlnet(outside, models_dir=tmp_path)
    assert load_controlnet(outside, models_dir=tmp_path, allow_paths=True) is not None
