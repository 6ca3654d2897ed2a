"""The package layout: modules that moved into subpackages keep their old flat names."""

import importlib

import pytest

import pipelines


@pytest.mark.parametrize("old", sorted(pipelines.MOVED))
def test_an_old_flat_name_is_the_same_module_object_as_its_new_place(old):
    new = importlib.import_module(f"pipelines.{pipelines.MOVED[old]}")
    alias = importlib.import_module(f"pipelines.{old}")
    assert alias is new
    assert new.__spec__.name == new.__name__ == f"pipelines.{pipelines.MOVED[old]}"  # not rewritten by the alias


def test_from_import_of_an_old_name_and_monkeypatching_through_it_reach_the_real_module(monkeypatch):
    from pipelines import vae_io
    from pipelines.vae import io

    monkeypatch.setattr(vae_io, "to_pil", "patched")
    assert io.to_pil == "patched"


@pytest.mark.parametrize(("package", "name"), [("prompts", "parse_weighted"), ("models", "ModelManager"),
                                               ("control", "load_control_image"), ("control", "preprocess")])
def test_the_packages_that_replaced_a_module_still_offer_its_names(package, name):
    module = importlib.import_module(f"pipelines.{package}")
    assert callable(getattr(module, name))


def test_an_unknown_old_name_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pipelines.no_such_module")


def test_pipelines_never_import_the_ui():
    """The layers point one way: ui/ may import pipelines/, never the reverse."""
    import re
    from pathlib import Path

    root = Path(pipelines.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"^\s*(from ui[. ]|import ui\b)", p.read_text(), re.M)]
    assert offenders == []
