"""API image parameters: only files that came through Gradio's upload route, never a path on the server.

Gradio checks a file object (a dict with `meta: {"_type": "gradio.FileData"}`, what `gradio_client.handle_file`
sends) before an endpoint runs: its path must lie in Gradio's upload folder (`gradio.utils.get_upload_folder()`:
GRADIO_TEMP_DIR, else <tempdir>/gradio), outside the app's `blocked_paths` (`processing_utils._check_allowed`
with `check_in_upload_folder=True`). A plain string or a dict without that meta is passed through untouched, so
`gr.api` endpoints would open any path a client names. Here every image parameter is held to that test, with
Gradio's own helpers, and to one more: the file must be one that Gradio's /upload route wrote
(`Blocks.upload_file_set`, the record Gradio keeps for its `delete_cache` sweep), not any file in the folder
(served copies of results, files Gradio fetched from a URL). Anything else gets one message that says nothing
about the path: not whether it exists, nor whether it is an image.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import LocalContext
from gradio.data_classes import FileData
from gradio.utils import abspath, get_upload_folder, is_allowed_file
from gradio_client.utils import is_file_obj_with_meta, is_http_url_like


def refusal(name: str) -> str:
    """The one message for an image parameter that is not an upload (the same whatever the value was)."""
    return (f"`{name}` must be a file uploaded with the request (gradio_client.handle_file(...)); "
            "paths on the server are not accepted")


def uploaded_path(payload: Any, uploads: Collection[str], blocked: Collection[str] = ()) -> str | None:
    """The path of a file Gradio received through its upload route, else None.

    Accepted: a FileData (object, or dict with Gradio's meta) whose path is an existing file in Gradio's upload
    folder, not under a `blocked` path (symlinks resolved), and listed in `uploads` (the files /upload wrote).
    Refused: plain strings, dicts without the meta, URLs, paths elsewhere on the server, files in the folder that
    no upload wrote, and paths that do not exist (so the folder's contents cannot be probed).
    """
    if isinstance(payload, FileData):
        payload = payload.model_dump()
    if not is_file_obj_with_meta(payload):
        return None
    path = payload.get("path")
    if not isinstance(path, str) or not path or is_http_url_like(path):
        return None
    absolute = str(abspath(path))
    if path not in uploads and absolute not in uploads and absolute not in {str(abspath(p)) for p in uploads}:
        return None
    allowed, _ = is_allowed_file(abspath(path), blocked_paths=list(blocked), allowed_paths=[],
                                 created_paths=[get_upload_folder()])
    resolved = Path(path).resolve()
    return str(resolved) if allowed and resolved.is_file() else None


def _running_uploads() -> tuple[frozenset[str], list[str]]:
    """(the files Gradio's /upload route wrote, the app's blocked paths) of the app serving this request."""
    blocks = LocalContext.blocks.get(None)
    uploads = getattr(blocks, "upload_file_set", None) or set()
    return frozenset(uploads.copy()), list(getattr(blocks, "blocked_paths", None) or [])


def open_upload(payload: Any, name: str) -> str | None:
    """An API image parameter -> the uploaded file's path, undecoded; None stays None; anything else is refused.

    The backend opens the file with its own checks (format, 64 MP read from the header before decoding), so a
    decompression bomb is refused with a clear message instead of being decoded here.
    """
    if payload is None:
        return None
    path = uploaded_path(payload, *_running_uploads())
    if path is None:
        raise gr.Error(refusal(name), print_exception=False)
    return path
