"""CI's type checker (mypy, configured in pyproject.toml): .ci/run runs it, its config covers pipelines/ and ui/ without
silencing our own code, and the config's checks do fail on a wrong annotation."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def _mypy_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def test_ci_runs_the_type_checker_after_the_lint_and_before_the_tests():
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ruff, mypy = lines.index("python -m ruff check ."), lines.index("python -m mypy")
    tests = next(i for i, line in enumerate(lines) if "python -m pytest" in line)
    assert ruff + 1 == mypy < tests


def test_the_checker_is_pinned_in_the_dev_requirements_and_named_in_the_readme():
    pins = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    assert any(re.fullmatch(r"mypy==[\d.]+", pin) for pin in pins), pins
    assert "python -m mypy" in (ROOT / "README.md").read_text()


def test_config_checks_pipelines_and_ui_and_silences_only_third_party_modules():
    config = _mypy_config()
    assert config["files"] == ["pipelines", "ui"]
    assert "ignore_missing_imports" not in config and "ignore_errors" not in config  # nothing blanket
    ours = ("pipelines", "ui", "app", "cli", "tests")
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert set(override) == {"module", "ignore_missing_imports"}, override
        assert not [m for m in modules if m.split(".")[0] in ours], modules


def test_every_type_ignore_in_pipelines_and_ui_names_its_error_code():
    bare = [f"{path.relative_to(ROOT)}:{number}"
            for path in sorted([*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "ui").rglob("*.py")])
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"#\s*type:\s*ignore(?!\[)", line)]
    assert bare == []


def test_the_configured_checker_fails_on_a_wrong_annotation(tmp_path):
    """The repository's config, on a fake module: a wrong return type and a None not narrowed are errors (the second
    only because check_untyped_defs also checks unannotated functions)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int) -> str:\n    return x\n\n\n"
                   "def g():\n    value: int | None = None\n    return value + 1\n")
    good = tmp_path / "good.py"
    good.write_text("def f(x: int) -> str:\n    return str(x)\n")
    args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache")]
    out, _, status = api.run([*args, str(bad)])
    assert status == 1, out
    assert 'bad.py:2: error: Incompatible return value type (got "int", expected "str")' in out
    assert "bad.py:7: error: Unsupported operand types" in out
    out, _, status = api.run([*args, str(good)])
    assert status == 0, out


def test_a_saved_file_outside_the_served_folders_comes_back_as_a_str_gradio_accepts(tmp_path, monkeypatch):
    """Found by the type checker: `servable` returned shutil.copy2's Path for files it copies, which the API's
    FileData(path=...) refuses; it returns the str its annotation promises."""
    from ui.api import file_data
    from ui.runner import servable

    work, temp, outputs = (tmp_path / name for name in ("work", "temp", "outputs"))
    for folder in (work, temp, outputs):
        folder.mkdir()
    (outputs / "00001.png").write_bytes(b"png")
    monkeypatch.chdir(work)
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    served = servable(outputs / "00001.png")
    assert isinstance(served, str) and served == str(temp / "tessera-outputs" / "00001.png")
    assert Path(served).read_bytes() == b"png"
    assert file_data(served)["path"] == served
    assert servable(str(temp / "tessera-outputs" / "00001.png")) == served  # already servable: not copied again
