"""Run the real ``tritonserver`` binary that ships inside the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the Python backend only. Its own Python API cannot serve
two versions of one model side by side, so Dayloop runs the raw binary against a model
repository it writes itself, in explicit model-control mode. Three things make the binary
run outside PyTriton (measured on Debian 12 / Python 3.11):

* the Python backend (``libtriton_python.so``, ``triton_python_backend_utils.py`` and the
  3.11 stub) must sit together in ``<backends>/python``;
* ``LD_LIBRARY_PATH`` needs the wheel's ``nvidia_pytriton.libs`` and the interpreter's own
  LIBDIR, otherwise the stub binds the system libpython against another stdlib;
* the serving venv's ``bin`` must come first on ``PATH`` so the stub imports its torch.

Stdlib only: the launcher runs under any Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "user_tower"


@dataclass(frozen=True)
class TritonPaths:
    """Where the pieces of the wheel live for one serving venv."""

    python: Path            # the serving venv's interpreter
    site_packages: Path
    libdir: Path            # the interpreter's LIBDIR (libpython3.11.so)
    python_version: str     # "3.11"

    @property
    def wheel_root(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.wheel_root / "bin" / "tritonserver"


def discover(python: Path | str) -> TritonPaths:
    """Ask the serving interpreter where its site-packages and LIBDIR are."""
    probe = (
        "import json, sys, sysconfig; print(json.dumps({'purelib': sysconfig.get_paths()['purelib'],"
        " 'libdir': sysconfig.get_config_var('LIBDIR'),"
        " 'ver': '%d.%d' % sys.version_info[:2]}))"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    paths = TritonPaths(Path(python), Path(info["purelib"]), Path(info["libdir"]), info["ver"])
    if not paths.binary.is_file():
        raise FileNotFoundError(
            f"no tritonserver binary at {paths.binary}: is nvidia-pytriton installed in {python}'s venv?"
        )
    return paths


def prepare_backends(paths: TritonPaths, backends_dir: Path) -> Path:
    """Assemble ``<backends_dir>/python`` from the wheel's pieces (idempotent)."""
    src = paths.wheel_root
    dst = backends_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    pieces = {
        src / "backends" / "python" / "libtriton_python.so": dst / "libtriton_python.so",
        src / "backends" / "python" / "triton_python_backend_utils.py": dst / "triton_python_backend_utils.py",
        src / "python_backend_stubs" / paths.python_version / "triton_python_backend_stub":
            dst / "triton_python_backend_stub",
    }
    for s, d in pieces.items():
        if not s.is_file():
            raise FileNotFoundError(f"Triton wheel piece missing: {s}")
        if not d.is_file() or d.stat().st_size != s.stat().st_size:
            shutil.copy2(s, d)
    return backends_dir


def server_env(paths: TritonPaths, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the binary and the Python backend stubs it spawns."""
    env = dict(os.environ if base is None else base)
    libs = [str(paths.site_packages / "nvidia_pytriton.libs"), str(paths.libdir)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{paths.python.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    # One intra-op thread per model instance: requests are small, the machine is shared.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def server_command(
    paths: TritonPaths,
    repository: Path,
    backends_dir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    host: str = "127.0.0.1",
) -> list[str]:
    """The tritonserver command line: explicit model control, nothing loaded at start."""
    return [
        str(paths.binary),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends_dir}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=true",
        "--allow-cpu-metrics=false",
        "--allow-gpu-metrics=false",
        "--metrics-interval-ms=1000",
        "--strict-readiness=true",
        # a model that fails to load must not take the server (and the other versions) down
        "--exit-on-error=false",
        "--log-verbose=0",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.triton.server --repository R --work W --http-port ...``: exec tritonserver."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="folder for the assembled backends")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--python", default=sys.executable, help="the serving venv's python")
    args = ap.parse_args(argv)
    paths = discover(args.python)
    backends = prepare_backends(paths, args.work / "backends")
    args.repository.mkdir(parents=True, exist_ok=True)
    cmd = server_command(paths, args.repository, backends, args.http_port, args.grpc_port,
                         args.metrics_port, args.host)
    # Restore on (re)start: the version folders in the repository are the live set the
    # control plane left (version_policy all), so load them at start-up; with
    # --strict-readiness the server reports ready only once they are.
    from serving.triton.repository import present_versions

    if present_versions(args.repository):
        cmd.append(f"--load-model={MODEL_NAME}")
    os.execve(cmd[0], cmd, server_env(paths))
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    raise SystemExit(main())
