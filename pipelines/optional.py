"""Optional third-party packages: the one list of them, and a one-line error naming what to install.

Everything else the code imports must be a line of requirements.txt (runtime) or requirements-dev.txt (tests);
`.ci/check_deps.py` checks that with deptry and accepts an import missing from both only when it is listed here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pipelines.errors import TesseraError

# import name -> (pip package, what needs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "xformers": ("xformers", "--attention xformers"),
    "controlnet_aux": ("controlnet-aux", "the depth/openpose/lineart/... ControlNet preprocessors"),
    "spaces": ("spaces", "ZeroGPU on Hugging Face Spaces"),
    "pynvml": ("nvidia-ml-py", "GPU memory and utilisation readings"),
    "ray": ("ray[serve]", "serving on a Ray cluster"),
}


class MissingDependencyError(TesseraError):
    """An optional package a chosen feature needs is not installed (or fails to import)."""


def missing_message(module: str, feature: str | None = None) -> str:
    """E.g. "--attention xformers needs the optional package xformers: pip install xformers"."""
    package, default_feature = OPTIONAL[module]
    return f"{feature or default_feature} needs the optional package {package}: pip install {package}"


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import optional `module` (a key of OPTIONAL), or raise MissingDependencyError with a one-line message."""
    if module not in OPTIONAL:
        raise KeyError(f"{module!r} is not declared in pipelines.optional.OPTIONAL")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(missing_message(module, feature)) from err
    except Exception as err:  # installed but broken (e.g. built for another torch)
        package = OPTIONAL[module][0]
        raise MissingDependencyError(f"{package} is installed but failed to import: "
                                     f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}; "
                                     f"reinstall it (pip install -U {package})") from err
