"""Image parameters accept only files sent through Gradio's upload route, never a path on the server.

Through the real app (engine + tiny model): gradio_client with plain strings and dicts, and raw HTTP for file
objects that gradio_client would upload itself. Plus the UI's decompression bomb, refused from its header.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import running_app
from ui.uploads import open_upload, refusal, uploaded_path

pytestmark = pytest.mark.xdist_group("gradio-app")

TINY = {"model": "tiny", "width": 64, "height": 64, "steps": 2}
META = {"_type": "gradio.FileData"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(manager, tmp_path_factory):
    from pipelines.engine import Engine

    engine = Engine(manager, tmp_path_factory.mktemp("upload-outputs"))
    with running_app(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(app, tmp_path_factory) -> Client:
    return Client(app, verbose=False, download_files=str(tmp_path_factory.mktemp("upload-downloads")))


@pytest.fixture(scope="module")
def server_files(tmp_path_factory) -> dict[str, Path]:
    """Files on the server that no client uploaded (pytest's temp folder is outside Gradio's upload folder)."""
    root = tmp_path_factory.mktemp("server-files")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "secret.png")
    (root / "notes.txt").write_text("not an image")
    assert not Path(root).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    return {"png": root / "secret.png", "text": root / "notes.txt", "missing": root / "no-such-file.png"}


@pytest.fixture
def in_upload_folder():
    """A fresh folder inside Gradio's upload folder, removed afterwards."""
    folder = Path(get_upload_folder()) / f"tessera-test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _call(client: Client, name: str, value):
    if name == "image":
        return client.predict(image=value, upscaler="lanczos", scale=2, api_name="/upscale")
    extra = {"strength": 0.5} if name == "init_image" else {}
    return client.predict(prompt="upload check", seed=3, **TINY, **extra, **{name: value}, api_name="/generate")


def _refused(client: Client, name: str, value) -> str:
    with pytest.raises(AppError) as err:
        _call(client, name, value)
    return str(err.value)


@pytest.mark.parametrize("name", ["init_image", "control_image", "control3_image", "image"])
def test_server_paths_are_refused_with_one_message(client, server_files, name):
    png, text, missing = (str(server_files[k]) for k in ("png", "text", "missing"))
    messages = {
        "a never-uploaded PNG": _refused(client, name, png),
        "a missing path": _refused(client, name, missing),
        "a non-image file": _refused(client, name, text),
        "a dict without Gradio's meta": _refused(client, name, {"path": png}),
        "a URL": _refused(client, name, "http://127.0.0.1:9/secret.png"),
        "a file: URL": _refused(client, name, Path(png).as_uri()),
    }
    assert set(messages.values()) == {refusal(name)}, messages  # byte-identical: nothing about the path leaks
    assert f"`{name}` must be a file uploaded with the request" in refusal(name)


@pytest.mark.parametrize("name", ["init_image", "control_image", "image"])
def test_the_same_file_sent_with_handle_file_works(client, server_files, name):
    result = _call(client, name, handle_file(str(server_files["png"])))
    path, text = (result[0][0], result[1][0]) if name != "image" else result
    with Image.open(path) as out:
        assert out.size == ((128, 128) if name == "image" else (64, 64))
        assert out.info["parameters"] == text
    if name == "init_image":
        assert "Denoising strength: 0.5" in text
    if name == "control_image":
        assert "ControlNet 0:" in text


def _raw_upscale(url: str, image) -> str:
    """POST /upscale with `image` as given (no gradio_client, which would upload a local file itself); the events."""
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("gradio_api/call/upscale", json={"data": [image, "lanczos", 2, *[None] * 6]})
        return http.get(f"gradio_api/call/upscale/{answer.json()['event_id']}").text


def test_file_objects_outside_the_upload_folder_are_refused(app, server_files, in_upload_folder):
    png, missing, text = (str(server_files[k]) for k in ("png", "missing", "text"))
    link = in_upload_folder / "link.png"
    link.symlink_to(png)  # inside the folder by name, outside once resolved
    answers = {p: _raw_upscale(app, {"path": p, "meta": META}) for p in (png, missing, text, str(link))}
    for events in answers.values():  # the app's check of every event (ui.uploads.guard_uploads), before Gradio's
        assert "event: error" in events and json.dumps(refusal("image")) in events, events
        assert events == answers[png]  # byte-identical: nothing about the path leaks


