"""The real Gradio app under load and hostile HTTP input, on 127.0.0.1 only, with every loop bounded.

16 gradio_client callers (threads) send 3 requests each to /generate against a queue of 4: each request either
finishes with a complete PNG whose metadata parses, or is refused as queue-full. Afterwards the server still
answers, and the outputs folder holds exactly one complete PNG per finished request. Also: bad input over HTTP,
an uploaded file naming a server path, and the launch safety checks (--share without --auth, --auth parsing).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from pipelines.metadata import request_from_infotext
from tests.conftest import assert_valid_png, running_app

pytestmark = pytest.mark.xdist_group("gradio-app")
log = logging.getLogger(__name__)

CALLERS, REQUESTS_EACH, QUEUE_SIZE = 16, 3, 4
REQUEST_TIMEOUT_S = 180  # one request, queue wait included
TINY = {"model": "tiny", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(manager, tmp_path_factory):
    """The real app (engine + tiny model) on a free loopback port with a queue of 4; yields (url, outputs folder)."""
    from pipelines.engine import Engine

    outputs = tmp_path_factory.mktemp("load-outputs")
    engine = Engine(manager, outputs)
    with running_app(engine, queue_size=QUEUE_SIZE) as url:
        yield url, outputs, engine


def _client(url: str, downloads: Path) -> Client:
    return Client(url, verbose=False, download_files=str(downloads))


# ---------------------------------------------------------------- load

def test_concurrent_callers_finish_or_are_refused_and_nothing_is_lost(server, tmp_path):
    url, outputs, engine = server
    outcomes: list[tuple[str, int, object]] = []  # (kind, seed, detail)
    lock = threading.Lock()

    def caller(i: int) -> None:
        try:
            client = _client(url, tmp_path / f"caller-{i}")
        except Exception as exc:  # recorded, then reported by the main thread
            with lock:
                outcomes.append(("client-error", i, repr(exc)))
            return
        for r in range(REQUESTS_EACH):
            seed = 1000 + i * REQUESTS_EACH + r
            job = client.submit(prompt=f"load test {i}.{r}", seed=seed, **TINY, api_name="/generate")
            try:
                files, texts = job.result(timeout=REQUEST_TIMEOUT_S)
                outcome = ("done", seed, (files, texts))
            except QueueError as exc:
                outcome = ("refused", seed, str(exc))
            except Exception as exc:  # anything else fails the test below, with its message
                outcome = ("error", seed, f"{type(exc).__name__}: {exc}")
                job.cancel()
            with lock:
                outcomes.append(outcome)
        client.close()

    threads = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}", daemon=True) for i in range(CALLERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S * REQUESTS_EACH)
    elapsed = time.monotonic() - started
    assert not [t.name for t in threads if t.is_alive()], "callers still running after the time limit"

    kinds = Counter(kind for kind, _, _ in outcomes)
    log.info("load: %s in %.1f s", dict(kinds), elapsed)
    assert not [o for o in outcomes if o[0] in ("error", "client-error")], [o for o in outcomes if o[0] != "done"][:5]
    assert len(outcomes) == CALLERS * REQUESTS_EACH
    assert kinds["done"] >= 1 and kinds["done"] + kinds["refused"] == CALLERS * REQUESTS_EACH
    for _, _, message in (o for o in outcomes if o[0] == "refused"):
        assert "queue is full" in str(message).lower()

    for _, seed, (files, texts) in (o for o in outcomes if o[0] == "done"):
        assert len(files) == len(texts) == 1
        assert assert_valid_png(files[0]) == texts[0]
        req = request_from_infotext(texts[0])
        assert (req.seed, req.width, req.height, req.steps) == (seed, 64, 64, 2)

    # the server still answers, and the outputs folder lost or truncated nothing
    files, _ = _client(url, tmp_path / "after").predict(prompt="after the storm", seed=7, **TINY, api_name="/generate")
    assert_valid_png(files[0])
    saved = sorted(outputs.rglob("*.png"))
    assert len(saved) == kinds["done"] + 1, f"{len(saved)} files for {kinds['done'] + 1} finished requests"
    assert not list(outputs.rglob(".tmp-*"))
    seeds = sorted(request_from_infotext(assert_valid_png(p)).seed for p in saved)
    assert seeds == sorted([s for kind, s, _ in outcomes if kind == "done"] + [7])
    assert not engine.gpu_lock.locked()


# ---------------------------------------------------------------- hostile input over HTTP

@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> Client:
    return _client(server[0], tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def bad_uploads(tmp_path_factory) -> dict[str, str]:
    from tests.test_fuzz import _png_claiming

    folder = tmp_path_factory.mktemp("bad-uploads")
    Image.new("RGB", (64, 64), (30, 90, 160)).save(folder / "ok.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (folder / "notes.txt").write_text("not an image")
    return {p.stem: str(p) for p in folder.iterdir()}


@pytest.mark.parametrize(("values", "expected"), [
    ({"width": 100_000}, "`width` must be between 64 and 8192"),
    ({"steps": -3}, "`steps` must be between 1 and 150"),
    ({"model": "../../etc/passwd"}, "`model` is not a known model"),
    ({"model": "/etc/passwd"}, "`model` is not a known model"),
    ({"hires_scale": 2.0, "hires_upscaler": "../../etc/passwd"}, "`hires_upscaler` must be an upscaler name"),
    ({"control_image": "ok", "control_model": "/etc/passwd"}, "not a path outside it"),
    ({"prompt": "a" * 100_000}, "`prompt` must be at most 10000 characters"),
    ({"init_image": "truncated"}, "`init_image` must be"),
    ({"init_image": "notes"}, "`init_image` must be"),
    ({"control_image": "notes"}, "`control_image` must be"),
], ids=["width", "steps", "model-traversal", "model-absolute", "upscaler-path", "controlnet-path", "prompt-100k",
        "init-truncated", "init-text", "control-text"])
def test_bad_input_over_http_is_a_clear_error(client, bad_uploads, values, expected):
    values = {k: handle_file(bad_uploads[v]) if k.endswith("_image") else v for k, v in values.items()}
    with pytest.raises(AppError) as err:
        client.predict(**{"prompt": "x", "seed": 1, **TINY, **values}, api_name="/generate")
    assert expected in str(err.value)
    assert "Traceback" not in str(err.value)


def test_decompression_bomb_upload_over_http_is_a_clear_error(client, bad_uploads):
    with pytest.raises(AppError, match="`init_image` must be a PNG/JPEG/WebP image of at most 64 MP"):
        client.predict(prompt="x", init_image=handle_file(bad_uploads["bomb"]), **TINY, api_name="/generate")


def test_a_file_parameter_cannot_name_a_server_path(server, bad_uploads):
    """Raw HTTP: a FileData whose path points outside the upload folder must be refused, never read."""
    from ui.api import GENERATE_PARAMS

    def call(init_image) -> tuple[int, list[str], list[str]]:
        values = {**dict.fromkeys(GENERATE_PARAMS), "prompt": "x", **TINY, "seed": seed, "init_image": init_image}
        with httpx.Client(base_url=server[0], timeout=REQUEST_TIMEOUT_S) as http:
            r = http.post("gradio_api/call/generate", json={"data": list(values.values())})
            if r.status_code != 200:
                return r.status_code, [], [r.text]
            with http.stream("GET", f"gradio_api/call/generate/{r.json()['event_id']}") as stream:
                lines = [line for line in stream.iter_lines() if line.strip()][:50]
        events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
        return 200, events, [line.split(":", 1)[1].strip() for line in lines if line.startswith("data:")]

    seed = 4242
    status, events, _ = call(None)  # the raw protocol works: a plain request completes
    assert status == 200 and events[-1] == "complete", events
    status, events, data = call({"path": bad_uploads["ok"], "meta": {"_type": "gradio.FileData"}})
    log.info("server path refused: %s %s", status, json.dumps(data[-1:])[:200])
    if status == 200:
        assert "complete" not in events and events[-1] == "error", f"a server-side path was read: {data[-1:]}"
    else:
        assert status in (400, 403, 422), data
    assert len(list(server[1].rglob(f"*-{seed}.png"))) == 1, "an image was generated from a server-side file"


# ---------------------------------------------------------------- launch safety

def test_share_without_auth_warns():
    from app import share_warning

    assert "--auth" in share_warning(True, None)
    assert share_warning(True, ("user", "pass")) is None
    assert share_warning(False, None) is None


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("user:pass", ("user", "pass")), ("user:pa:ss", ("user", "pa:ss")), ("ü:p ss", ("ü", "p ss")),
])
def test_parse_auth_accepts_user_colon_password(text, expected):
    from app import parse_auth

    assert parse_auth(text) == expected


@pytest.mark.parametrize("text", ["", "user", ":pass", "user:", ":", "userpass", "  :secret", "user:   "])
def test_parse_auth_refuses_malformed_values(text):
    from app import parse_auth

    with pytest.raises(SystemExit) as err:
        parse_auth(text)
    assert "`--auth` must be user:password" in str(err.value.code)
    assert "secret" not in str(err.value.code)  # the password is never echoed
