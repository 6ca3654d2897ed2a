"""Files from clients: only files that came through Gradio's upload route, never a path on the server.

`guard_uploads(demo)` holds every event of the app to this (each input whose value can carry a file: images,
the brush editor, galleries, API file parameters), before Gradio looks at the value; `open_upload` is the same
test for one API parameter, inside the endpoint.

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

import inspect
from collections.abc import Collection
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.blocks import BlockFunction
from gradio.components.api_component import Api
from gradio.context import LocalContext
from gradio.data_classes import FileData
from gradio.utils import abspath, get_upload_folder, is_allowed_file
from gradio_client.utils import is_file_obj_with_meta, is_http_url_like, value_is_file

UI_REFUSAL = ("Images must be uploaded from this page (or sent with gradio_client.handle_file); paths on the "
              "server and files the app produced are not accepted. Upload the image again.")
"""The one message for a file value of a UI event that is not an upload, whatever the value was."""


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


def _file_objects(value: Any) -> list[Any] | None:
    """The file objects in a file-taking input's value (any dict with a `path` or `url` key, at any depth), or None
    when the value cannot be a file value at all (a bare string, number...). None -> []."""
    if value is None:
        return []
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            return [value]
        found: list[Any] = []
        for item in value.values():
            if isinstance(item, dict | list):
                inner = _file_objects(item)
                found.extend(inner or [])
        return found
    if isinstance(value, list):
        found = []
        for item in value:
            inner = _file_objects(item)
            if inner is None:
                return None
            found.extend(inner)
        return found
    return None


def only_uploads(value: Any, uploads: Collection[str], blocked: Collection[str] = ()) -> bool:
    """Whether every file in an input's value is an upload (`uploaded_path`); a data: URL is none."""
    files = _file_objects(value)
    if files is None:
        return False
    for file in files:
        url = file.get("url")
        if isinstance(url, str) and url.startswith("data:"):
            return False
        if uploaded_path(file, uploads, blocked) is None:
            return False
    return True


def takes_files(block: Any) -> bool:
    """Whether an input component's value can carry files: its API schema holds Gradio's FileData."""
    if getattr(block, "stateful", False):
        return False  # a gr.State's value is the server's own, never sent by the client
    try:
        return bool(value_is_file(block.api_info()))
    except Exception:  # a component without an API schema takes no files
        return False


def _message(block_fn: BlockFunction, index: int, block: Any) -> str:
    """UI_REFUSAL for a widget; for a `gr.api` endpoint, `refusal` of the parameter's name (its docs' name)."""
    if not isinstance(block, Api):
        return UI_REFUSAL
    try:
        return refusal(list(inspect.signature(block_fn.fn).parameters)[index])  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return refusal(str(block.label))


def check_event_files(demo: gr.Blocks, block_fn: BlockFunction, inputs: list[Any]) -> None:
    """Refuse an event whose file-taking inputs name anything but uploads (before any file is looked at)."""
    uploads = frozenset(getattr(demo, "upload_file_set", set()).copy())
    blocked = list(getattr(demo, "blocked_paths", None) or [])
    for i, block in enumerate(block_fn.inputs):
        if i < len(inputs) and takes_files(block) and not only_uploads(inputs[i], uploads, blocked):
            raise gr.Error(_message(block_fn, i, block), print_exception=False)


def guard_uploads(demo: gr.Blocks) -> gr.Blocks:
    """Make every event of `demo` check its file inputs (`check_event_files`) before Gradio preprocesses them.

    Gradio checks a file object with its meta only for lying in its upload folder (where the served copies of
    results lie too), and passes a dict without the meta, or a string, to the component unchecked: the widget then
    opens whatever path the client named. Wrapping `preprocess_data` (an instance attribute: the class and other
    apps are untouched) covers every event, current and future, the queued and the direct ones alike."""
    original = demo.preprocess_data

    async def preprocess_data(block_fn: BlockFunction, inputs: list[Any], state: Any, explicit_call: bool = False):
        if not explicit_call:  # an HTTP event (an explicit call is Python code calling the app); one row of a batch
            check_event_files(demo, block_fn, inputs)
        return await original(block_fn, inputs, state, explicit_call)

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]
    return demo
