"""Rollback alerts: POSTed to the configured webhook, logged always, never raised."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def test_alerts_are_posted_to_the_webhook_and_never_raise():
    from dayloop.airflow.notifier import send_alert

    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert send_alert({"text": "v3 rolled back", "version": 3}, url)
        assert got == [{"text": "v3 rolled back", "version": 3}]
    finally:
        server.shutdown()
        server.server_close()
    assert send_alert({"text": "log only"}, None)
    assert not send_alert({"text": "nobody listens"}, url, timeout_s=1.0)  # logged, not raised
