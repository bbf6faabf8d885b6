"""Small file helpers shared by both planes (stdlib only, so ``serving`` stays free of ``dayloop``
and the control plane imports them from here): atomic writes and file digests.

An atomic write goes to a temporary file in the target's own directory, is flushed to disk,
then renamed over the target: readers see the old content or the new, never a torn file, and a
crash mid-write leaves the old file in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_sha256", "replace_dir"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], value: Any, **dumps: Any) -> Path:
    """Write ``value`` as JSON to ``path`` atomically (``dumps`` passed to :func:`json.dumps`)."""
    return atomic_write_text(path, json.dumps(value, **dumps))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put a fully written directory ``staged`` in place of ``target``.

    rename(2) cannot replace a non-empty directory, so an existing target is first moved
    aside, then the staged one renamed in, then the old one deleted; if the second rename
    fails the old one is put back. Both must be on one filesystem (siblings, in practice)."""
    staged, target = Path(staged), Path(target)
    if not target.exists():
        staged.rename(target)
        return target
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    target.rename(trash)
    try:
        staged.rename(target)
    except BaseException:
        trash.rename(target)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return target
