"""The Regions accordion: the table's rows reach the backend as region objects, Send to Generate fills the table,
and the preview draws the boxes (or shows the validation message)."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image

from pipelines.request.regions import Region
from tests.test_ui import FakeBackend, by_label, handler, initial_data

ROWS = [[0, 0, 0.5, 1, "a cat", "", 1.5, 8, -1], [None, None, None, None, "", "", None, None, None],
        [256, 0, 256, 128, "a sun", "rain", 1, 0, 7]]


@pytest.fixture
def backend(tmp_path) -> FakeBackend:
    return FakeBackend(tmp_path / "outputs")


@pytest.fixture
def demo(backend):
    from ui.app import create_demo

    return create_demo(backend, queue_size=4)


def test_table_rows_reach_the_backend_as_regions(demo, backend):
    fn = handler(demo, "on_generate")
    data = initial_data(fn)
    data[by_label(fn, "Regions")] = ROWS
    data[by_label(fn, "Main prompt covers")] = "background"
    list(fn.fn(data))
    sent = next(v for k, v in backend.calls if k == "generate")
    assert sent["regions"] == [{"x": 0, "y": 0, "w": 0.5, "h": 1, "prompt": "a cat", "weight": 1.5, "feather": 8,
                                "seed": -1},
                               {"x": 256, "y": 0, "w": 256, "h": 128, "prompt": "a sun", "negative_prompt": "rain",
                                "weight": 1, "feather": 0, "seed": 7}]
    assert sent["region_base"] == "background"
    data[by_label(fn, "Regions")] = [[None] * 9]
    list(fn.fn(data))
    assert [v for k, v in backend.calls if k == "generate"][-1]["regions"] is None  # empty table: no regions


def test_send_to_generate_fills_the_table(demo):
    regions = (Region(0.0, 0.0, 0.5, 1.0, "a cat", weight=1.5), Region(256.0, 0.0, 256.0, 128.0, "a sun", "rain"))
    out = {getattr(c, "label", None): v for c, v in handler(demo, "on_send").fn({"regions": regions}).items()}
    assert out["Regions"] == [[0.0, 0.0, 0.5, 1.0, "a cat", "", 1.5, 0.0, -1],
                              [256.0, 0.0, 256.0, 128.0, "a sun", "rain", 1.0, 0.0, -1]]


def test_preview_draws_the_boxes_or_says_what_is_wrong(engine):
    from pipelines.serving.service import Backend
    from ui.generate_events import region_preview

    backend = Backend(engine)
    good = region_preview(backend, {"regions": ROWS, "width": 512, "height": 256})
    img = good["regions_preview"]
    assert isinstance(img, Image.Image) and img.size == (384, 192)
    assert img.getpixel((1, 100)) != img.getpixel((300, 150))  # the first box's edge is drawn in its colour
    assert good["regions_error"]["visible"] is False
    bad = region_preview(backend, {"regions": [[0.8, 0, 0.5, 1, "x"]], "width": 512, "height": 256})
    assert bad["regions_preview"] == gr.skip()  # the last good preview stays
    assert "regions[0].w" in bad["regions_error"]["value"] and bad["regions_error"]["visible"] is True
