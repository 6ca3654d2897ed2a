"""The CI dependency check (.ci/check_deps.py, deptry): the repository passes, and a fake tree shows it can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_check():
    spec = importlib.util.spec_from_file_location("check_deps", ROOT / ".ci" / "check_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_deps = _load_check()


def _tree(root: Path, files: dict[str, str], runtime: str = "numpy\n", dev: str = "-r requirements.txt\npytest\n"):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "requirements.txt").write_text(runtime)
    (root / "requirements-dev.txt").write_text(dev)
    return root


def _check(root: Path, optional=("xformers",)) -> tuple[int, str]:
    return check_deps.check(root, optional=optional, indirect=())


BASE = {"app.py": "import numpy\n", "pipelines/__init__.py": "", "pipelines/a.py": "import numpy as np\n",
        "tests/__init__.py": "", "tests/test_a.py": "import pytest\nimport numpy\nfrom pipelines import a\n"}


def test_repository_imports_all_map_to_requirements():
    code, report = check_deps.check(ROOT)
    assert code == 0, report


def test_clean_fake_tree_passes_and_declared_optional_is_accepted(tmp_path):
    tree = _tree(tmp_path, {**BASE, "pipelines/b.py": "def f():\n    import xformers\n"})
    code, report = _check(tree)
    assert code == 0, report


@pytest.mark.parametrize(("extra", "expect"), [
    ({"pipelines/b.py": "def f():\n    import xformers\n"}, "DEP001 'xformers'"),  # optional, but not declared
    ({"pipelines/b.py": "import not_a_real_package_xyz\n"}, "DEP001 'not_a_real_package_xyz'"),
    ({"ui/__init__.py": "", "ui/c.py": "import pytest\n"}, "DEP004 'pytest'"),  # a test-only package at runtime
    ({"tests/test_b.py": "import hypothesis\n"}, "DEP003 'hypothesis'"),  # installed, in no requirements file
])
def test_undeclared_import_fails(tmp_path, extra, expect):
    code, report = _check(_tree(tmp_path, {**BASE, **extra}), optional=())
    assert code == 1 and expect in report, report


def test_unused_runtime_requirement_fails_unless_explained(tmp_path):
    tree = _tree(tmp_path, BASE, runtime="numpy\npillow\n")
    code, report = _check(tree)
    assert code == 1 and "DEP002 'pillow'" in report
    assert check_deps.check(tree, optional=(), indirect=("pillow",))[0] == 0


def _readme_commands() -> list[str]:
    """The two commands of the README's "Set up (fresh machine)" section (install and start; tests)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up (fresh machine)", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_test_command_word_for_word_in_a_fresh_venv():
    install, tests = _readme_commands()
    assert install == "python -m pip install -r requirements.txt && python app.py"
    assert tests == "python -m pip install -r requirements-dev.txt && python -m pytest -n 2 --dist loadgroup"
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[-1] == tests  # the last command: its status is the script's
    assert any(line.startswith('python3 -m venv "$venv"') for line in lines)
    assert "--system-site-packages" not in "\n".join(lines)
    assert "python -m ruff check ." in lines and "python .ci/check_deps.py" in lines
    assert ".venv-ci/" in (ROOT / ".gitignore").read_text().splitlines()
