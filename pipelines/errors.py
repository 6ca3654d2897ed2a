"""Domain exceptions. Every message names what is wrong, the value given, and how to fix it."""

from __future__ import annotations

from typing import Any


class TesseraError(Exception):
    """Base of every error this project raises on purpose; the UI shows it, the CLI exits 2."""


class ValidationError(TesseraError, ValueError):
    """A request field (or CLI option, preset key, API parameter) has a value we cannot use."""

    def __init__(self, field: str, value: Any, fix: str):
        self.field, self.value, self.fix = field, value, fix
        try:
            shown = repr(value)
        except ValueError:  # Python will not print ints of more than 4300 digits
            shown = f"<{type(value).__name__} too long to show>"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"`{field}` {fix}, got {shown}")


class ModelError(TesseraError):
    """A model (checkpoint, upscaler, ControlNet, LoRA) is unknown, unreadable or could not be fetched."""


class OfflineError(ModelError):
    """A hub download was needed but the network (or the hub) is unreachable."""


class CancelledError(TesseraError):
    """The user (or a disconnected client) stopped the generation."""


class OutOfMemoryError(TesseraError):
    """The device ran out of memory even after the automatic fallbacks; the message names what to lower."""
