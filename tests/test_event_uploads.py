"""Every UI event that takes a file accepts only uploads, enumerated from the app's own /config, by raw HTTP.

The app (over the fake backend) is served for real; each event behind a file-taking widget (image, brush editor,
gallery, file...) is sent what a script could send instead of an upload: a path-only value, a file object naming
another session's result (a copy Gradio cached to show it), a non-image file holding a secret, a path that does
not exist. All get the same bytes back, and no such file is opened. A genuine upload through /upload works for each.
Plus the PNG info bomb, refused from its header through the tab's own event in a fresh process.
"""

from __future__ import annotations

import builtins
import io
import itertools
import json
import socket
import textwrap
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio.utils import get_upload_folder
from gradio_client.utils import value_is_file
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.test_ui import FakeBackend
from tests.test_upload_security import run_bomb_check
from ui.uploads import UI_REFUSAL

pytestmark = pytest.mark.xdist_group("gradio-app")

META = {"_type": "gradio.FileData"}
FILE_TYPES = {"image", "imageeditor", "gallery", "file", "audio", "video", "model3d", "annotatedimage",
              "simpleimage", "dataset"}
SECRET = "tessera-secret-" + uuid.uuid4().hex
EXPECTED_WIDGETS = {"info-image", "upscale-image", "inpaint-editor", "inpaint-mask", "control-image",
                    "control-image-2", "control-image-3", "init_image"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, FakeBackend]]:
    from ui.app import create_demo, launch_kwargs

    backend = FakeBackend(tmp_path_factory.mktemp("event-outputs"))
    demo = create_demo(backend, queue_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/", backend
    finally:
        demo.close()


@pytest.fixture(scope="module")
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


def _takes_files(component: dict) -> bool:
    return component["type"] in FILE_TYPES or bool(value_is_file(component.get("api_info") or {}))


def file_events(config: dict) -> list[tuple[dict, int, dict]]:
    """(event, input index, component) for every input of every UI event whose value can be a file."""
    components = {c["id"]: c for c in config["components"]}
    found = []
    for dep in config["dependencies"]:
        for index, cid in enumerate(dep["inputs"]):
            component = components[cid]
            if component["type"] != "api" and _takes_files(component):
                found.append((dep, index, component))
    return found


def _name(component: dict) -> str:
    props = component["props"]
    return props.get("elem_id") or {"Initial image": "init_image"}.get(props.get("label"), props.get("label"))


def default_data(config: dict, dep: dict) -> list[Any]:
    """The event's input values as a page that was just loaded would send them (a State sends null)."""
    components = {c["id"]: c for c in config["components"]}
    return [None if components[i]["type"] == "state" else components[i]["props"].get("value") for i in dep["inputs"]]


def send(http: httpx.Client, dep: dict, data: list[Any], *, direct: bool = False) -> tuple[bool, str]:
    """Fire an event as the browser does (or by /run/predict when `direct`): (succeeded, the raw answer:
    run/predict's body or the queue's final message's output, as text)."""
    session = uuid.uuid4().hex
    body = {"fn_index": dep["id"], "data": data, "session_hash": session, "event_data": None,
            "trigger_id": dep["targets"][0][0] if dep["targets"] else None}
    if direct or not dep["queue"]:
        answer = http.post("gradio_api/run/predict", json=body)
        return answer.status_code == 200, answer.text
    assert http.post("gradio_api/queue/join", json=body).status_code == 200
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return bool(message.get("success")), json.dumps(message.get("output"), separators=(",", ":"))
    raise AssertionError("no process_completed message")


def upload(http: httpx.Client, name: str, content: bytes, mime: str = "image/png") -> dict:
    """A file sent through Gradio's upload route, as the browser's widget then names it."""
    (path,) = http.post("gradio_api/upload", files={"files": (name, content, mime)}).json()
    return {"path": path, "orig_name": name, "size": len(content), "mime_type": mime, "meta": META,
            "url": f"gradio_api/file={path}"}


def png_bytes(text: str = "a fox\nSteps: 4, Seed: 7, Size: 64x64") -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def file_value(component: dict, file: Any) -> Any:
    """A widget's value holding `file` (the brush editor's value holds it as its background and composite)."""
    if component["type"] == "imageeditor":
        return {"background": file, "layers": [], "composite": file, "id": None}
    if component["type"] == "gallery":
        return [{"image": file, "caption": None}]
    return file


@pytest.fixture(scope="module")
def config(http) -> dict:
    return http.get("config").json()


@pytest.fixture(scope="module")
def others_result(http, config) -> str:
    """A result the server made for another session and cached for display: the Upscale tab's output file."""
    dep, index, component = next(e for e in file_events(config) if _name(e[2]) == "upscale-image")
    data = default_data(config, dep)
    data[index] = upload(http, "theirs.png", png_bytes(f"their prompt {SECRET}"))
    ok, answer = send(http, dep, data)
    assert ok, answer
    paths = [p for p in _paths(json.loads(answer)) if Path(p).suffix == ".png"]
    assert paths and all(Path(p).resolve().is_relative_to(Path(get_upload_folder()).resolve()) for p in paths)
    return paths[0]


def _paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["path"]] if isinstance(value.get("path"), str) else []
        return own + [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return []


def test_the_config_lists_every_file_widget_as_an_event_input(config):
    names = {_name(component) for _, _, component in file_events(config)}
    assert names == EXPECTED_WIDGETS  # a new file widget shows up here, and in the tests below


def test_every_file_event_refuses_what_is_not_an_upload_with_one_answer(http, config, served, others_result,
                                                                       tmp_path, monkeypatch):
    backend = served[1]
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    placed = Path(get_upload_folder()) / f"tessera-{uuid.uuid4().hex}.txt"  # in Gradio's folder, never uploaded
    placed.write_text(SECRET)
    result = {"path": others_result, "orig_name": Path(others_result).name, "meta": META,
              "url": f"gradio_api/file={others_result}", "mime_type": "image/png"}
    cases = {
        "a path-only value": {"path": str(secret)},
        "another session's result, as a file object": result,
        "another session's result, path only": {"path": others_result},
        "a non-image file, as a file object": {"path": str(secret), "meta": META},
        "a non-image file in the upload folder": {"path": str(placed), "meta": META},
        "a missing path": {"path": str(tmp_path / "missing.png"), "meta": META},
        "a folder": {"path": str(tmp_path), "meta": META},
        "a plain string": str(secret),
        "a data: URL": {"path": None, "url": "data:image/png;base64,iVBORw0KGgo=", "meta": META},
    }
    watched = {str(secret), str(placed), others_result, str(tmp_path), str(tmp_path / "missing.png")}
    opened: list[str] = []
    real_open, real_image_open = builtins.open, Image.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_image_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_image_open(fp, *args, **kwargs)

    calls_before = len(backend.calls)
    answers: dict[tuple[str, str], str] = {}
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Image, "open", spy_image_open)
    try:
        for dep, index, component in file_events(config):
            for (case, value), direct in itertools.product(cases.items(), (False, True)):
                data = default_data(config, dep)
                data[index] = file_value(component, value) if isinstance(value, dict) else value
                ok, answer = send(http, dep, data, direct=direct)
                assert not ok, (dep["backend_fn"], _name(component), case, answer)
                answers[(f"{dep['id']}:{_name(component)}", case, str(direct))] = answer
    finally:
        monkeypatch.undo()
        placed.unlink()
    assert len(answers) == len(file_events(config)) * len(cases) * 2
    # byte-identical: the queue's error and /run/predict's body are the same JSON, whatever the value or the event
    assert set(answers.values()) == {json.dumps({"error": UI_REFUSAL, "duration": 10, "visible": True,
                                                 "title": "Error"}, separators=(",", ":"))}, set(answers.values())
    assert not [p for p in opened if p in watched], opened  # refused before anything was opened
    assert len(backend.calls) == calls_before  # no handler ran


