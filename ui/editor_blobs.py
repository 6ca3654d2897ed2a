"""Bounded storage for the ImageEditor's canvas exports (Gradio's `accept_blobs` server route).

On every change the browser's editor posts its background, composite and each layer as PNG blobs to
`/gradio_api/component_server` (fn_name "accept_blobs") under a fresh random id, and the next event's value names
only that id. Gradio keeps every posted id in a plain dict on the component until an event reads it, so stale ids
pile up for the life of the server (a stroke each), and its layer `index` is client-chosen: `index=10000000`
grows a list of ten million slots (~77 MB for a 1-byte blob), `index=-5` or `abc` give HTTP 500.

`bounded(editor)` replaces that route and dict on one editor instance:
- `type` must be background, composite or layer; a layer's `index` an integer below what the editor can send
  (1 for `layers=False`); the id short; exactly one file: anything else is HTTP 400 with a message naming the field.
- per session (the form's `session_hash`): at most `session_ids` ids and `session_bytes` bytes; a new id evicts
  that session's oldest (the browser only ever uses its latest), one id larger than the cap is HTTP 413.
- in all: at most `total_ids` ids and `total_bytes` bytes, the least recently written evicted first; ids expire
  `ttl_s` after their last write. Each blob is at most the app's max_file_size (Gradio's multipart parser).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, cast

import gradio as gr
from fastapi import HTTPException
from gradio.components.image_editor import EditorDataBlobs

log = logging.getLogger(__name__)

KINDS = ("background", "composite", "layer")
MAX_ID_CHARS = 64
MAX_EXTRA_LAYERS = 8  # layers a user may add when the editor allows additional layers


@dataclass(frozen=True)
class BlobLimits:
    session_ids: int = 3
    session_bytes: int = 64 * 2**20  # one export: background, composite and a layer of at most 20 MB each
    total_ids: int = 64
    total_bytes: int = 192 * 2**20
    ttl_s: float = 30 * 60


@dataclass
class _Entry:
    session: str
    blobs: EditorDataBlobs
    size: int = 0
    written: float = 0.0


def _size(blobs: EditorDataBlobs) -> int:
    return len(blobs.background or b"") + len(blobs.composite or b"") + sum(len(b or b"") for b in blobs.layers)


def bad_request(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=f"image editor upload refused: {message}")


@dataclass
class BlobStore:
    """The editor's `blob_storage`: Gradio's preprocess reads it with get / in / pop; `put` is the only writer."""

    max_layers: int = 1
    limits: BlobLimits = field(default_factory=BlobLimits)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest write first
        self._lock = threading.Lock()
        self.total = 0

    # --- what Gradio's ImageEditor.preprocess uses ---------------------------------------------------------------
    def get(self, blob_id: Any, default: Any = None) -> Any:
        with self._lock:
            self._expire()
            entry = self._entries.get(blob_id) if isinstance(blob_id, str) else None
            return entry.blobs if entry else default

    def __contains__(self, blob_id: object) -> bool:
        return self.get(blob_id) is not None

    def pop(self, blob_id: Any, default: Any = None) -> Any:
        with self._lock:
            entry = self._drop(blob_id) if isinstance(blob_id, str) and blob_id in self._entries else None
            return entry.blobs if entry else default

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def sessions(self) -> dict[str, int]:
        """Bytes held per session (for tests and logs)."""
        with self._lock:
            out: dict[str, int] = {}
            for entry in self._entries.values():
                out[entry.session] = out.get(entry.session, 0) + entry.size
            return out

    # --- the route -----------------------------------------------------------------------------------------------
    def put(self, session: str, blob_id: str, kind: str, index: int | None, blob: bytes) -> None:
        limits = self.limits
        with self._lock:
            self._expire()
            entry = self._entries.pop(blob_id, None)
            if entry is not None and entry.session != session:
                self._entries[blob_id] = entry
                raise bad_request("`id` belongs to another session")
            if entry is None:
                entry = _Entry(session, EditorDataBlobs(background=None, layers=[], composite=None))
            else:
                self.total -= entry.size
            blobs = entry.blobs
            if kind == "layer":
                assert index is not None
                blobs.layers.extend([None] * (index + 1 - len(blobs.layers)))
                blobs.layers[index] = blob
            elif kind == "background":
                blobs.background = blob
            else:
                blobs.composite = blob
            entry.size, entry.written = _size(blobs), self.clock()
            if entry.size > limits.session_bytes:
                log.warning("image editor: refused id of %d bytes from session %s", entry.size, session[:16])
                raise bad_request(f"the canvas is larger than {limits.session_bytes // 2**20} MB in all", 413)
            mine = [key for key, e in self._entries.items() if e.session == session]
            held = sum(self._entries[key].size for key in mine)
            while mine and (len(mine) + 1 > limits.session_ids or held + entry.size > limits.session_bytes):
                held -= self._drop(mine.pop(0)).size  # this session's oldest export: the browser no longer uses it
            while self._entries and (len(self._entries) + 1 > limits.total_ids
                                     or self.total + entry.size > limits.total_bytes):
                old_id = next(iter(self._entries))
                log.info("image editor: storage full, dropped the oldest canvas export (session %s)",
                         self._entries[old_id].session[:16])
                self._drop(old_id)
            self._entries[blob_id] = entry
            self.total += entry.size

    def _drop(self, blob_id: str) -> _Entry:
        entry = self._entries.pop(blob_id)
        self.total -= entry.size
        return entry

    def _expire(self) -> None:
        deadline = self.clock() - self.limits.ttl_s
        while self._entries:
            blob_id, entry = next(iter(self._entries.items()))
            if entry.written > deadline:
                break
            self._drop(blob_id)


def parse_blob_form(data: Any, max_layers: int) -> tuple[str, str, str, int | None, bytes]:
    """The route's multipart form (Gradio's DataWithFiles) -> (session, id, type, index, blob); HTTP 400 if bad."""
    form = getattr(data, "data", None)
    files = getattr(data, "files", None)
    if not isinstance(form, dict) or not isinstance(files, list):
        raise bad_request("send a multipart form with the fields type, index, id and one file")
    kind = form.get("type")
    if kind not in KINDS:
        raise bad_request(f"`type` must be one of {', '.join(KINDS)}")
    blob_id, session = form.get("id"), form.get("session_hash")
    if not isinstance(blob_id, str) or not 0 < len(blob_id) <= MAX_ID_CHARS:
        raise bad_request(f"`id` must be a text of 1 to {MAX_ID_CHARS} characters")
    if not isinstance(session, str) or not session:
        raise bad_request("`session_hash` is missing")
    index: int | None = None
    raw = form.get("index")
    if kind == "layer":
        limit = "0 (this editor has one layer)" if max_layers == 1 else f"a whole number from 0 to {max_layers - 1}"
        text = raw.strip() if isinstance(raw, str) else ""
        if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) >= max_layers:
            raise bad_request(f"a layer's `index` must be {limit}")  # no sign, no fraction, no "null"
        index = int(text)
    if len(files) != 1 or not isinstance(files[0], (tuple, list)) or len(files[0]) != 2 \
            or not isinstance(files[0][1], (bytes, bytearray)):
        raise bad_request("send exactly one file")
    return session, blob_id, kind, index, bytes(files[0][1])


def editor_max_layers(editor: gr.ImageEditor) -> int:
    """How many layers the editor's browser side can send: its configured ones, plus a few if users may add more."""
    options = editor.layers
    count = max(1, len(options.layers or []))
    return count if options.disabled or not options.allow_additional_layers else count + MAX_EXTRA_LAYERS


def bounded(editor: gr.ImageEditor, limits: BlobLimits | None = None) -> gr.ImageEditor:
    """`editor` with a BlobStore for its canvas exports and a checked `accept_blobs` route (an instance attribute;
    the class is untouched)."""
    store = BlobStore(max_layers=editor_max_layers(editor), limits=limits or BlobLimits())

    def accept_blobs(self: gr.ImageEditor, data: Any) -> None:
        session, blob_id, kind, index, blob = parse_blob_form(data, store.max_layers)
        store.put(session, blob_id, kind, index, blob)

    cast(Any, accept_blobs)._is_server_fn = True  # what Gradio's component_server route looks for
    cast(Any, editor).blob_storage = store
    cast(Any, editor).accept_blobs = MethodType(accept_blobs, editor)
    return editor
