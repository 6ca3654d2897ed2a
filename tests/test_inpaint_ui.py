"""Inpainting through every entry point: the CLI (--mask, --outpaint), the backend's brush strokes and uploaded
masks, the API parameters, the UI's Inpaint tab (fake backend)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.edit.inpaint import prepare_mask
from pipelines.request.schema import flat_fields
from tests.test_ui import FakeBackend

INPAINT_FIELDS = ("mask_blur", "masked_content", "inpaint_area", "inpaint_padding", "inpaint_size", "mask_mode",
                  "soft_inpainting", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom")


def _image(w=64, h=64) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w=64, h=64) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 40, 40), fill=255)
    return mask


def test_inpaint_fields_are_flat_request_fields():
    assert set(INPAINT_FIELDS) <= set(flat_fields())
    from pipelines.request.schema import InpaintConfig

    assert InpaintConfig().outpaint == (0, 0, 0, 0)


def test_cli_inpaints_with_mask_and_refuses_a_bad_one(tiny_cache, tmp_path, capsys):
    import cli

    _image().save(tmp_path / "in.png")
    _mask().save(tmp_path / "mask.png")
    args = ["generate", "--model", "tiny", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "2",
            "--seed", "3", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--strength", "0.8", "--mask-blur", "2", "--masked-content", "latent noise", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")]
    assert cli.main(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    out, src = np.asarray(Image.open(path).convert("RGB")), np.asarray(_image())
    outside = np.asarray(prepare_mask(_mask(), blur=2, invert=False, soft=False)) == 0
    assert np.array_equal(out[outside], src[outside]) and not np.array_equal(out, src)
    with Image.open(path) as img:
        assert "Masked content: latent noise" in img.info["parameters"]
    _mask(32, 32).save(tmp_path / "small.png")
    assert cli.main([*args[:-6], "--mask", str(tmp_path / "small.png"), *args[-4:]]) == 2
    assert "`mask` must have the image's size 64x64" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("hello")
    assert cli.main([*args[:-6], "--mask", str(tmp_path / "text.png"), *args[-4:]]) == 2
    assert "`mask`" in capsys.readouterr().err
    assert cli.main([*args, "--outpaint", "8,8"]) == 2
    assert "`--outpaint` must be four whole numbers" in capsys.readouterr().err


def test_backend_takes_brush_strokes_as_the_mask_and_an_upload_wins(engine, tmp_path):
    from pipelines.serving.service import Backend

    _image().save(tmp_path / "bg.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((10, 32, 50, 32), fill=(255, 255, 255, 255), width=6)
    layer.save(tmp_path / "layer.png")
    editor = {"background": str(tmp_path / "bg.png"), "layers": [str(tmp_path / "layer.png")], "composite": None}
    values = {"prompt": "x", "model": "tiny", "width": 64, "height": 64, "strength": 0.7, "inpaint_editor": editor}
    req = Backend(engine).request(values)
    assert req.init_image.tobytes() == _image().tobytes()
    assert np.array_equal(np.asarray(req.mask) > 0, np.asarray(layer.getchannel("A")) > 0)
    _mask().save(tmp_path / "mask.png")
    req = Backend(engine).request({**values, "mask": str(tmp_path / "mask.png")})
    assert req.mask.tobytes() == _mask().tobytes()
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    empty.save(tmp_path / "empty.png")
    plain = Backend(engine).request({**values, "inpaint_editor": {**editor, "layers": [str(tmp_path / "empty.png")]}})
    assert plain.mask is None and plain.init_image is not None  # nothing painted: img2img of the background
    (tmp_path / "bad.png").write_text("not an image")
    from pipelines.errors import ValidationError

    with pytest.raises(ValidationError, match="`inpaint_editor`"):
        Backend(engine).request({**values, "inpaint_editor": {**editor, "layers": [str(tmp_path / "bad.png")]}})


def test_api_has_the_mask_upload_and_every_inpaint_option(tmp_path):
    from ui.app import create_demo

    demo = create_demo(FakeBackend(tmp_path / "out"), queue_size=4)
    params = {p["parameter_name"]: p for p in demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]}
    assert {"mask", *INPAINT_FIELDS} <= set(params)
    from ui.api import IMAGE_PARAMS

    assert "mask" in IMAGE_PARAMS  # opened with open_upload: uploaded files only


def test_inpaint_tab_names_every_field_and_the_outpaint_buttons_add_128(tmp_path):
    from ui.app import create_demo
    from ui.inpaint_tab import _more

    demo = create_demo(FakeBackend(tmp_path / "out"), queue_size=4)
    fn = next(f for f in demo.fns.values() if f.name == "on_generate")
    labels = {getattr(c, "elem_id", None) for c in fn.inputs}
    assert {"inpaint-editor", "inpaint-mask", "outpaint-left", "outpaint-bottom"} <= labels
    editor = next(c for c in fn.inputs if getattr(c, "elem_id", None) == "inpaint-editor")
    assert editor.type == "filepath" and editor.format == "png"  # never webp: the background stays lossless
    assert _more(0) == 128 and _more(128) == 256 and _more(None) == 128


def test_request_values_keep_strength_for_the_brush_image():
    from ui.generate_events import request_values

    editor = {"background": "/tmp/x.png", "layers": []}
    assert request_values({"strength": 0.6, "inpaint_editor": editor})["strength"] == 0.6
    assert request_values({"strength": 0.6})["strength"] is None


def test_the_plan_estimate_ignores_outpainting_without_the_image(tmp_path):
    from ui.generate_events import describe

    class Backend:
        def describe(self, values):
            self.values = values
            return "ok"

    backend = Backend()
    assert describe(backend, {"width": 64, "outpaint_left": 128, "mask_blur": 4}) == "ok"
    assert "outpaint_left" not in backend.values and backend.values["mask_blur"] == 4