def test_a_genuine_upload_works_for_every_file_event(http, config, served):
    backend = served[1]
    for dep, index, component in file_events(config):
        file = upload(http, "mine.png", png_bytes())
        data = default_data(config, dep)
        data[index] = file_value(component, file)
        calls = len(backend.calls)
        ok, answer = send(http, dep, data)
        assert ok, (dep["backend_fn"], _name(component), answer)
        name = _name(component)
        if name == "info-image":
            assert "a fox" in answer and "Steps: 4" in answer, answer  # the PNG's parameters, read back
        else:
            assert len(backend.calls) > calls, (name, backend.calls[calls:])
            assert file["path"] in json.dumps(backend.calls[calls:], default=str) or name.startswith("control"), (
                name, backend.calls[calls:])  # the handler got the uploaded file (a map preview records no path)


def test_api_file_parameters_get_their_one_message_before_gradios_check(http, config, tmp_path):
    from ui.uploads import refusal

    components = {c["id"]: c for c in config["components"]}
    dep = next(d for d in config["dependencies"] if d["api_name"] == "upscale")
    index = next(i for i, cid in enumerate(dep["inputs"]) if value_is_file(components[cid]["api_info"]))
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    answers = set()
    for value in ({"path": str(secret)}, {"path": str(secret), "meta": META}, str(secret)):
        data = [None] * len(dep["inputs"])
        data[index] = value
        ok, answer = send(http, dep, data)
        assert not ok
        answers.add(answer)
    assert answers == {json.dumps({"error": refusal("image"), "duration": 10, "visible": True, "title": "Error"},
                                  separators=(",", ":"))}


