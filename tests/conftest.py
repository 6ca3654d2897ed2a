"""Shared fixtures: tiny offline models (built once per test session), seeds, no network."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# One share of the cores per xdist worker: 2 workers x 2 threads on 2 cores made OpenMP threads spin against
# each other, and tile-by-tile code (many small ops) ran up to 20x slower than alone.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # the app processes the CLI tests start


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny models, shared by the session (TESSERA_CACHE points at it)."""
    root = tmp_path_factory.getbasetemp() / "tessera-cache"
    os.environ["TESSERA_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache) -> Path:
    from pipelines.models.tiny import ensure_tiny

    return ensure_tiny("tiny", tiny_cache / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_cache) -> Path:
    from pipelines.models.tiny import ensure_tiny

    return ensure_tiny("tiny-sdxl", tiny_cache / "tiny")


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def manager(tiny_cache, tmp_path_factory):
    """A model manager on CPU fp32 with an empty local models folder (tiny models come from the cache)."""
    from pipelines.models.manager import ModelManager

    models = tmp_path_factory.mktemp("models")
    return ModelManager(models, device="cpu", dtype="fp32")


@pytest.fixture
def engine(manager, tmp_path):
    """A fresh engine (own caches) writing into a temporary outputs folder."""
    from pipelines.engine import Engine

    return Engine(manager, tmp_path / "outputs")


def tiny_request(**kw):
    """A small, fast request on the tiny model (64x64, 3 steps) with overrides."""
    from pipelines.request.schema import GenerationRequest

    base = dict(model="tiny", prompt="a red fox in the snow", width=64, height=64, steps=3, seed=42,
                sampler="DPM++ 2M Karras")
    base.update(kw)
    return GenerationRequest(**base)


@pytest.fixture
def req_factory():
    return tiny_request


@contextlib.contextmanager
def running_app(engine, *, queue_size: int = 8, auth: dict | None = None, demos: list | None = None):
    """The real Gradio app over `engine` (default model tiny) on a free loopback port; yields its URL.

    `auth`: keyword arguments from `ui.auth.auth_launch_kwargs` (users and the login back-off), as app.py passes.
    `demos`: a list that receives the launched Blocks (to look at a component's server-side state)."""
    import socket

    from pipelines.serving.service import make_backend
    from ui.app import create_demo, launch_kwargs

    engine.default_model = "tiny"
    demo = create_demo(make_backend(engine), queue_size=queue_size)
    if demos is not None:
        demos.append(demo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **(auth or {}),
                **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def assert_valid_png(path, size: tuple[int, int] = (64, 64)) -> str:
    """The file is a complete PNG of `size` with a `parameters` text that parses back; returns that text."""
    from PIL import Image

    from pipelines.image_info import read_parameters
    from pipelines.metadata import request_from_infotext

    with Image.open(path) as img:
        img.verify()  # checks every chunk's CRC: a truncated file fails here
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size == size
    text = read_parameters(path)
    assert text, f"{Path(path).name} has no parameters"
    request_from_infotext(text)
    return text


@pytest.fixture
def tiny(manager):
    """The built-in tiny SD1 model, loaded (cached by the session's manager)."""
    return manager.get("tiny")


@pytest.fixture(scope="module")
def sd(tiny_dir: Path):
    """A PromptEncoder over the tiny SD1 tokenizer and text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.prompts.encoding import PromptEncoder

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    return PromptEncoder([tokenizer], [CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")], pooled=False)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path):
    """A PromptEncoder over the tiny SDXL's two tokenizers and text encoders."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipelines.prompts.encoding import PromptEncoder

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl_dir / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl_dir / "text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_dir / "text_encoder_2")]
    return PromptEncoder(tokenizers, encoders, pooled=True)


def stage_spec(**kw):
    """A small txt2img StageSpec (64², DDIM, CFG 7, seed 3); keywords override any field."""
    from pipelines.denoise.stages import StageSpec

    base = dict(prompt="a fox", negative_prompt="blur", width=64, height=64, steps=4, sampler="DDIM", cfg="7",
                seeds=[3])
    base.update(kw)
    return StageSpec(**base)

