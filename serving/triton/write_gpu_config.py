"""Write the GPU (libtorch, ``KIND_GPU``) ``config.pbtxt`` into a Triton model repository.

``python -m serving.triton.write_gpu_config --repository /opt/dayloop/triton/repository [--replace]``

docker-compose runs this once before NVIDIA's Triton starts, so the config in the shared
repository volume comes from :mod:`serving.triton.model_config` (through
:func:`serving.triton.repository.ensure_repository`, the same call the admin client makes
before every load), never from a hand-copied file. ``version_policy`` is ``all``: the version
folders present are the live set (see :mod:`serving.triton.repository`).

An existing config that differs (an older model_config, or a CPU config) is left alone and
reported, unless ``--replace``: a deploy wants the current source's config, a manual run
should not silently swap the backend under a running server. Stdlib only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serving.fileio import atomic_write_text
from serving.triton.repository import ensure_repository, model_dir


def gpu_config_text() -> str:
    """The GPU config.pbtxt exactly as :func:`ensure_repository` writes it."""
    with tempfile.TemporaryDirectory(prefix="dayloop-gpu-config-") as tmp:
        return (ensure_repository(Path(tmp), "gpu") / "config.pbtxt").read_text()


def write_gpu_config(repository: Path, replace: bool = False) -> tuple[Path, str]:
    """Make ``<repository>/user_tower/config.pbtxt`` the GPU config; returns (path, what happened).

    What happened is ``"written"``, ``"unchanged"``, ``"replaced"`` or ``"differs"`` (left alone).
    """
    want = gpu_config_text()
    mdir = model_dir(Path(repository))
    path = mdir / "config.pbtxt"
    if path.is_file():
        if path.read_text() == want:
            return path, "unchanged"
        if not replace:
            return path, "differs"
        outcome = "replaced"
    else:
        outcome = "written"
    mdir.mkdir(parents=True, exist_ok=True)
    # Triton may read the file at any moment (a load request): it sees old or new, never half.
    atomic_write_text(path, want)
    return path, outcome


def main(argv: list[str] | None = None) -> int:
    """CLI: write the GPU config (exit 1 if a different config is there and --replace is not given)."""
    ap = argparse.ArgumentParser(prog="python -m serving.triton.write_gpu_config",
                                 description="Write the user tower's GPU config.pbtxt into a Triton repository.")
    ap.add_argument("--repository", type=Path, help="Triton model repository (the folder holding user_tower/)")
    ap.add_argument("--replace", action="store_true", help="overwrite a config that differs")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the config and write nothing")
    args = ap.parse_args(argv)
    if args.print_only:
        sys.stdout.write(gpu_config_text())
        return 0
    if args.repository is None:
        ap.error("--repository is required unless --print is given")
    path, outcome = write_gpu_config(args.repository, replace=args.replace)
    if outcome == "differs":
        print(f"write_gpu_config: {path} differs from the GPU config; left alone (use --replace)",
              file=sys.stderr)
        return 1
    print(f"write_gpu_config: {path} {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
