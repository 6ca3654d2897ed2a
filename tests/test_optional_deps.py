"""Missing packages: one line naming what to install (CLI exit 2, gr.Error in the UI), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from pipelines.control.preprocessors import preprocess
from pipelines.errors import ModelError, TesseraError, ValidationError
from pipelines.optional import OPTIONAL, MissingDependencyError, require

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers -> ImportError


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_require_names_the_package_to_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError) as err:
        require(module)
    message = str(err.value)
    assert f"pip install {OPTIONAL[module][0]}" in message and "\n" not in message
    assert isinstance(err.value, TesseraError)  # the UI shows it as gr.Error, the CLI exits 2


def test_require_refuses_an_undeclared_module():
    with pytest.raises(KeyError, match="OPTIONAL"):
        require("numpy")


def test_xformers_missing_fails_the_model_manager_with_one_line(no_xformers, tmp_path):
    from pipelines.models.manager import ModelManager

    with pytest.raises(MissingDependencyError, match=r"^--attention xformers needs .*pip install xformers$"):
        ModelManager(tmp_path, device="cpu", dtype="fp32", attention="xformers")


def test_cli_xformers_missing_exits_2_with_the_line(no_xformers, tmp_path, capsys, tiny_cache):
    from cli import main

    code = main(["generate", "--model", "tiny", "--attention", "xformers", "--prompt", "x", "--out",
                 str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: --attention xformers needs the optional package xformers: pip install xformers"]


def test_app_xformers_missing_exits_2_before_launch(no_xformers, tmp_path, capsys):
    import app

    assert app.main(["--attention", "xformers", "--models-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "pip install xformers" in capsys.readouterr().err


def test_cli_depth_without_controlnet_aux_exits_2(monkeypatch, tmp_path, capsys, tiny_cache):
    from cli import main

    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "map.png")
    code = main(["generate", "--model", "tiny", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "2",
                 "--control", f"depth:{tmp_path / 'map.png'}", "--out", str(tmp_path / "out"),
                 "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install controlnet-aux" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.png"))[1:]  # only the map: nothing was generated


def test_ui_depth_preview_without_controlnet_aux_is_gr_error(monkeypatch, engine):
    from pipelines.serving.service import make_backend
    from ui.runner import user_errors

    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    with pytest.raises(gr.Error) as err, user_errors("Preview"):
        make_backend(engine).control_preview(Image.new("RGB", (64, 64)), "depth", 100, 200)
    assert "pip install controlnet-aux" in str(err.value) and "unexpectedly" not in str(err.value)


def test_controlnet_aux_broken_import_is_one_line(monkeypatch, tmp_path):
    import types

    from pipelines import optional

    def broken(name):
        raise RuntimeError("undefined symbol in _C.so\nmore detail")

    monkeypatch.setattr(optional, "importlib", types.SimpleNamespace(import_module=broken))
    with pytest.raises(ModelError) as err:
        preprocess("depth", Image.new("RGB", (64, 64)), annotators_dir=tmp_path)
    assert str(err.value) == ("depth: controlnet-aux is installed but failed to import: undefined symbol in _C.so; "
                              "reinstall it (pip install -U controlnet-aux)")


def test_lms_without_scipy_is_a_sampler_error_not_a_traceback():
    """diffusers without scipy holds a placeholder LMSDiscreteScheduler that raises ImportError when built."""
    code = (
        "import sys; sys.modules['scipy'] = None\n"
        "from pipelines.errors import ValidationError\n"
        "from pipelines.denoise.schedulers import make_scheduler\n"
        "try:\n"
        "    make_scheduler('LMS Karras', {'num_train_timesteps': 1000})\n"
        "except ValidationError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("`sampler` needs scipy, missing here: pip install -r requirements.txt, or pick "
                                  "another sampler, got 'LMS Karras'")
    assert issubclass(ValidationError, TesseraError)
