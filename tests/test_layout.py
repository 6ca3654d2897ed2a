"""The package layout: the layers point one way, enforced by import-linter's contracts in pyproject.toml (run by
`.ci/run` as `lint-imports`), lazy (in-function) and TYPE_CHECKING imports counted like the others."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def copy_of_the_code(tmp_path: Path) -> Path:
    for name in ("pipelines", "ui"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold_on_this_code(copy_of_the_code):
    done = _lint(copy_of_the_code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(("module", "planted", "contract"), [
    # a lazy import inside a function, the kind that used to dodge cycles
    ("pipelines/denoise/loop.py", "def _planted():\n    from pipelines.serving import workers  # noqa\n",
     "The denoising loop never imports the serving layer"),
    ("pipelines/request/schema.py", "def _planted():\n    import pipelines.models.manager  # noqa\n",
     "The request layer imports nothing of the project but pipelines.errors"),
    ("ui/app.py", "def _planted():\n    from pipelines.vae import io  # noqa\n",
     "The UI reaches the engine through its interface"),
    ("pipelines/planner.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.engine import Engine\n",
     "No import cycles"),  # engine -> planner already: planner -> engine closes a cycle
])
def test_a_planted_violation_breaks_its_contract(copy_of_the_code, module, planted, contract):
    path = copy_of_the_code / module
    path.write_text(path.read_text() + "\n\n" + planted)
    done = _lint(copy_of_the_code)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts", 1)[1]
    assert contract in broken, done.stdout


def test_the_request_contract_names_every_other_module_of_the_project():
    """A new top-level module cannot slip past the request layer's contract: it must be added to its list."""
    contract = next(c for c in _contracts() if c.get("source_modules") == ["pipelines.request"])
    top = {f"pipelines.{p.stem if p.suffix else p.name}" for p in (ROOT / "pipelines").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert set(contract["forbidden_modules"]) == (top - {"pipelines.request", "pipelines.errors"}) | {"ui"}
