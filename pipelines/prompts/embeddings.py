"""Textual-inversion embeddings: `models/embeddings/*.safetensors`, used by writing a file's stem in the prompt.

As in A1111 (`modules/textual_inversion/textual_inversion.py`: `EmbeddingDatabase`, `create_embedding_from_data`),
a file holds either one tensor of vectors ([n, d] or [d]: A1111's `emb_params`, the older `string_to_param.*`,
diffusers' `{"<token>": ...}` / learned_embeds) or SDXL's pair `clip_l` [n, 768] + `clip_g` [n, 1280]. Only
safetensors files are read (never pickles). File headers are parsed in pure Python (no torch), so the UI's token
counter knows each embedding's vector count without loading anything; vectors are loaded when a prompt uses them.
The prompt side (matching names in the token stream, substituting vectors) is `pipelines.prompts.encoding`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import ValidationError
from pipelines.lru import LRUCache

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_VECTORS = 75  # an embedding never spans two 75-token chunks, so it cannot be longer than one
_MAX_HEADER = 1 << 20  # bytes of safetensors JSON header we accept (an embedding's header is ~100 bytes)
SDXL_KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP-G) vectors


@dataclass(frozen=True)
class Embedding:
    """One embedding file, as its header describes it."""

    name: str
    """The file's stem: the word that uses it in a prompt."""
    path: Path
    size: int
    mtime_ns: int
    keys: tuple[str, ...] = ()
    """The tensors holding the vectors: one key, or SDXL's ("clip_l", "clip_g")."""
    widths: tuple[int, ...] = ()
    """Each key's vector width."""
    vectors: int = 1
    """Vectors (token positions) it takes in the prompt."""
    problem: str | None = None
    """Why the file cannot be used (unreadable, several tensors, ...); reported when a prompt names it."""

    @property
    def identity(self) -> tuple[str, int, int]:
        """Changes when the file is replaced: part of the prompt cache key."""
        return self.name, self.size, self.mtime_ns


def _header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header ({tensor name: {"dtype", "shape", "data_offsets"}}), checked before any load."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= _MAX_HEADER:
            raise ValueError(f"has a header of {length} bytes (a safetensors embedding's is well under 1 MiB)")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("has no tensor table")
    header.pop("__metadata__", None)
    return header