def test_only_files_the_upload_route_wrote_are_read(app, server_files, in_upload_folder):
    with httpx.Client(base_url=app, timeout=60) as http, open(server_files["png"], "rb") as fh:
        (uploaded,) = http.post("gradio_api/upload", files={"files": ("photo.png", fh, "image/png")}).json()
    events = _raw_upscale(app, {"path": uploaded, "meta": META})
    assert "event: complete" in events and "Source size: 64x64" in events, events
    placed = in_upload_folder / "placed.png"  # in Gradio's folder, where served results and URL fetches go too
    shutil.copy(server_files["png"], placed)
    for value in ({"path": str(placed), "meta": META}, str(placed), uploaded, {"path": uploaded}):
        events = _raw_upscale(app, value)
        assert "event: error" in events and json.dumps(refusal("image")) in events, (value, events)


def test_uploaded_path_follows_gradios_rule(server_files, in_upload_folder):
    inside, link = in_upload_folder / "a.png", in_upload_folder / "link.png"
    Image.new("RGB", (8, 8)).save(inside)
    link.symlink_to(server_files["png"])
    outside, missing = str(server_files["png"]), str(in_upload_folder / "missing.png")
    uploads = {str(inside), str(link), outside, missing, str(in_upload_folder)}  # as if /upload had written them
    assert uploaded_path(FileData(path=str(inside)), uploads) == str(inside.resolve())
    assert uploaded_path({"path": str(inside), "meta": META}, uploads) == str(inside.resolve())
    refused = [str(inside), {"path": str(inside)}, {"path": outside, "meta": META}, {"path": missing, "meta": META},
               {"path": str(link), "meta": META}, {"path": str(in_upload_folder), "meta": META},
               {"path": "https://example.com/a.png", "meta": META}, 42, ["a"],
               {"path": f"{in_upload_folder}/../../../{outside}", "meta": META}]
    assert [uploaded_path(v, uploads) for v in refused] == [None] * len(refused)
    assert uploaded_path({"path": str(inside), "meta": META}, set()) is None  # in the folder, but never uploaded
    assert uploaded_path({"path": str(inside), "meta": META}, uploads, blocked=[str(in_upload_folder)]) is None
    assert open_upload(None, "init_image") is None
    with pytest.raises(Exception, match="`init_image` must be a file uploaded"):
        open_upload({"path": str(inside), "meta": META}, "init_image")  # no app is serving a request here


BOMB_PRELUDE = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import gradio as gr
    import torch  # noqa: F401 - imported before measuring
    import pipelines.control.images  # noqa: F401
    from pipelines.serving.service import Backend

    def hwm_mb():
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024
""")
"""A bomb check's start: the repo importable, torch imported before measuring, the peak-RSS reader `hwm_mb`."""


