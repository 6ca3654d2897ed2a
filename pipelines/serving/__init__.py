"""Serving: the backend interface the UI talks to (`service`), a worker per device (`workers`), one image's
tiles across devices (`multi_device`) and the Ray Serve cluster (`cluster`)."""
