"""``python -m serving.router --port 8100 --triton-grpc 127.0.0.1:8001 --index-url ... --store-url ...``"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from serving.router.app import RouterSettings, create_app


def read_token(path: Path | None) -> str:
    token = os.environ.get("DAYLOOP_ADMIN_TOKEN", "")
    if path is not None:
        token = path.read_text().strip()
    if len(token) < 16:
        raise SystemExit("router: an admin token of at least 16 characters is required "
                         "(--token-file or DAYLOOP_ADMIN_TOKEN)")
    return token


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Dayloop router replica")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--replica", default=None)
    ap.add_argument("--triton-grpc", required=True, help="host:port")
    ap.add_argument("--index-url", required=True)
    ap.add_argument("--store-url", required=True)
    ap.add_argument("--token-file", type=Path, default=None)
    ap.add_argument("--canary-timeout", type=float, default=0.25)
    ap.add_argument("--stable-timeout", type=float, default=2.0)
    ap.add_argument("--poll-interval", type=float, default=0.2)
    ap.add_argument("--breaker-failures", type=int, default=3,
                    help="hard faults inside the window that open a version's circuit")
    ap.add_argument("--breaker-window", type=float, default=10.0, help="seconds the faults are counted over")
    ap.add_argument("--breaker-cooldown", type=float, default=30.0,
                    help="seconds a circuit stays open before a half-open probe")
    ap.add_argument("--static-items", type=Path, default=None,
                    help="JSON list of item ids: the last fallback level (shipped with the deployment)")
    ap.add_argument("--enable-fault-injection", action="store_true",
                    help="expose /admin/faults (tests and demos only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every index-service call at INFO: a log line per user request
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from serving.router.breaker import BreakerConfig
    from serving.router.fallback import StaticList, StaticListError

    try:
        breaker = BreakerConfig(args.breaker_failures, args.breaker_window, args.breaker_cooldown)
        static = StaticList.from_file(args.static_items) if args.static_items else None
    except (ValueError, StaticListError) as exc:
        raise SystemExit(f"router: {exc}") from None
    settings = RouterSettings(
        triton_grpc=args.triton_grpc, index_url=args.index_url, store_url=args.store_url,
        token=read_token(args.token_file), replica=args.replica or f"router-{args.port}",
        canary_timeout_s=args.canary_timeout, stable_timeout_s=args.stable_timeout,
        poll_interval_s=args.poll_interval, faults_enabled=args.enable_fault_injection,
        breaker=breaker, static_items=static,
    )
    import uvicorn

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
