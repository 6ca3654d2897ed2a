"""Tessera's Gradio UI: Blocks factories over a backend of plain callables (no torch here; see ui.app)."""
