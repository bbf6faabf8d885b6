"""Helpers for tests that run the data plane: small real bundles and indexes, free ports,
service processes started in their own session and stopped by their process group."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from serving.router.buckets import LATENCY_BUCKETS, SCORE_BUCKETS

ROOT = Path(__file__).resolve().parents[1]


def serving_python() -> Path:
    """The serving venv's interpreter (DAYLOOP_SERVING_VENV or <repo>/.venv-serving)."""
    venv = Path(os.environ.get("DAYLOOP_SERVING_VENV", ROOT / ".venv-serving"))
    py = venv / "bin" / "python"
    if not py.is_file():
        raise RuntimeError(f"serving venv missing at {venv}: run `make setup`")
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(out_dir: Path, seed: int = 0, n_users: int = 200, n_items: int = 300,
                dim: int = 16, history_length: int = 5) -> Path:
    """Export a randomly initialised (untrained) two-tower bundle: real TorchScript, real files."""
    import torch

    from dayloop.training.bundle import export_bundle
    from dayloop.training.model import TowerConfig, TwoTowerModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = TowerConfig(n_users=n_users, n_items=n_items, n_genders=3, n_ages=8, n_occupations=22,
                      n_genres=19, n_years=10, max_genres=3, history_length=history_length,
                      embedding_dim=dim, feature_dim=8, hidden_dim=32, dropout=0.0)
    genres = torch.from_numpy(rng.integers(0, cfg.n_genres, size=(n_items + 1, 3)))
    years = torch.from_numpy(rng.integers(0, cfg.n_years, size=(n_items + 1,)))
    model = TwoTowerModel(cfg, genres, years).eval()
    user_ids = np.arange(1, n_users + 1, dtype=np.int64) * 7
    item_ids = np.arange(1, n_items + 1, dtype=np.int64) + 1000
    feats = np.stack([rng.integers(1, 3, n_users), rng.integers(1, 8, n_users),
                      rng.integers(1, 22, n_users)], axis=1).astype(np.int64)
    hist = rng.integers(0, n_items + 1, size=(n_users, history_length)).astype(np.int64)
    return export_bundle(model, user_ids, feats, item_ids, Path(out_dir), user_history=hist)


def make_index(bundle_dir: Path, out_dir: Path) -> Path:
    """Exact FAISS index (index.faiss + index_meta.json) of a bundle's item embeddings."""
    from dayloop.index.faiss_index import IndexSpec, build_and_check

    emb = np.load(Path(bundle_dir) / "item_embeddings.npy")
    ids = np.load(Path(bundle_dir) / "item_ids.npy")
    build_and_check(emb, ids, Path(out_dir), spec=IndexSpec(kind="flat"), k=10)
    return Path(out_dir)


class Service:
    """A process in its own session, logged to a file, stopped by its process group."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status < 500:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            # the leader is gone; its group may still hold children (Triton's backend stubs)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


def read_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


# A router replica's metrics (the real RouterMetrics class) on GET /metrics, plus POST / to
# move them: {"version": "1", "requests": n, "nonfinite": n, "impressions": n, "clicks": n,
# "fallbacks": n, "errors": {"reason": n}, "latency": [[seconds, n]], "score": [[value, n]],
# "share": fraction}. Run it with serving_python() -c ROUTER_METRICS_EXPORTER <port>.
ROUTER_METRICS_EXPORTER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from serving.router.metrics import RouterMetrics

m = RouterMetrics()

class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/metrics":
            self._send(200, generate_latest(m.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b"not found")

    def do_POST(self):
        e = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        v = e["version"]
        for name in ("requests", "nonfinite", "impressions", "clicks", "fallbacks"):
            if e.get(name):
                getattr(m, name).labels(version=v).inc(e[name])
        for reason, n in e.get("errors", {}).items():
            m.errors.labels(version=v, reason=reason).inc(n)
        for hist, key in ((m.latency, "latency"), (m.score, "score")):
            for value, n in e.get(key, []):
                for _ in range(n):
                    hist.labels(version=v).observe(value)
        if "share" in e:
            m.share.labels(version=v).set(e["share"])
        self._send(200, b"ok")

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def post_event(port: int, event: dict) -> None:
    """POST one event to a ROUTER_METRICS_EXPORTER on ``port`` (asserts it was taken)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/event", data=json.dumps(event).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def prom_value(prom_port: int, query: str) -> float | None:
    """The first value of an instant PromQL query on a local Prometheus (None: empty result)."""
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


class RouterPrometheus:
    """Two router-metric exporters ("a" and "b", ROUTER_METRICS_EXPORTER in the serving venv)
    and a real Prometheus scraping them every second, all on free loopback ports.

    Started by the constructor; call ``wait_ready()`` and ``stop()`` (Prometheus first) inside
    and after the test's ``try``."""

    def __init__(self, prometheus: str, log_dir: Path) -> None:
        from serving.prometheus.render import render_config

        log_dir = Path(log_dir)
        self.ports = {"a": free_port(), "b": free_port()}
        self.prom_port = free_port()
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        self.exporters = {r: Service(f"exporter-{r}", [str(serving_python()), "-c", ROUTER_METRICS_EXPORTER,
                                                       str(p)], log_dir)
                          for r, p in self.ports.items()}
        config = render_config(log_dir / "conf", [f"127.0.0.1:{p}" for p in self.ports.values()],
                               index_service=None, triton=None, scrape_interval="1s")
        self.prom = Service("prometheus", [prometheus, f"--config.file={config}",
                                           f"--web.listen-address=127.0.0.1:{self.prom_port}",
                                           f"--storage.tsdb.path={log_dir / 'tsdb'}"], log_dir)

    def wait_ready(self) -> None:
        for r, e in self.exporters.items():
            e.wait_http(f"http://127.0.0.1:{self.ports[r]}/metrics", timeout=30)
        self.prom.wait_http(f"{self.prom_url}/-/ready", timeout=30)

    def stop(self) -> None:
        self.prom.stop()
        for e in self.exporters.values():
            e.stop()


# The router's histogram bounds as Prometheus exposes them, each closed by +Inf.
LATENCY_LE, SCORE_LE = (b + (math.inf,) for b in (LATENCY_BUCKETS, SCORE_BUCKETS))


def top_items(bundle_dir: Path, users, k: int):
    """What a bundle's serving tower + item embeddings rank top-``k`` for each user (in-process)."""
    import torch

    tower = torch.jit.load(str(bundle_dir / "serving_tower.pt"))
    with torch.no_grad():
        u = tower(torch.from_numpy(np.asarray(users).reshape(-1, 1))).numpy()
    items = np.load(bundle_dir / "item_embeddings.npy")
    ids = np.load(bundle_dir / "item_ids.npy")
    return ids[np.argsort(-(u @ items.T), axis=1)[:, :k]]
