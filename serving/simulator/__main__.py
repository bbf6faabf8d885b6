"""The user simulator: open-loop traffic against the router, clicks from a panel of real tastes.

``python -m serving.simulator --router URL [--router URL2 ...] --panel PATH --rate 20 --k 10
--duration 0 --seed 0 --stats-file F``

Open-loop sends, ``overload`` accounting and clicks reported with ``POST /feedback`` are
described in :mod:`serving.simulator.simulator`. Stats go to stdout as one JSON line every
``--report-every`` seconds and at the end, and are rewritten atomically to
``--stats-file``. SIGTERM/SIGINT end the run cleanly (final stats, exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from serving.simulator.core import DEFAULT_P_NOISE, DEFAULT_P_RELEVANT
from serving.simulator.panel_format import SimPanel, load_panel
from serving.simulator.simulator import Config, Simulator


async def _main(cfg: Config, panel: SimPanel) -> dict:
    sim = Simulator(cfg, panel)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.stop.set)
    return await sim.run()


def _positive(kind):
    def parse(raw: str):
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {raw}")
        return value
    return parse


def _router_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"router must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _probability(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {raw}")
    return value


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (argparse exits 2 on bad input)."""
    p = argparse.ArgumentParser(prog="python -m serving.simulator",
                                description="Open-loop user simulator for the Dayloop router.")
    p.add_argument("--router", action="append", required=True, type=_router_url,
                   help="router base URL; repeat to round-robin over replicas")
    p.add_argument("--panel", type=Path, required=True, help="panel .npz (users, relevant items)")
    p.add_argument("--rate", type=_positive(float), default=20.0, help="requests per second")
    p.add_argument("--k", type=_positive(int), default=10, help="items asked for per request")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = until signalled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-file", type=Path, default=None)
    p.add_argument("--report-every", type=_positive(float), default=5.0)
    p.add_argument("--timeout", type=_positive(float), default=2.0, help="per request, seconds")
    p.add_argument("--max-in-flight", type=_positive(int), default=256)
    p.add_argument("--late-tolerance", type=_positive(float), default=1.0,
                   help="a send this many seconds behind schedule is skipped as overload")
    p.add_argument("--p-relevant", type=_probability, default=DEFAULT_P_RELEVANT)
    p.add_argument("--p-noise", type=_probability, default=DEFAULT_P_NOISE)
    a = p.parse_args(argv)
    if a.duration < 0:
        p.error("--duration must be >= 0")
    return Config(routers=tuple(a.router), panel=a.panel, rate=a.rate, k=a.k, duration=a.duration,
                  seed=a.seed, stats_file=a.stats_file, report_every=a.report_every,
                  timeout=a.timeout, max_in_flight=a.max_in_flight,
                  late_tolerance=a.late_tolerance, p_relevant=a.p_relevant, p_noise=a.p_noise)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse_args(argv)
    try:
        panel = load_panel(cfg.panel)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.stats_file is not None:
        cfg.stats_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"simulator: {panel.n_users} users, {cfg.rate}/s over {len(cfg.routers)} router(s), "
          f"duration {cfg.duration or 'until signalled'}", file=sys.stderr, flush=True)
    asyncio.run(_main(cfg, panel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
