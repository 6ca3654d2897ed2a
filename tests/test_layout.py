"""The package layout: the layers point one way."""

import pipelines


def test_pipelines_never_import_the_ui():
    """The layers point one way: ui/ may import pipelines/, never the reverse."""
    import re
    from pathlib import Path

    root = Path(pipelines.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"^\s*(from ui[. ]|import ui\b)", p.read_text(), re.M)]
    assert offenders == []
