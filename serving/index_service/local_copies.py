"""The index service's own copies of the versions it serves, so a restart restores them.

Layout under the state directory (``--state-dir``)::

    live.json                      {"versions": {"7": {...entry...}}}  (atomic writes)
    versions/7-<fp12>/index.faiss  the files exactly as fetched and verified
    versions/7-<fp12>/index_meta.json
    versions/7-<fp12>/seen_items.npz
    versions/7-<fp12>/seen-<sha12>.npz   a later seen-items swap (PUT .../seen)

An entry names its directory, the index fingerprint, the expected width and the sha256 of
the seen-items file in use. On start the service loads every entry from its directory with
the same checks as any load (the meta's sha256s, the fingerprint the entry names), so a
copy that was damaged on disk is refused and reported, never served. Nothing here needs
the control plane or MLflow to be up.

A version's files are written to a staging directory and renamed into place before the
manifest names them; the manifest drops a version before its directory is removed. Blocking
file I/O: the service calls these from worker threads (``keep_*``) or at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from serving.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger("serving.index_service")

MANIFEST = "live.json"


class LocalCopies:
    """Copies of loaded versions' files and the manifest of which are live."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # manifest read-modify-write from several threads

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def entries(self) -> dict[int, dict[str, Any]]:
        """The manifest's live versions (empty when there is none or it is unreadable)."""
        try:
            doc = json.loads(self.manifest_path.read_text())
            return {int(v): dict(e) for v, e in doc.get("versions", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("local copies: %s is unreadable (%s); starting with nothing restored",
                      self.manifest_path, exc)
            return {}

    def _write(self, entries: dict[int, dict[str, Any]]) -> None:
        atomic_write_json(self.manifest_path, {"versions": {str(v): e for v, e in sorted(entries.items())}},
                          indent=1)

    def version_dir(self, version: int, fingerprint: str) -> Path:
        return self.versions_dir / f"{int(version)}-{fingerprint[:12]}"

    def keep_files(self, version: int, fingerprint: str, files: dict[str, bytes | bytearray]) -> Path:
        """Write a version's verified files into its directory (staged, then renamed)."""
        target = self.version_dir(version, fingerprint)
        if target.is_dir():
            shutil.rmtree(target)
        staged = self.versions_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name, data in files.items():
            with open(staged / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(staged, target)
        return target

    def keep_seen(self, version: int, fingerprint: str, sha256: str, data: bytes | bytearray) -> Path:
        """Write a swapped-in seen-items file beside the version's index files."""
        path = self.version_dir(version, fingerprint) / f"seen-{sha256[:12]}.npz"
        atomic_write_bytes(path, bytes(data))
        return path

    def record(self, version: int, entry: dict[str, Any]) -> None:
        """Name ``version`` live with ``entry`` (dir, fingerprint, expected_dim, seen file)."""
        with self._lock:
            entries = self.entries()
            entries[int(version)] = entry
            self._write(entries)

    def forget(self, version: int) -> None:
        """Drop ``version`` from the manifest, then remove its files."""
        with self._lock:
            entries = self.entries()
            entry = entries.pop(int(version), None)
            self._write(entries)
        if entry is not None:
            shutil.rmtree(self.root / entry.get("dir", "-missing-"), ignore_errors=True)
