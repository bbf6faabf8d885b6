"""The data plane's alert log: an Alertmanager webhook receiver that writes each alert it
is sent as one JSON line (``<home>/log/alerts.jsonl``) and one line on stderr.

``python -m serving.alert_log --port N --file F``; ``GET /alerts`` returns the lines kept
in memory (the last 1000), ``GET /health`` answers 200. Alertmanager sends here and to the
rollout alerts' webhook, so a person who has no webhook configured still finds every
production alert in the log. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 1 << 20
KEPT = 1000


class AlertLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recent: deque[dict] = deque(maxlen=KEPT)
        self._lock = threading.Lock()

    def record(self, notification: dict) -> int:
        """Write one line per alert of an Alertmanager notification; returns how many."""
        alerts = notification.get("alerts")
        if not isinstance(alerts, list):
            raise ValueError("not an Alertmanager notification: no alerts list")
        lines = []
        for a in alerts:
            if not isinstance(a, dict):
                raise ValueError("an alert is not an object")
            labels = a.get("labels") or {}
            line = {"received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "status": a.get("status"), "alertname": labels.get("alertname"), "labels": labels,
                    "annotations": a.get("annotations") or {}, "starts_at": a.get("startsAt"),
                    "ends_at": a.get("endsAt")}
            lines.append(line)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
                self.recent.append(line)
                summary = line["annotations"].get("summary", "")
                print(f"ALERT {line['status']}: {line['alertname']} {summary}", file=sys.stderr, flush=True)
        return len(lines)


def make_handler(log: AlertLog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/alerts":
                self._send(200, {"alerts": list(log.recent)})
            else:
                self._send(404, {"detail": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY:
                self._send(400, {"detail": f"a JSON body of 1..{MAX_BODY} bytes is required"})
                return
            try:
                count = log.record(json.loads(self.rfile.read(n)))
            except (ValueError, AttributeError) as exc:
                self._send(400, {"detail": f"not an Alertmanager notification: {exc}"})
                return
            self._send(200, {"recorded": count})

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--file", type=Path, required=True)
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(AlertLog(args.file)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
