"""The ImageEditor's canvas-export route (`accept_blobs` on /gradio_api/component_server), by raw HTTP on the real
app: a bounded layer index, 4xx with a message for bad fields, per-session and total caps, a time-to-live."""

from __future__ import annotations

import io
import time

import gradio as gr
import httpx
import pytest
from fastapi import HTTPException
from gradio.components.image_editor import EditorData
from PIL import Image

from tests.conftest import running_app
from ui.editor_blobs import BlobLimits, BlobStore

pytestmark = pytest.mark.xdist_group("gradio-app")
MB = 2**20


@pytest.fixture(scope="module")
def app(manager, tmp_path_factory):
    """(an httpx client on the real app, the inpaint editor, its component id), one server for the module."""
    from pipelines.engine import Engine

    demos: list = []
    engine = Engine(manager, tmp_path_factory.mktemp("outputs"))
    with running_app(engine, demos=demos) as url, httpx.Client(base_url=url, timeout=60) as http:
        editor = next(b for b in demos[0].blocks.values() if isinstance(b, gr.ImageEditor))
        config = http.get("config").json()
        (component_id,) = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") ==
                           "inpaint-editor"]
        assert component_id == editor._id
        yield http, editor, component_id


@pytest.fixture
def served(app):
    """`app` with the editor's store emptied and at its default limits and clock."""
    http, editor, component_id = app
    store = editor.blob_storage
    store.limits, store.clock = BlobLimits(), time.monotonic
    for blob_id in list(store._entries):
        store.pop(blob_id)
    yield app


def post_blob(http: httpx.Client, component_id: int, *, blob: bytes = b"x", session: str = "s1", blob_id: str = "a1",
              kind: str = "layer", index: str | None = "0", files: int = 1) -> httpx.Response:
    """What the browser's editor posts for one canvas export (its fields, as multipart)."""
    data = {"session_hash": session, "component_id": str(component_id), "fn_name": "accept_blobs", "id": blob_id,
            "type": kind}
    if index is not None:
        data["index"] = index
    upload = [("file", (f"layer_{i}.png", blob, "image/png")) for i in range(files)] or [("note", (None, b"x"))]
    return http.post("gradio_api/component_server", data=data, files=upload)


def png(size=(32, 32), color=(200, 30, 30, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_a_huge_layer_index_is_refused_before_anything_is_stored(served):
    http, editor, cid = served
    store = editor.blob_storage
    assert isinstance(store, BlobStore) and store.max_layers == 1  # layers=False: the browser sends layer 0 only
    answer = post_blob(http, cid, index="10000000")
    assert answer.status_code == 400, answer.text
    assert "a layer's `index` must be 0 (this editor has one layer)" in answer.json()["detail"]
    assert len(store) == 0 and store.total == 0  # nothing kept: no ten-million-slot list
    ok = post_blob(http, cid, blob=b"12345", index="0")
    assert ok.status_code == 200, ok.text
    assert len(store) == 1 and store.total == 5 and len(store.get("a1").layers) == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"index": "-5"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"index": "abc"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"index": "1"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"index": "null"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"index": "0.5"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"index": "²"}, "a layer's `index` must be 0 (this editor has one layer)"),
    ({"kind": "mask"}, "`type` must be one of background, composite, layer"),
    ({"blob_id": ""}, "`id` must be a text of 1 to 64 characters"),
    ({"blob_id": "x" * 65}, "`id` must be a text of 1 to 64 characters"),
    ({"files": 0}, "send exactly one file"),
    ({"files": 2}, "send exactly one file"),
])
def test_bad_fields_get_400_with_a_message(served, fields, message):
    http, editor, cid = served
    answer = post_blob(http, cid, **fields)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == f"image editor upload refused: {message}"
    assert len(editor.blob_storage) == 0


def test_a_json_body_is_refused_with_a_message(served):
    http, editor, cid = served
    answer = http.post("gradio_api/component_server", json={
        "session_hash": "s1", "component_id": cid, "fn_name": "accept_blobs",
        "data": {"type": "layer", "index": 10_000_000, "id": "a1", "file": "eA=="}})
    assert answer.status_code == 400, answer.text
    assert "send a multipart form" in answer.json()["detail"] and len(editor.blob_storage) == 0


def test_background_and_composite_ignore_the_index_the_browser_sends_as_null(served):
    http, editor, cid = served
    for kind in ("background", "composite"):
        assert post_blob(http, cid, kind=kind, index="null", blob=png()).status_code == 200
    assert post_blob(http, cid, kind="layer", index="0", blob=png(color=(0, 0, 0, 0))).status_code == 200
    value = editor.preprocess(EditorData(id="a1"))  # what the Generate event does with the editor's value
    assert value is not None and value["background"] and value["composite"] and len(value["layers"]) == 1
    with Image.open(value["background"]) as img:
        assert img.size == (32, 32)
    assert len(editor.blob_storage) == 0  # read once, then gone (Gradio's own rule)


def test_blob_memory_is_capped_per_session_and_in_all(served):
    http, editor, cid = served
    store: BlobStore = editor.blob_storage
    store.limits = BlobLimits(session_ids=2, session_bytes=3 * MB, total_ids=100, total_bytes=5 * MB)
    blob = b"\0" * MB
    for i in range(20):  # 20 exports of 1 MB from one session: only its 2 latest stay (the browser uses the last)
        assert post_blob(http, cid, blob=blob, blob_id=f"id{i}", kind="background", index="null").status_code == 200
    assert store.sessions() == {"s1": 2 * MB} and store.get("id19") and store.get("id17") is None
    assert post_blob(http, cid, blob=blob + blob, blob_id="id19", kind="composite").status_code == 200
    assert store.sessions() == {"s1": 3 * MB} and store.get("id18") is None  # the newer export made room
    answer = post_blob(http, cid, blob=blob + blob, blob_id="id19", kind="layer")  # one id over the session's cap
    assert answer.status_code == 413, answer.text
    assert "the canvas is larger than 3 MB in all" in answer.json()["detail"]
    assert store.get("id19") is None and store.sessions() == {}
    for s in range(10):  # many sessions: the total stays under its cap, the oldest exports go first
        assert post_blob(http, cid, blob=blob, session=f"other{s}", blob_id=f"o{s}").status_code == 200
        assert store.total <= 5 * MB and sum(store.sessions().values()) == store.total
    assert store.get("o9") and store.get("o4") is None
    another = post_blob(http, cid, blob=b"y", session="thief", blob_id="o9")
    assert another.status_code == 400 and "belongs to another session" in another.json()["detail"]


def test_exports_expire(served):
    http, editor, cid = served
    store: BlobStore = editor.blob_storage
    now = [1000.0]
    store.clock = lambda: now[0]
    assert post_blob(http, cid, blob=b"abc").status_code == 200
    now[0] += store.limits.ttl_s - 1
    assert store.get("a1") is not None
    now[0] += 2
    assert store.get("a1") is None and store.total == 0


def test_the_store_counts_a_rewritten_layer_once():
    store = BlobStore(max_layers=2, limits=BlobLimits(session_bytes=10))
    store.put("s", "a", "layer", 1, b"12345")
    store.put("s", "a", "layer", 1, b"123")
    store.put("s", "a", "layer", 0, b"1")
    assert store.total == 4 and store.sessions() == {"s": 4}
    with pytest.raises(HTTPException) as refused:
        store.put("s", "a", "background", None, b"x" * 20)
    assert refused.value.status_code == 413
    assert store.total == 0 and len(store) == 0
