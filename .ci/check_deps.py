"""Dependency check (deptry): every third-party import maps to a requirements line.

Two passes, run in the environment that `pip install -r requirements-dev.txt` built (deptry maps import names to
distributions through the installed packages' metadata):

1. runtime code (app.py, cli.py, pipelines/, ui/, benchmarks/) against requirements.txt; a test-only package
   imported there fails (DEP004), and so does a requirements.txt line nothing uses unless `INDIRECT` says why;
2. tests/ against requirements-dev.txt (which includes requirements.txt).

An import missing from both files fails (DEP001), except the optional packages of `pipelines.optional.OPTIONAL`,
the one place they are declared (the tests may install one through requirements-dev.txt: ray[serve]). Usage: `python .ci/check_deps.py [ROOT]`; exit status 0 when clean.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("pipelines", "ui", "benchmarks", "tests", "app", "cli")
# Where deptry never looks for imports (a local venv, build outputs, the user's models).
EXCLUDE = r"\.venv.*|venv|\.git|outputs|models|\.whl|test-artifacts|\.ci"
# requirements.txt lines no module imports by name, and why each is there.
INDIRECT: dict[str, str] = {
    "torchvision": "spandrel and controlnet-aux import it; pinned to a build that matches torch",
    "accelerate": "diffusers' low-memory loading and model CPU offload",
    "peft": "diffusers' LoRA loading (load_lora_weights)",
    "gradio_client": "the documented API client (README), and the API tests",
    "scipy": "diffusers' LMS / LMS Karras samplers",
}


def _deptry(root: Path, target: str, runtime: str, dev: str | None, ignores: Mapping[str, Iterable[str]],
            exclude: str, skip: str = "") -> subprocess.CompletedProcess:
    rules = ",".join(f"{rule}={'|'.join(sorted(names))}" for rule, names in ignores.items() if names)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "pyproject.toml"
        config.write_text("[tool.deptry]\n")  # no [project] table: deptry then reads the requirements files
        if dev is None:
            dev = str(Path(tmp) / "no-dev-requirements.txt")
            Path(dev).write_text("")
        cmd = [sys.executable, "-m", "deptry", target, "--config", str(config), "--no-ansi",
               "--requirements-files", runtime, "--requirements-files-dev", dev,
               "--exclude", exclude]
        cmd += [arg for name in FIRST_PARTY for arg in ("--known-first-party", name)]
        cmd += ["--per-rule-ignores", rules] if rules else []
        cmd += ["--ignore", skip] if skip else []
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)


def check(root: Path = ROOT, optional: Iterable[str] | None = None,
          indirect: Iterable[str] | None = None) -> tuple[int, str]:
    """(0 when every import of `root`'s code maps to a requirements line, deptry's report of both passes)."""
    if optional is None:
        sys.path.insert(0, str(ROOT))
        from pipelines.optional import OPTIONAL

        optional = OPTIONAL
    optional = sorted(optional)
    indirect = sorted(INDIRECT if indirect is None else indirect)
    runtime = _deptry(root, ".", "requirements.txt", "requirements-dev.txt",
                      {"DEP001": optional, "DEP002": indirect, "DEP004": optional}, f"{EXCLUDE}|tests")
    # tests use a part of the runtime packages: only missing (DEP001) and transitive (DEP003) imports fail there
    tests = _deptry(root, "tests", "requirements-dev.txt", None, {"DEP001": optional}, EXCLUDE, skip="DEP002")
    report = []
    for name, run in (("runtime code vs requirements.txt", runtime), ("tests vs requirements-dev.txt", tests)):
        report.append(f"== {name}: {'ok' if run.returncode == 0 else 'FAILED'}\n{run.stdout}{run.stderr}")
    return (0 if runtime.returncode == 0 and tests.returncode == 0 else 1), "\n".join(report)


def main(argv: list[str]) -> int:
    code, report = check(Path(argv[0]).resolve() if argv else ROOT)
    sys.stdout.write(report)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
