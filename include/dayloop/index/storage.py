"""Saving, loading and fingerprinting an index; the stage's atomic meta-file write.

``faiss`` is imported inside functions only (see ``faiss_index``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.fileio import atomic_write_text, file_sha256

if TYPE_CHECKING:  # pragma: no cover - typing only
    import faiss

INDEX_FILENAME = "index.faiss"
META_FILENAME = "index_meta.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_index(index: faiss.Index, path: Path | str) -> Path:
    """Write ``index`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    import faiss

    # Not serving.fileio.atomic_write_bytes: FAISS writes through a path, streaming the
    # index to disk, whereas serialize_index would hold a second full copy in memory.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as sorted, indented JSON to ``path`` atomically and durably."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    # atomic_write_text syncs the file; the rename is durable once the folder is synced too.
    _fsync_dir(path.parent)


def index_fingerprint(path: Path | str) -> str:
    """SHA-256 (hex) of the index file's bytes."""
    return file_sha256(path)


def load_index(
    path: Path | str, expected_dim: int | None = None, *, expected_fingerprint: str | None = None
) -> faiss.Index:
    """Read an index; refuse it when its dimension or fingerprint is not the expected one."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index at {path}")
    if expected_fingerprint is not None:
        actual = index_fingerprint(path)
        if actual != expected_fingerprint:
            raise ValueError(f"index {path} has fingerprint {actual}, expected {expected_fingerprint}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a readable FAISS index: {exc}") from exc
    if expected_dim is not None and index.d != expected_dim:
        raise ValueError(
            f"index {path} has dimension {index.d} but the model produces {expected_dim}-d "
            "embeddings; rebuild the index from the current model bundle"
        )
    return index
