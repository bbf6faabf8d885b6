"""What the control plane calls to change what Triton serves: load or unload one version.

Loading and unloading go through Triton's repository API (tritonclient); the files a load
names are put in the repository first (see :mod:`serving.triton.repository`). One admin at
a time per repository (an advisory file lock), so two deploys cannot interleave their
folder changes and load requests. ``tritonclient`` is imported inside methods: importing
this module stays cheap for Airflow workers.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from serving.triton import repository
from serving.triton.model_config import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, Kind


class TritonAdminError(RuntimeError):
    """A load/unload Triton refused or that did not reach the wanted state."""


class TritonAdmin:
    """Load/unload user tower versions on one Triton server and its repository folder."""

    def __init__(self, url: str, repository_dir: Path | str, staging_dir: Path | str | None = None,
                 kind: Kind = "cpu", timeout: float = 120.0) -> None:
        self.url = url.removeprefix("http://").rstrip("/")
        self.repository = Path(repository_dir)
        self.staging = Path(staging_dir) if staging_dir else self.repository.parent / "staged"
        self.kind = kind
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing
    def _client(self) -> Any:
        import tritonclient.http as httpclient

        # created per call: tritonclient's HTTP client is bound to the thread that made it
        return httpclient.InferenceServerClient(
            self.url, connection_timeout=self.timeout, network_timeout=self.timeout)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.repository.mkdir(parents=True, exist_ok=True)
        with open(self.repository / ".dayloop-admin.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load_present(self, client: Any) -> None:
        """Ask Triton to serve exactly the version folders present (or nothing)."""
        from tritonclient.utils import InferenceServerException

        try:
            if repository.present_versions(self.repository):
                client.load_model(MODEL_NAME)
            else:
                client.unload_model(MODEL_NAME)
        except InferenceServerException as exc:
            raise TritonAdminError(str(exc)) from exc

    # ------------------------------------------------------------------ reads
    def is_live(self) -> bool:
        """Server up and ready."""
        try:
            return bool(self._client().is_server_ready())
        except Exception:  # noqa: BLE001 - any transport error means "not live"
            return False

    def version_states(self) -> dict[int, dict[str, str]]:
        """{version: {"state": READY|UNAVAILABLE|LOADING|UNLOADING, "reason": ...}}."""
        index = self._client().get_model_repository_index()
        out: dict[int, dict[str, str]] = {}
        for entry in index:
            if entry.get("name") == MODEL_NAME and str(entry.get("version", "")).isdigit():
                out[int(entry["version"])] = {"state": entry.get("state", ""),
                                              "reason": entry.get("reason", "")}
        return out

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.version_states().items() if s["state"] == "READY")

    def is_version_ready(self, version: int) -> bool:
        try:
            return bool(self._client().is_model_ready(MODEL_NAME, str(int(version))))
        except Exception:  # noqa: BLE001
            return False

    # ------------------------------------------------------------------ writes
    def load_version(self, version: int, model_file: Path | str | None = None) -> dict[str, Any]:
        """Stage (if ``model_file``) and load ``version`` beside what already serves.

        Idempotent. On failure the version's folder is taken out again and the error says
        why; versions already serving are never interrupted.
        """
        version = int(version)
        t0 = time.perf_counter()
        with self._locked():
            created = False
            if model_file is not None:
                _, created = repository.stage(self.staging, version, Path(model_file))
            repository.ensure_repository(self.repository, self.kind)
            added = repository.place(self.repository, self.staging, version)
            if not added and self.is_version_ready(version):
                return {"version": version, "loaded": False, "staged": created, "seconds": 0.0}
            client = self._client()
            try:
                self._load_present(client)
                if not self.is_version_ready(version):
                    state = self.version_states().get(version, {})
                    raise TritonAdminError(f"version {version} is {state.get('state', 'absent')} after "
                                           f"load: {state.get('reason', '')}")
            except BaseException as exc:
                repository.withdraw(self.repository, version)
                try:
                    self._load_present(client)
                except TritonAdminError:
                    pass  # the first error is the one to report
                if isinstance(exc, TritonAdminError):
                    raise TritonAdminError(f"Triton could not load user_tower v{version}: {exc}") from exc
                raise
        return {"version": version, "loaded": True, "staged": created,
                "seconds": round(time.perf_counter() - t0, 3)}

    def unload_version(self, version: int, wait: bool = True) -> dict[str, Any]:
        """Stop serving ``version`` (other versions keep serving). Idempotent."""
        version = int(version)
        with self._locked():
            removed = repository.withdraw(self.repository, version)
            if not removed and not self.is_version_ready(version):
                return {"version": version, "unloaded": False}
            self._load_present(self._client())
        if wait:
            deadline = time.monotonic() + self.timeout
            while self.is_version_ready(version):
                if time.monotonic() > deadline:
                    raise TritonAdminError(f"version {version} still ready {self.timeout}s after unload")
                time.sleep(0.05)
        return {"version": version, "unloaded": True}

    def infer(self, version: int, user_ids: np.ndarray) -> np.ndarray:
        """Embeddings of raw user ids from one version (used by deploy checks and tests)."""
        import tritonclient.http as httpclient

        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1, 1)
        inp = httpclient.InferInput(INPUT_NAME, list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        out = self._client().infer(MODEL_NAME, [inp], model_version=str(int(version)),
                                   outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME)])
        return out.as_numpy(OUTPUT_NAME)
