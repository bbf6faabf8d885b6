"""Keep one data-plane process running: restart it when it dies, stop with it on SIGTERM.

``python -m serving.supervise --name index_service --pid-file F -- <command...>``

The launcher starts each service through this, as the leader of the service's own process
group; the command runs as its child in the same group. When the child exits for any
reason other than a stop (a crash, ``kill -9``, the OOM killer) it is started again after
a back-off (0.2 s, doubling to 10 s, back to 0.2 s once a child has lived 60 s). Each
service restores its own state on start (the index service from its local copies, Triton
from its repository, a router from the route store), so a restart needs nobody.

SIGTERM or SIGINT to the group (``launch.py stop``) reaches the child directly; this process
then waits for it and exits without restarting. ``--pid-file`` holds the current child's
pid (tests kill that pid to play a crash). Stdlib only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0
HEALTHY_AFTER_S = 60.0


def _log(name: str, msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    print(f"{stamp} supervise[{name}]: {msg}", file=sys.stderr, flush=True)


def run(name: str, cmd: list[str], pid_file: Path | None) -> int:
    stopping = False
    child: subprocess.Popen | None = None

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)  # usually already sent to the whole group
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    backoff = MIN_BACKOFF_S
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(cmd)
        if pid_file is not None:
            tmp = pid_file.with_suffix(".tmp")
            tmp.write_text(str(child.pid))
            os.replace(tmp, pid_file)
        if restarts:
            _log(name, f"restarted (restart {restarts}), pid {child.pid}")
        rc = child.wait()
        if stopping:
            return 0
        lived = time.monotonic() - started
        if lived >= HEALTHY_AFTER_S:
            backoff = MIN_BACKOFF_S
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        _log(name, f"pid {child.pid} {how} after {lived:.1f} s; restarting in {backoff:.1f} s")
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(MAX_BACKOFF_S, backoff * 2)
        restarts += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--pid-file", type=Path, default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command to supervise (put it after --)")
    return run(args.name, cmd, args.pid_file)


if __name__ == "__main__":
    raise SystemExit(main())