def run_bomb_check(script: str, tmp_path: Path) -> dict:
    """Run `script` (after BOMB_PRELUDE) in a fresh process on a 144 MP palette PNG of ~20 KB; its JSON result."""
    bomb = tmp_path / "bomb.png"
    Image.new("P", (12000, 12000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 300_000
    out = subprocess.run([sys.executable, "-c", BOMB_PRELUDE + script, str(ROOT), str(bomb)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


BOMB_CHECK = textwrap.dedent("""
    from gradio.data_classes import ImageData
    from ui.upscale_tab import build_upscale_tab, upscale_updates

    class NoEngine:  # the upscale must stop at the header check, before any engine work
        def upscale(self, *a, **k):
            raise AssertionError("decoded and sent to the engine")

    def upscale_tab(widget):  # what Gradio does for the Upscale button: the widget's preprocess, then the handler
        before = hwm_mb()
        value = widget.preprocess(ImageData(path=sys.argv[2], orig_name="bomb.png"))
        try:
            list(upscale_updates(Backend(NoEngine()).upscale, {"image": value, "upscaler": "lanczos", "scale": 2}))
            message = "accepted"
        except gr.Error as exc:
            message = exc.message
        return {"grown_mb": hwm_mb() - before, "message": message, "type": type(value).__name__}

    with gr.Blocks():
        fields, _, _ = build_upscale_tab({"upscalers": ["lanczos"], "models": ["tiny"]})
    tab = upscale_tab(fields["image"])  # first: the high-water mark only rises, so the order matters
    old = upscale_tab(gr.Image(type="pil"))  # the widget it replaced
    print(json.dumps({"tab": tab, "pil": old}))
""")


def test_upscale_tab_refuses_a_144_mp_bomb_from_its_header(tmp_path):
    result = run_bomb_check(BOMB_CHECK, tmp_path)
    tab, old = result["tab"], result["pil"]
    assert tab["type"] == "str" and "12000x12000 = 144 MP" in tab["message"], tab  # the header check said no
    assert tab["grown_mb"] < 100, tab  # peak RSS growth (VmHWM), in a fresh process
    assert old["type"] == "Image" and old["grown_mb"] > 100, old  # the measurement does see a decode


INPAINT_BOMB_CHECK = textwrap.dedent("""
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import DataWithFiles, FileData
    from tests.test_ui import FakeBackend
    from ui.app import create_demo
    from ui.generate_events import generate_updates

    class NoEngine:  # the run must stop at the header check, before any engine work
        default_model = "tiny"

        def generate(self, *a, **k):
            raise AssertionError("decoded and sent to the engine")

    bomb = sys.argv[2]
    uploaded = lambda: FileData(path=bomb, orig_name="bomb.png")
    payloads = {  # what the browser sends: a FileData of the upload, or the canvas exports through accept_blobs
        "files": lambda editor: EditorData(background=uploaded(), layers=[uploaded()], composite=uploaded()),
        "blobs": lambda editor: through_accept_blobs(editor),
    }

    def through_accept_blobs(editor):  # the route's own function, as /gradio_api/component_server calls it
        for kind, index in (("background", "null"), ("layer", "0"), ("composite", "null")):
            editor.accept_blobs(DataWithFiles(data={"type": kind, "index": index, "id": "run-1", "session_hash": "s"},
                                              files=[("layer.png", Path(bomb).read_bytes())]))
        return EditorData(id="run-1")

    def inpaint_tab(editor, payload):  # Generate with the editor's value: its preprocess, then the handler
        before = hwm_mb()
        value = editor.preprocess(payload(editor))
        backend = Backend(NoEngine())
        try:
            next(generate_updates(backend, backend.generate, {"prompt": "x", "inpaint_editor": value}, []))
            message = "accepted"
        except gr.Error as exc:
            message = exc.message
        kinds = sorted({type(value[k]).__name__ for k in ("background", "composite")} |
                       {type(x).__name__ for x in value["layers"]})
        return {"grown_mb": hwm_mb() - before, "message": message, "types": kinds}

    demo = create_demo(FakeBackend(Path(tempfile.mkdtemp())), queue_size=4)
    editor = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "inpaint-editor")
    out = {name: inpaint_tab(editor, payload) for name, payload in payloads.items()}  # the HWM only rises: first
    with gr.Blocks():
        stock = gr.ImageEditor(type="filepath", format="png")  # the widget it replaced
    out["stock"] = inpaint_tab(stock, payloads["files"])
    print(json.dumps(out))
""")


def test_inpaint_tab_refuses_a_144_mp_bomb_from_its_header(tmp_path):
    """The brush editor hands over its upload and canvas exports undecoded; the header check refuses the bomb."""
    result = run_bomb_check(INPAINT_BOMB_CHECK, tmp_path)
    for name in ("files", "blobs"):
        tab = result[name]
        assert tab["types"] == ["str"] and "12000x12000 = 144 MP" in tab["message"], (name, tab)
        assert "`inpaint_editor`" in tab["message"], tab
        assert tab["grown_mb"] < 100, (name, tab)  # peak RSS growth (VmHWM), in a fresh process
    assert result["stock"]["grown_mb"] > 100, result["stock"]  # the measurement does see Gradio's own decode
