"""Start, stop and inspect the data plane on one machine: Triton, the index service, the
router replicas, Prometheus and (on demand) the user simulator.

Each service runs in its own session (process group); its group id is kept in
``<home>/run/<name>.pgid`` and it is stopped by signalling that group, never by name, so
Triton's Python-backend stubs go with it and nothing else on the machine is touched.
``<home>/plane.json`` records the endpoints for clients (:mod:`serving.client`).

Stdlib only: runs under any Python (``make serve`` uses the serving venv's).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.fileio import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
PLANE_FILE = "plane.json"
#: Debian's package (prometheus-alertmanager) installs the binary under this name.
ALERTMANAGER = "prometheus-alertmanager"


@dataclass
class PlaneConfig:
    """Where the data plane lives and which ports it uses (defaults: the embedded stack)."""

    home: Path
    python: Path
    host: str = "127.0.0.1"
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    index_port: int = 8200
    router_ports: tuple[int, ...] = (8100, 8101)
    prometheus_port: int = 9090
    alertmanager_port: int = 0  # 0: a free port, chosen once per config
    alert_log_port: int = 0
    alert_webhooks: tuple[str, ...] = ()  # besides the alert log (e.g. the rollout alerts' webhook)
    faults_enabled: bool = False
    scrape_interval: str = "1s"
    store_url: str | None = None
    kind: str = "cpu"
    canary_timeout: float = 0.25
    static_items: Path = ROOT / "serving" / "router" / "static_items.json"
    router_args: tuple[str, ...] = ()  # more router options (e.g. the breaker's --breaker-cooldown)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.python = Path(self.python)
        self.router_ports = tuple(int(p) for p in self.router_ports)
        self.alertmanager_port = int(self.alertmanager_port) or _free_port()
        self.alert_log_port = int(self.alert_log_port) or _free_port()
        self.alert_webhooks = tuple(self.alert_webhooks)
        if self.store_url is None:
            self.store_url = f"sqlite:///{self.home / 'routes.sqlite'}"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def token_file(self) -> Path:
        return self.home / "admin_token"

    @property
    def triton_repository(self) -> Path:
        return self.home / "triton" / "repository"

    @property
    def triton_staging(self) -> Path:
        return self.home / "triton" / "staged"

    def endpoints(self) -> dict[str, object]:
        h = self.host
        return {
            "triton_http": f"http://{h}:{self.triton_http}",
            "triton_grpc": f"{h}:{self.triton_grpc}",
            "triton_metrics": f"http://{h}:{self.triton_metrics}/metrics",
            "triton_repository": str(self.triton_repository),
            "triton_staging": str(self.triton_staging),
            "triton_kind": self.kind,
            "index_url": f"http://{h}:{self.index_port}",
            "router_urls": [f"http://{h}:{p}" for p in self.router_ports],
            "prometheus_url": f"http://{h}:{self.prometheus_port}",
            "alertmanager_url": f"http://{h}:{self.alertmanager_port}",
            "alert_log_url": f"http://{h}:{self.alert_log_port}",
            "prometheus_scrape_interval_s": float(self.scrape_interval.rstrip("s")),
            "token_file": str(self.token_file),
            "store_url": self.store_url,
            "faults_enabled": self.faults_enabled,
        }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def webhook_from_env(env: dict[str, str] | None = None) -> str | None:
    """The rollout alerts' webhook for Alertmanager: ``DAYLOOP_ALERT_WEBHOOK``, else the URL of
    the Airflow connection ``dayloop_alert_webhook`` when it is given in the environment
    (``AIRFLOW_CONN_DAYLOOP_ALERT_WEBHOOK``, JSON with a ``host`` or a URI)."""
    import json

    env = dict(os.environ if env is None else env)
    url = env.get("DAYLOOP_ALERT_WEBHOOK", "").strip()
    if url:
        return url
    raw = env.get("AIRFLOW_CONN_DAYLOOP_ALERT_WEBHOOK", "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            host = str(json.loads(raw).get("host") or "")
        except (ValueError, AttributeError):
            return None
        return host if host.startswith(("http://", "https://")) else None
    if raw.startswith(("http://", "https://")):
        return raw
    if raw.startswith("http+https://"):
        return "https://" + raw.removeprefix("http+https://")
    return None


def _alive(pgid: int) -> bool:
    """Does any process of the group still exist? (Reaps the leader if it is our own child:
    an unreaped zombie would keep the group "alive" forever.)"""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _url_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class DataPlane:
    """The data plane's processes for one :class:`PlaneConfig`."""

    def __init__(self, cfg: PlaneConfig) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ process plumbing
    def _pgid_file(self, name: str) -> Path:
        return self.cfg.run_dir / f"{name}.pgid"

    def pgid(self, name: str) -> int | None:
        f = self._pgid_file(name)
        try:
            pgid = int(f.read_text().strip())
        except (OSError, ValueError):
            return None
        return pgid if _alive(pgid) else None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.cfg.extra_env)
        return env

    def child_pid(self, name: str) -> int | None:
        """The pid of a supervised service's current process (not its supervisor)."""
        try:
            return int((self.cfg.run_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _spawn(self, name: str, cmd: list[str], supervised: bool = True) -> int:
        existing = self.pgid(name)
        if existing:
            return existing
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        if supervised:
            # restarted when it dies (serving.supervise); stopped with its group
            (self.cfg.run_dir / f"{name}.pid").unlink(missing_ok=True)
            cmd = [str(self.cfg.python), "-m", "serving.supervise", "--name", name,
                   "--pid-file", str(self.cfg.run_dir / f"{name}.pid"), "--", *cmd]
        with open(self.cfg.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._pgid_file(name).write_text(str(proc.pid))
        return proc.pid

    def _wait(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _url_ok(url):
                return
            if self.pgid(name) is None:
                raise RuntimeError(f"{name} exited during start; see {self.cfg.log_dir / (name + '.log')}:\n"
                                   + self.log_tail(name))
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready at {url} after {timeout:.0f}s; see "
                           f"{self.cfg.log_dir / (name + '.log')}:\n" + self.log_tail(name))

    def log_tail(self, name: str, n: int = 30) -> str:
        try:
            lines = (self.cfg.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop_service(self, name: str, timeout: float = 20.0) -> bool:
        f = self._pgid_file(name)
        try:
            pgid = int(f.read_text().strip())
        except (OSError, ValueError):
            return False
        stopped = False
        if _alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
                while _alive(pgid):
                    time.sleep(0.05)
            stopped = True
        f.unlink(missing_ok=True)
        (self.cfg.run_dir / f"{name}.pid").unlink(missing_ok=True)
        return stopped

    # ------------------------------------------------------------------ services
    def _ensure_token(self) -> None:
        tf = self.cfg.token_file
        if not tf.is_file():
            tf.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")

    def start_triton(self, timeout: float = 90.0) -> None:
        c = self.cfg
        from serving.triton.repository import ensure_repository

        ensure_repository(c.triton_repository, c.kind)  # type: ignore[arg-type]
        self._spawn("triton", [str(c.python), "-m", "serving.triton.server",
                               "--repository", str(c.triton_repository), "--work", str(c.home / "triton"),
                               "--host", c.host, "--http-port", str(c.triton_http),
                               "--grpc-port", str(c.triton_grpc), "--metrics-port", str(c.triton_metrics),
                               "--python", str(c.python)])
        # ready (strict readiness) once the repository's versions are loaded again
        self._wait("triton", f"http://{c.host}:{c.triton_http}/v2/health/ready", timeout)

    def start_index(self, timeout: float = 60.0) -> None:
        c = self.cfg
        self._spawn("index_service", [str(c.python), "-m", "serving.index_service", "--host", c.host,
                                      "--port", str(c.index_port), "--token-file", str(c.token_file),
                                      "--state-dir", str(c.home / "index_service")])
        # ready once the versions it held are restored from its local copies
        self._wait("index_service", f"http://{c.host}:{c.index_port}/ready", timeout)

    def start_routers(self, timeout: float = 60.0) -> None:
        c = self.cfg
        # Create the store (schema, WAL mode) once here, so replicas starting together only open it.
        from serving.route_store import RouteStore

        if str(c.store_url).startswith("sqlite:"):
            RouteStore(str(c.store_url)).close()
        for i, port in enumerate(c.router_ports):
            cmd = [str(c.python), "-m", "serving.router", "--host", c.host, "--port", str(port),
                   "--replica", f"router-{i}", "--triton-grpc", f"{c.host}:{c.triton_grpc}",
                   "--index-url", f"http://{c.host}:{c.index_port}", "--store-url", str(c.store_url),
                   "--token-file", str(c.token_file), "--canary-timeout", str(c.canary_timeout),
                   "--static-items", str(c.static_items)]
            if c.faults_enabled:
                cmd.append("--enable-fault-injection")
            cmd += list(c.router_args)
            self._spawn(f"router-{i}", cmd)
        for i, port in enumerate(c.router_ports):
            # ready once every version its route table names is loaded and answers
            self._wait(f"router-{i}", f"http://{c.host}:{port}/ready", timeout)

    def start_prometheus(self, timeout: float = 30.0) -> None:
        c = self.cfg
        from serving.prometheus.render import render_config

        conf_dir = c.home / "prometheus"
        config = render_config(
            conf_dir,
            routers=[f"{c.host}:{p}" for p in c.router_ports],
            index_service=f"{c.host}:{c.index_port}",
            triton=f"{c.host}:{c.triton_metrics}",
            scrape_interval=c.scrape_interval,
            alertmanager=f"{c.host}:{c.alertmanager_port}",
        )
        self._spawn("prometheus", ["prometheus", f"--config.file={config}",
                                   f"--web.listen-address={c.host}:{c.prometheus_port}",
                                   f"--storage.tsdb.path={conf_dir / 'data'}",
                                   "--storage.tsdb.retention.time=2d", "--web.enable-lifecycle"])
        self._wait("prometheus", f"http://{c.host}:{c.prometheus_port}/-/ready", timeout)

    def start_alerting(self, timeout: float = 30.0) -> None:
        """The alert log receiver and Alertmanager, which routes what Prometheus fires to it
        and to the rollout alerts' webhook (``alert_webhooks``)."""
        c = self.cfg
        from serving.prometheus.render import alertmanager_text

        self._spawn("alert_log", [str(c.python), "-m", "serving.alert_log", "--host", c.host,
                                  "--port", str(c.alert_log_port), "--file", str(c.log_dir / "alerts.jsonl")])
        self._wait("alert_log", f"http://{c.host}:{c.alert_log_port}/health", timeout)
        conf_dir = c.home / "alertmanager"
        conf_dir.mkdir(parents=True, exist_ok=True)
        hooks = [f"http://{c.host}:{c.alert_log_port}/", *c.alert_webhooks]
        atomic_write_text(conf_dir / "alertmanager.yml", alertmanager_text(hooks))
        self._spawn("alertmanager", [ALERTMANAGER, f"--config.file={conf_dir / 'alertmanager.yml'}",
                                     f"--storage.path={conf_dir / 'data'}",
                                     f"--web.listen-address={c.host}:{c.alertmanager_port}",
                                     "--cluster.listen-address=", "--log.level=warn"])
        self._wait("alertmanager", f"http://{c.host}:{c.alertmanager_port}/-/ready", timeout)

    def start(self, prometheus: bool = True) -> dict[str, object]:
        """Start every service (already running ones are kept) and write plane.json."""
        self.cfg.home.mkdir(parents=True, exist_ok=True)
        self._ensure_token()
        self.write_plane_file()
        self.start_triton()
        self.start_index()
        self.start_routers()
        if prometheus:
            self.start_alerting()
            self.start_prometheus()
        return self.cfg.endpoints()

    def write_plane_file(self) -> Path:
        return atomic_write_json(self.cfg.home / PLANE_FILE, self.cfg.endpoints(), indent=2)

    def start_simulator(self, panel: Path, rate: float, stats_file: Path, seed: int = 0,
                        k: int = 10, extra: list[str] | None = None) -> int:
        c = self.cfg
        cmd = [str(c.python), "-m", "serving.simulator", "--panel", str(panel), "--rate", str(rate),
               "--k", str(k), "--seed", str(seed), "--stats-file", str(stats_file)]
        for port in c.router_ports:
            cmd += ["--router", f"http://{c.host}:{port}"]
        return self._spawn("simulator", cmd + list(extra or []), supervised=False)

    def service_names(self) -> list[str]:
        names = [p.stem for p in self.cfg.run_dir.glob("*.pgid")] if self.cfg.run_dir.is_dir() else []
        order = {"simulator": 0, "prometheus": 1, "alertmanager": 1.5, "alert_log": 1.6, "index_service": 3,
                 "triton": 4}
        return sorted(names, key=lambda n: (order.get(n, 2), n))

    def stop(self) -> list[str]:
        """Stop everything this plane started (simulator first, Triton last)."""
        return [n for n in self.service_names() if self.stop_service(n)]

    def status(self) -> dict[str, int | None]:
        return {n: self.pgid(n) for n in self.service_names()}


def config_from_env(**overrides: object) -> PlaneConfig:
    """The embedded stack's plane: ``$DAYLOOP_VAR/serving``, the serving venv, default ports."""
    root_var = Path(os.environ.get("DAYLOOP_VAR", ROOT / "var"))
    venv = Path(os.environ.get("DAYLOOP_SERVING_VENV", ROOT / ".venv-serving"))
    routers = os.environ.get("DAYLOOP_ROUTER_PORTS", "8100,8101")
    kw: dict[str, object] = dict(
        home=Path(os.environ.get("DAYLOOP_SERVING_HOME", root_var / "serving")),
        python=venv / "bin" / "python",
        triton_http=int(os.environ.get("DAYLOOP_TRITON_HTTP_PORT", 8000)),
        triton_grpc=int(os.environ.get("DAYLOOP_TRITON_GRPC_PORT", 8001)),
        triton_metrics=int(os.environ.get("DAYLOOP_TRITON_METRICS_PORT", 8002)),
        index_port=int(os.environ.get("DAYLOOP_INDEX_PORT", 8200)),
        router_ports=tuple(int(p) for p in routers.split(",") if p),
        prometheus_port=int(os.environ.get("DAYLOOP_PROMETHEUS_PORT", 9090)),
        alertmanager_port=int(os.environ.get("DAYLOOP_ALERTMANAGER_PORT", 9093)),
        alert_log_port=int(os.environ.get("DAYLOOP_ALERT_LOG_PORT", 9097)),
        alert_webhooks=tuple(u for u in [webhook_from_env()] if u),
        faults_enabled=os.environ.get("DAYLOOP_FAULT_INJECTION", "0") == "1",
    )
    kw.update(overrides)
    return PlaneConfig(**kw)  # type: ignore[arg-type]


def describe_routes(plane_file: Path) -> str:
    """One line for `make status`: who serves which share of users, and the last writer."""
    from serving.client import DataPlaneClient

    try:
        current = DataPlaneClient.from_plane_file(plane_file).router.routes()
    except Exception as exc:  # noqa: BLE001 - a status line, never a crash
        return f"routes: unreadable ({exc})"
    if current is None:
        return "routes: no route table yet"
    shares = current.table.shares()
    served = ", ".join(f"v{v} {share:.0%}" for v, share in sorted(shares.items()))
    note = "  <- two versions routed: a rollout in flight (or orphaned)" if len(shares) > 1 else ""
    return f"routes: {served} (revision {current.revision}, by {current.actor}: {current.reason}){note}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Dayloop data plane: start | stop | status")
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("--no-prometheus", action="store_true")
    args = ap.parse_args(argv)
    plane = DataPlane(config_from_env())
    if args.command == "start":
        try:
            endpoints = plane.start(prometheus=not args.no_prometheus)
        except (RuntimeError, TimeoutError) as exc:
            print(f"serve: {exc}", file=sys.stderr)
            return 1
        for name, pgid in plane.status().items():
            print(f"serve: {name} running (pgid {pgid}), log {plane.cfg.log_dir / (name + '.log')}")
        print(f"serve: endpoints in {plane.cfg.home / PLANE_FILE}")
        for key in ("router_urls", "triton_http", "index_url", "prometheus_url"):
            print(f"  {key}: {endpoints[key]}")
    elif args.command == "stop":
        for name in plane.stop():
            print(f"serve: stopped {name}")
    else:
        status = plane.status()
        if not status:
            print("data plane: stopped")
        for name, pgid in status.items():
            print(f"{name}: {'running (pgid %d)' % pgid if pgid else 'stopped'}")
        plane_file = plane.cfg.home / PLANE_FILE
        if any(name.startswith("router") and pgid for name, pgid in status.items()) and plane_file.is_file():
            print(describe_routes(plane_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
