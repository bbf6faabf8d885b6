"""Run the index service: ``python -m serving.index_service --port N --token-file F``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m serving.index_service", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", type=Path, required=True, help="file holding the admin bearer token")
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS OpenMP threads per search (default 1: searches are latency-bound)")
    p.add_argument("--no-gpu", action="store_true", help="keep indexes on the CPU even with faiss-gpu")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 1 MiB)")
    p.add_argument("--max-index-bytes", type=int, default=None, help="largest index.faiss accepted (default 4 GiB)")
    p.add_argument("--fetch-timeout", type=float, default=None, help="seconds per HTTP read when loading from a URL")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="keep local copies of loaded versions here and restore them on start")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request (off: /search is hot)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    return args


def read_token(path: Path) -> str:
    """The admin token from ``path`` (surrounding whitespace dropped); exits if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        sys.exit(f"index service: cannot read token file {path}: {exc.strerror or exc}")
    if not token:
        sys.exit(f"index service: token file {path} is empty")
    return token


def main(argv: list[str] | None = None) -> None:
    """Parse options, build the app, serve until SIGTERM/SIGINT."""
    args = parse_args(argv)
    token = read_token(args.token_file)
    # OpenMP reads this once when FAISS loads; it bounds worker threads, whose own
    # thread count omp_set_num_threads (called on the event-loop thread) does not set.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # FAISS logs every SIMD variant it tries at INFO; only its warnings matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    import uvicorn

    from serving.index_service.app import create_app

    limits = {
        name: value
        for name, value in (
            ("max_body_bytes", args.max_body_bytes),
            ("max_index_bytes", args.max_index_bytes),
            ("fetch_timeout", args.fetch_timeout),
        )
        if value is not None
    }
    app = create_app(token, threads=args.threads, use_gpu=not args.no_gpu, state_dir=args.state_dir, **limits)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
