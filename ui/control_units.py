"""The ControlNet units the UI and the API offer, and their flat names (defined by the UI's backend)."""

