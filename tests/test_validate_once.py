"""A request is validated once on its way to the loop, whichever entry point sends it (#27): the UI's own
Generate event, the /generate API and the CLI each reach `validate` exactly once per request, though the UI
checks the values before it streams, and the service, the worker pool and the engine's entry points each
used to validate again."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from gradio_client import Client

import pipelines.engine
from tests.conftest import running_app

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def validations(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = pipelines.engine.validate

    def counting(req, limits=None):
        seen.append(req.prompt)
        return real(req, limits)

    monkeypatch.setattr(pipelines.engine, "validate", counting)
    return seen


@pytest.fixture
def app_url(engine):
    with running_app(engine) as url:
        yield url


def _ui_generate(url: str, prompt: str) -> None:
    """Click Generate as the page does: the event's inputs at their defaults, prompt and a small size set."""
    with httpx.Client(base_url=url, timeout=120) as http:
        config = http.get("config").json()
        components = {c["id"]: c for c in config["components"]}
        button = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "generate")
        dep = next(d for d in config["dependencies"] if [button, "click"] in d["targets"])
        data = []
        for cid in dep["inputs"]:
            props = components[cid]["props"]
            value = None if components[cid]["type"] == "state" else props.get("value")
            data.append({"prompt": prompt, **SMALL}.get(props.get("elem_id"), value))
        session = uuid.uuid4().hex
        body = {"fn_index": dep["id"], "data": data, "session_hash": session, "event_data": None,
                "trigger_id": button}
        assert http.post("gradio_api/queue/join", json=body).status_code == 200
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    assert message.get("success"), message
                    return
    raise AssertionError("the Generate event never completed")


def test_the_ui_generate_event_validates_once(app_url, validations):
    _ui_generate(app_url, "ui once")
    assert validations == ["ui once"]


def test_the_generate_api_validates_once(app_url, validations):
    files, texts = Client(app_url, verbose=False).predict(prompt="api once", **SMALL, api_name="/generate")
    assert len(files) == 1 and texts[0].startswith("api once")
    assert validations == ["api once"]


def test_the_cli_validates_once(tmp_path, tiny_cache, validations, monkeypatch, capsys):
    from cli import main

    monkeypatch.setenv("TESSERA_CACHE", str(tiny_cache))
    code = main(["generate", "--model", "tiny", "--prompt", "cli once", "--width", "64", "--height", "64",
                 "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--models-dir", str(tmp_path / "models"),
                 "--out", str(tmp_path / "out")])
    assert code == 0 and capsys.readouterr().out.strip().endswith(".png")
    assert validations == ["cli once"]