def _shape(header: dict[str, Any], key: str) -> tuple[int, int]:
    """(vectors, width) of tensor `key`: [n, d] or a single [d] vector."""
    shape = header[key].get("shape") if isinstance(header[key], dict) else None
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"holds {key!r} of shape {shape}, not [vectors, width] or [width]")
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def _layout(header: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """(keys, widths, vectors) of an embedding's tensor table, following A1111's `create_embedding_from_data`."""
    if any(k in header for k in SDXL_KEYS):
        missing = [k for k in SDXL_KEYS if k not in header]
        if missing:
            raise ValueError(f"is an SDXL embedding without {missing[0]!r} (SDXL needs both clip_l and clip_g)")
        (n_l, w_l), (n_g, w_g) = _shape(header, "clip_l"), _shape(header, "clip_g")
        if n_l != n_g:
            raise ValueError(f"has {n_l} clip_l vectors but {n_g} clip_g vectors")
        return SDXL_KEYS, (w_l, w_g), n_g
    if len(header) != 1:
        raise ValueError(f"holds {len(header)} tensors ({', '.join(sorted(header)[:4])}); an embedding holds one")
    key = next(iter(header))
    vectors, width = _shape(header, key)
    return (key,), (width,), vectors


def describe(path: Path) -> Embedding:
    """An `Embedding` for `path` from its header (a bad file gets `problem` set, never an exception)."""
    stat = path.stat()
    base = Embedding(path.stem, path, stat.st_size, stat.st_mtime_ns)
    try:
        keys, widths, vectors = _layout(_header(path))
    except (OSError, ValueError, KeyError, struct.error) as exc:
        return Embedding(base.name, path, base.size, base.mtime_ns, problem=str(exc) or type(exc).__name__)
    if vectors > MAX_VECTORS:
        return Embedding(base.name, path, base.size, base.mtime_ns,
                         problem=f"has {vectors} vectors, more than one {MAX_VECTORS}-token chunk holds")
    return Embedding(base.name, path, base.size, base.mtime_ns, keys, widths, vectors)


def _error(emb: Embedding, fix: str) -> ValidationError:
    """"`embedding` <fix>, got 'embeddings/<file>'" (the path below the models folder)."""
    return ValidationError("embedding", f"{emb.path.parent.name}/{emb.path.name}", fix)


class EmbeddingLibrary:
    """The embeddings folder: listed on demand (a replaced file is seen at once), vectors loaded when used."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._described: dict[Path, Embedding] = {}
        self._tensors = LRUCache(32)
        self._hashes: dict[tuple[str, int, int], str] = {}

    def snapshot(self) -> Embeddings:
        """The embeddings now in the folder (by name; the first file of a name in sorted order wins)."""
        files = sorted(self.folder.rglob("*.safetensors")) if self.folder.is_dir() else []
        found: dict[str, Embedding] = {}
        with self._lock:
            for path in files:
                try:
                    stat = path.stat()
                except OSError:
                    continue
                emb = self._described.get(path)
                if emb is None or (emb.size, emb.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                    emb = self._described[path] = describe(path)
                if emb.name in found:
                    log.warning("embedding %s ignored: %s has the same name", path, found[emb.name].path)
                    continue
                found[emb.name] = emb
        return Embeddings(found, self)

    def counts(self) -> dict[str, int]:
        """{name: vectors} of the folder's embeddings (what the token counter needs)."""
        return self.snapshot().counts

    def tensors(self, emb: Embedding) -> dict[str, torch.Tensor]:
        """The file's tensors (CPU, float32), loaded once per file version."""
        def load() -> dict[str, torch.Tensor]:
            from safetensors.torch import load_file

            try:
                data = load_file(str(emb.path), device="cpu")
            except Exception as exc:  # safetensors raises its own error types on damaged files
                raise _error(emb, f"could not be read ({exc}); replace or remove the file") from None
            return {k: data[k].float() for k in emb.keys}

        with self._lock:
            return self._tensors.get(emb.identity, load)

    def short_hash(self, emb: Embedding) -> str:
        """A1111's `shorthash`: the first 12 hex digits of the file's sha256."""
        with self._lock:
            if emb.identity not in self._hashes:
                digest = hashlib.sha256()
                with open(emb.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                self._hashes[emb.identity] = digest.hexdigest()[:12]
            return self._hashes[emb.identity]


@dataclass
class Embeddings:
    """The embeddings one request uses: a snapshot of the folder, so a run sees one version of each file."""

    files: dict[str, Embedding] = field(default_factory=dict)
    library: EmbeddingLibrary | None = None

    @property
    def counts(self) -> dict[str, int]:
        """{name: vectors}: what the tokenizer side needs to match names and lay out chunks."""
        return {name: emb.vectors for name, emb in self.files.items()}

    def identity(self, names: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
        """The identities of embeddings `names` (prompt cache keys)."""
        return tuple(self.files[n].identity for n in names)

    def vectors(self, name: str, index: int, widths: list[int]) -> torch.Tensor:
        """Embedding `name`'s vectors [n, widths[index]] for text encoder `index` of a model whose encoders have
        token widths `widths` (one for SD 1.x/2.x, two for SDXL); a file that does not fit is a ValidationError."""
        emb = self.files[name]
        if emb.problem:
            raise _error(emb, f"{emb.problem}; replace the file or remove '{name}' from the prompt")
        sdxl_file, sdxl_model = emb.keys == SDXL_KEYS, len(widths) == 2
        if sdxl_model and not sdxl_file:
            raise _error(emb, f"holds one set of {emb.widths[0]}-wide vectors, but SDXL needs both clip_l "
                              f"({widths[0]}) and clip_g ({widths[1]}); use an SDXL embedding")
        if sdxl_file and not sdxl_model:
            raise _error(emb, f"is an SDXL embedding (clip_l {emb.widths[0]}, clip_g {emb.widths[1]}), but this "
                              f"model needs {widths[0]}-wide vectors; use an embedding made for this model family")
        if emb.widths != tuple(widths):
            have, want = " + ".join(map(str, emb.widths)), " + ".join(map(str, widths))
            raise _error(emb, f"holds {have}-wide vectors, but this model's text encoder needs {want}; use an "
                              f"embedding made for this model family")
        if self.library is None:
            raise RuntimeError("an Embeddings without its library has no vectors to load")
        return self.library.tensors(emb)[emb.keys[index]].reshape(emb.vectors, widths[index])

    def hashes_text(self, names: Iterable[str]) -> str | None:
        """A1111's `TI hashes` infotext value, "name: hash, name2: hash" (":" and "," dropped from names)."""
        if self.library is None:
            return None
        parts = [f"{n.replace(':', '').replace(',', '')}: {self.library.short_hash(self.files[n])}" for n in names]
        return ", ".join(parts) or None
