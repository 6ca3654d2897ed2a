"""How the UI and the API name ControlNet units: a fixed number of units, each field under a flat name.

The engine and the CLI (`--control`, repeatable) take any number of units; the UI's tabs and the /generate API
offer `UI_CONTROL_UNITS`, named control_image, control_scale, ... for the first and control2_image, ... after it.
The UI's backend (`pipelines.serving.service`) owns these flat names; the UI and the API import them from here.
"""

from __future__ import annotations

UI_CONTROL_UNITS = 3


def control_name(unit: int, field: str) -> str:
    """Flat name of a ControlNet unit's field: control_scale for the first unit (0), control2_scale, ..."""
    return f"control{unit + 1 if unit else ''}_{field}"