def with_late_text(png: bytes, key: str, text: str) -> bytes:
    """`png` with a tEXt chunk added after its pixel data (before IEND), where PIL reads it only on decoding."""
    body = key.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


INFO_BOMB_CHECK = textwrap.dedent("""
    import socket
    import httpx
    from PIL import Image
    from tests.test_event_uploads import default_data, file_events, send, upload, with_late_text, _name
    from tests.test_ui import FakeBackend
    from ui.app import create_demo, launch_kwargs

    class InfoBackend(FakeBackend):  # the real PNG info reader; the rest instant
        read_info = Backend.read_info

    demo = create_demo(InfoBackend(Path(tempfile.mkdtemp())), queue_size=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    small = Path(tempfile.mkdtemp()) / "late.png"
    Image.new("RGB", (64, 64)).save(small)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=120) as http:
        config = http.get("config").json()
        dep, index, _ = next(e for e in file_events(config) if _name(e[2]) == "info-image")

        def png_info(name, content):  # the PNG info tab's own event, by raw HTTP, with an upload
            data = default_data(config, dep)
            data[index] = upload(http, name, content)
            return send(http, dep, data)[1]

        text = "late prompt\\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64"
        late = png_info("late.png", with_late_text(small.read_bytes(), "parameters", text))
        bomb = Path(sys.argv[2]).read_bytes()
        before = hwm_mb()
        answer = png_info("bomb.png", bomb)
        grown = hwm_mb() - before
    demo.close()
    with Image.open(sys.argv[2]) as image:  # what the tab did before: PIL reaches the late chunks by decoding
        before = hwm_mb()
        image.getexif()
        old = hwm_mb() - before
    print(json.dumps({"grown_mb": grown, "message": answer, "late": late, "old_mb": old}))
""")


def test_png_info_refuses_a_144_mp_bomb_from_its_header_through_its_event(tmp_path):
    result = run_bomb_check(INFO_BOMB_CHECK, tmp_path)
    assert "`image` must be a PNG/JPEG/WebP image of at most 64 MP (it is 12000x12000 = 144 MP)" in result["message"]
    assert result["grown_mb"] < 20, result  # peak RSS growth (VmHWM) of the serving process
    late = json.loads(result["late"])["data"][0]
    assert late.startswith("late prompt\nSteps: 3"), result  # text after the pixel data: read, not decoded
    assert result["old_mb"] > 100, result  # the measurement does see a decode
