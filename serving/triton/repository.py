"""The Triton model repository on disk and the staging area beside it.

``<repo>/user_tower/config.pbtxt`` uses ``version_policy: all``, so the version folders
present in ``<repo>/user_tower/`` ARE the live set: the admin client adds a folder and asks
Triton to load the model (only the new version is instantiated; versions already serving
are untouched), or takes a folder out and asks again (only that version is unloaded).
Measured on Triton 2.51: a version_policy change in a config override instead re-creates
every live version, which costs the stable version a reload during each canary deploy.

Staging keeps every version ever deployed, immutable, under ``<staging>/<version>/`` (written
to a hidden folder, then renamed), so putting an old version back is a local copy. Folders
enter the repository the same way, complete, before any load request names them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from serving.fileio import atomic_write_text, file_sha256
from serving.triton.model_config import MODEL_NAME, Kind, model_config, to_pbtxt

PYTHON_MODEL = Path(__file__).with_name("python_model.py")
MODEL_FILE = "model.pt"


def _check_version(version: int) -> int:
    if isinstance(version, bool) or int(version) != version or int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    return int(version)


def model_dir(repo: Path) -> Path:
    return Path(repo) / MODEL_NAME


def ensure_repository(repo: Path, kind: Kind = "cpu") -> Path:
    """Create ``<repo>/user_tower/config.pbtxt`` (version_policy all) if it is missing."""
    mdir = model_dir(repo)
    mdir.mkdir(parents=True, exist_ok=True)
    cfg_path = mdir / "config.pbtxt"
    if not cfg_path.is_file():
        cfg = model_config(kind)  # version_policy all: the folders present are the live set
        atomic_write_text(cfg_path, to_pbtxt(cfg))
    return mdir


def present_versions(repo: Path) -> list[int]:
    """Version folders in the repository (the live set Triton is asked to serve)."""
    mdir = model_dir(repo)
    if not mdir.is_dir():
        return []
    return sorted(int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit())


def staged_versions(staging: Path) -> list[int]:
    staging = Path(staging)
    if not staging.is_dir():
        return []
    return sorted(int(p.name) for p in staging.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file())


def stage(staging: Path, version: int, model_file: Path) -> tuple[Path, bool]:
    """Keep ``model_file`` (the serving TorchScript) as ``version`` in the staging area.

    Returns (folder, created). The same bytes again is a no-op; different bytes under a
    version number already staged are refused: versions are immutable.
    """
    version = _check_version(version)
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no serving model file at {model_file}")
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    final = staging / str(version)
    want = file_sha256(model_file)
    if (final / MODEL_FILE).is_file():
        have = file_sha256(final / MODEL_FILE)
        if have != want:
            raise ValueError(
                f"version {version} is already staged with different model bytes "
                f"(sha256 {have[:12]} != {want[:12]}); versions are immutable"
            )
        return final, False
    tmp = staging / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shutil.copy2(model_file, tmp / MODEL_FILE)
        shutil.copy2(PYTHON_MODEL, tmp / "model.py")
        (tmp / "SHA256").write_text(want + "\n")  # inside the hidden folder: atomic with it
        # Not fileio.replace_dir: a folder a crash left without its model file is deleted
        # before the rename, so a failed rename leaves no folder, where replace_dir would
        # put the broken one back.
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def place(repo: Path, staging: Path, version: int) -> bool:
    """Copy a staged version into the repository (complete before it appears). True if added."""
    version = _check_version(version)
    src = Path(staging) / str(version)
    if not (src / MODEL_FILE).is_file():
        raise FileNotFoundError(f"version {version} is not staged under {staging}")
    mdir = model_dir(repo)
    final = mdir / str(version)
    if final.is_dir():
        return False
    tmp = mdir / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        # Not fileio.replace_dir: a version folder Triton may already serve must never be
        # swapped; plain rename(2) fails on a non-empty folder that appeared meanwhile.
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def withdraw(repo: Path, version: int) -> bool:
    """Take a version folder out of the repository. True if it was there."""
    folder = model_dir(repo) / str(_check_version(version))
    if not folder.exists():
        return False
    # Renamed out of the version folder names first, so Triton never sees half a folder
    # while it is deleted (a removal, not a swap: nothing for fileio.replace_dir to do).
    trash = folder.with_name(f".{folder.name}.trash-{uuid.uuid4().hex[:8]}")
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True
