"""The ControlNet units the UI and the API offer, and their flat names (defined by the UI's backend)."""

from pipelines.serving.units import UI_CONTROL_UNITS, control_name  # noqa: F401 - re-exported for ui/
