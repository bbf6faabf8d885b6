"""The production shape, checked without Docker: docker-compose.yaml, the Grafana provisioning
and dashboard, and the GPU Triton config. Pure file reads (plus promtool / docker compose when
they are installed); nothing is started and nothing touches the network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.launch import PlaneConfig
from serving.triton import write_gpu_config as wgc
from serving.triton.model_config import model_config, to_pbtxt
from serving.triton.repository import ensure_repository

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
RULES_FILE = ROOT / "serving" / "prometheus" / "rules.yml"
GRAFANA = ROOT / "serving" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "dayloop-serving.json"
DATASOURCE_FILE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_FILE = GRAFANA / "provisioning" / "dashboards" / "dayloop.yml"

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker")
REQUIRED_SERVICES = ("postgres", "redis", *AIRFLOW_SERVICES, "mlflow", "triton", "index-service",
                     "router-0", "router-1", "prometheus", "grafana")
TOKEN_SECRET = "/run/secrets/dayloop_admin_token"

# Triton's own series the recording rules read (Triton is not our code to grep).
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure",
                  "nv_inference_request_duration_us", "nv_inference_count", "nv_inference_exec_count"}
# Series Prometheus itself makes for every target.
PROMETHEUS_BUILTIN = {"up"}


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def _flags(command: list[str]) -> dict[str, list[str]]:
    """``--name=value`` items of a command list, by name (repeatable flags keep every value)."""
    out: dict[str, list[str]] = {}
    for item in command:
        if item.startswith("--") and "=" in item:
            name, value = item[2:].split("=", 1)
            out.setdefault(name, []).append(value)
    return out


def _volume_named(service: dict, target: str) -> str:
    """The named volume (or bind source) a service mounts at ``target``."""
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        if parts[1] == target:
            return parts[0]
    raise AssertionError(f"nothing mounted at {target}: {service.get('volumes')}")


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names a PromQL expression reads (functions and labels dropped)."""
    e = re.sub(r"\$\{?\w+\}?", " ", expr)                    # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)                 # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                          # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                         # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("("):              # a function or aggregation
            continue
        if m.group(0).lower() not in _KEYWORDS:
            names.add(m.group(0))
    return names


def exported_series(source: Path) -> set[str]:
    """Series names a module's prometheus_client metrics expose (as Prometheus stores them)."""
    out = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"",
                                 source.read_text()):
        if kind == "Counter":
            out.add(name.removesuffix("_total") + "_total")
        elif kind == "Histogram":
            out.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            out.add(name)
    return out


def recording_rules() -> dict[str, str]:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
        exprs.append(m.group(1) if m else text)
    return exprs


SERVICE_SERIES = (exported_series(ROOT / "serving" / "router" / "metrics.py")
                  | exported_series(ROOT / "serving" / "index_service" / "metrics.py"))


# ------------------------------------------------------------------------------ compose
def test_compose_has_the_production_services(compose):
    missing = [s for s in REQUIRED_SERVICES if s not in compose["services"]]
    assert not missing, f"services missing from docker-compose.yaml: {missing}"


def test_airflow_services_run_airflow_3_with_the_project_folders(compose):
    commands = {}
    for name in AIRFLOW_SERVICES:
        svc = compose["services"][name]
        assert "apache/airflow:3.3.2" in svc["image"], name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        for folder in ("dags", "plugins", "include"):
            assert mounts.get(f"/opt/airflow/{folder}") == f"./{folder}", (name, folder)
        assert svc["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        commands[name] = svc["command"]
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                        "airflow-worker": "celery worker"}


def test_bind_mounts_and_build_contexts_exist(compose):
    for name, svc in compose["services"].items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = svc.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_serving_image_is_python_311_slim_with_the_serving_lock(compose):
    svc = compose["services"]["index-service"]
    assert svc["build"]["context"] == "./serving"
    dockerfile = (ROOT / "serving" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.M)
    assert "pip install" in dockerfile and "-r serving/requirements.txt" in dockerfile
    assert "COPY requirements.txt serving/requirements.txt" in dockerfile
    assert "faiss-gpu" in dockerfile  # the note on GPU-resident indexes


def test_triton_runs_on_a_gpu_in_explicit_mode_on_the_shared_repository(compose):
    svc = compose["services"]
    triton = svc["triton"]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    flags = _flags(triton["command"])
    assert flags["model-control-mode"] == ["explicit"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)

    plane = json.loads(compose["configs"]["dayloop-plane"]["content"])
    assert plane["triton_kind"] == "gpu"
    repo = flags["model-repository"][0]
    assert repo == plane["triton_repository"]
    # The workers write version folders where Triton reads them: one volume, one path.
    volume = _volume_named(triton, "/opt/dayloop/triton")
    assert repo.startswith("/opt/dayloop/triton/")
    assert _volume_named(svc["airflow-worker"], "/opt/dayloop/triton") == volume
    # The GPU config is written from model_config.py before Triton starts.
    init = svc["triton-repo-init"]
    assert "serving.triton.write_gpu_config" in " ".join(init["command"])
    assert f"--repository {repo}" in " ".join(init["command"])
    assert _volume_named(init, "/opt/dayloop/triton") == volume
    assert triton["depends_on"]["triton-repo-init"]["condition"] == "service_completed_successfully"


def test_routers_share_one_postgres_route_store(compose):
    svc = compose["services"]
    flags = [_flags(svc[f"router-{i}"]["command"]) for i in (0, 1)]
    stores = {f["store-url"][0] for f in flags}
    assert len(stores) == 1 and stores.pop() == "postgresql://routes@postgres:5432/routes"
    assert {f["replica"][0] for f in flags} == {"router-0", "router-1"}
    for f in flags:
        assert f["token-file"] == [TOKEN_SECRET]
        assert f["triton-grpc"] == ["triton:8001"]
        assert f["index-url"] == ["http://index-service:8200"]
    for i in (0, 1):  # fault injection is for tests and demos, never this deployment
        assert "--enable-fault-injection" not in svc[f"router-{i}"]["command"]
    init = compose["configs"]["postgres-init"]["content"]
    for db in ("airflow", "mlflow", "routes"):
        assert f"CREATE DATABASE {db} OWNER {db};" in init


def test_plane_file_matches_what_the_client_reads(compose, tmp_path):
    plane = json.loads(compose["configs"]["dayloop-plane"]["content"])
    embedded = PlaneConfig(home=tmp_path, python=Path("python")).endpoints()
    # store_url stays out: only the routers use it, and it would carry a database login.
    # alertmanager/alert log: the embedded plane starts them; compose has no Alertmanager yet
    # (issue 10's next session adds it), so its plane file does not name them.
    assert set(plane) == set(embedded) - {"store_url", "alertmanager_url", "alert_log_url"}
    assert plane["token_file"] == TOKEN_SECRET
    assert plane["router_urls"] == ["http://router-0:8100", "http://router-1:8100"]
    for name in ("airflow-worker", "index-service", "router-0", "router-1"):
        assert "dayloop_admin_token" in compose["services"][name]["secrets"], name


def test_prometheus_config_is_rendered_for_the_compose_targets(compose):
    svc = compose["services"]
    flags = _flags(svc["prometheus-config"]["command"])
    assert sorted(flags["router"]) == ["router-0:8100", "router-1:8100"]
    assert flags["index"] == ["index-service:8200"] and flags["triton"] == ["triton:8002"]
    out = flags["out"][0]
    assert _flags(svc["prometheus"]["command"])["config.file"] == [f"{out}/prometheus.yml"]
    assert _volume_named(svc["prometheus"], out) == _volume_named(svc["prometheus-config"], out)


def test_secrets_come_from_the_environment_and_are_documented(compose):
    text = COMPOSE_FILE.read_text()
    documented = {m.group(1): m.group(2) for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=(.*)$",
                                                            ENV_EXAMPLE.read_text(), re.M)}
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", text))
    assert required, "secrets are expected as ${VAR:?...}"
    assert not required - set(documented), f"undocumented in .env.example: {required - set(documented)}"
    for name, value in documented.items():
        if re.search(r"PASSWORD|SECRET|FERNET", name):
            assert value.startswith("change-me"), f".env.example must not hold a real {name}"
    # no literal secret in any service environment
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|FERNET_KEY", key):
                assert str(value).startswith("${"), (name, key)
            if "://" in str(value) and "@" in str(value):
                assert re.search(r"://[^:/@]+:\$\{", str(value)), (name, key, "literal password in URL")


# ------------------------------------------------------------------------------ Grafana
def test_grafana_provisioning_points_at_the_dashboard_and_prometheus(compose, dashboard):
    datasources = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    (ds,) = [d for d in datasources if d["type"] == "prometheus"]
    assert ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(PROVIDER_FILE.read_text())["providers"][0]
    grafana = compose["services"]["grafana"]
    assert _volume_named(grafana, provider["options"]["path"]) == "./serving/grafana/dashboards"
    assert _volume_named(grafana, "/etc/grafana/provisioning") == "./serving/grafana/provisioning"
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    used |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used == {ds["uid"]}


def test_dashboard_panels_are_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"], p["title"]


def test_dashboard_reads_only_metrics_that_exist(dashboard):
    rules = recording_rules()
    rule_inputs = set().union(*(promql_metric_names(e) for e in rules.values()))
    known = set(rules) | SERVICE_SERIES | TRITON_METRICS | PROMETHEUS_BUILTIN
    unknown = {}
    for expr in dashboard_exprs(dashboard):
        missing = promql_metric_names(expr) - known
        if missing:
            unknown[expr] = sorted(missing)
    assert not unknown, f"dashboard reads series nothing produces: {unknown}"
    # the rules themselves read only what the services export (or Triton's series)
    assert not rule_inputs - SERVICE_SERIES - TRITON_METRICS, rule_inputs - SERVICE_SERIES - TRITON_METRICS


def test_dashboard_covers_the_rollout_signals_per_version(dashboard):
    wanted = {"dayloop:router_latency_seconds:p99_30s", "dayloop:router_error_ratio:30s",
              "dayloop:router_nonfinite_ratio:30s", "dayloop:router_ctr:5m", "dayloop:router_requests:rate30s",
              "dayloop:router_fallback_ratio:30s", "dayloop_router_route_share", "dayloop_router_route_revision",
              "dayloop:triton_request_seconds:avg30s", "dayloop:index_search_seconds:p99_30s"}
    exprs = dashboard_exprs(dashboard)
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert wanted <= used, wanted - used
    # per-version panels: version-labelled series are filtered by the $version variable
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "version"]
    assert var["multi"] and var["includeAll"]
    for expr in exprs:
        if re.search(r"dayloop:router_\w+:(?:p99|p50|rate|mean|ctr)|_ratio:", expr) and "response_seconds" not in expr:
            assert 'version=~"$version"' in expr, expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_parses_every_dashboard_query(dashboard, tmp_path):
    exprs = [e.replace("$__rate_interval", "1m").replace("$version", ".*") for e in dashboard_exprs(dashboard)]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metric_name_extraction():
    assert promql_metric_names('sum by (version, reason) (rate(dayloop_router_errors_total{version=~"$version"}'
                               '[$__rate_interval]))') == {"dayloop_router_errors_total"}
    assert promql_metric_names("sum(rate(a_total[30s])) / 1e6 / (b:c:d > 0) or vector(0)") == {"a_total", "b:c:d"}


# ------------------------------------------------------------------------------ GPU config
def test_gpu_config_uses_libtorch_on_the_gpu_with_the_cpu_io_names():
    cpu, gpu = model_config("cpu"), model_config("gpu")
    assert gpu["backend"] == "pytorch" and cpu["backend"] == "python"
    assert [g["kind"] for g in gpu["instance_group"]] == ["KIND_GPU"]
    assert gpu["default_model_filename"] == "model.pt"
    assert gpu["input"] == cpu["input"] and gpu["output"] == cpu["output"]
    assert gpu["name"] == cpu["name"] and gpu["max_batch_size"] == cpu["max_batch_size"]


def test_gpu_config_file_comes_from_model_config(tmp_path):
    text = wgc.gpu_config_text()
    expected = model_config("gpu")
    expected["version_policy"] = {"all": {}}  # the repository's live set is its folders
    assert text == to_pbtxt(expected)
    assert 'backend: "pytorch"' in text and "kind: KIND_GPU" in text

    repo = tmp_path / "repository"
    path, outcome = wgc.write_gpu_config(repo)
    assert outcome == "written" and path.read_text() == text
    assert wgc.write_gpu_config(repo)[1] == "unchanged"

    cpu_repo = tmp_path / "cpu"
    cpu_text = (ensure_repository(cpu_repo, "cpu") / "config.pbtxt").read_text()
    assert wgc.write_gpu_config(cpu_repo)[1] == "differs"
    assert (cpu_repo / "user_tower" / "config.pbtxt").read_text() == cpu_text
    assert wgc.write_gpu_config(cpu_repo, replace=True)[1] == "replaced"
    assert (cpu_repo / "user_tower" / "config.pbtxt").read_text() == text
    assert not [p for p in (cpu_repo / "user_tower").iterdir() if p.name.startswith(".")]


def test_gpu_config_cli(tmp_path, capsys):
    assert wgc.main(["--print"]) == 0
    assert capsys.readouterr().out == wgc.gpu_config_text()
    ensure_repository(tmp_path, "cpu")
    assert wgc.main(["--repository", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().err
    assert wgc.main(["--repository", str(tmp_path), "--replace"]) == 0


def test_the_plane_files_scrape_interval_is_prometheus_own(compose):
    """The rollout's Prometheus windows are sized from it: it must be what Prometheus scrapes at."""
    plane = json.loads(compose["configs"]["dayloop-plane"]["content"])
    flags = _flags(compose["services"]["prometheus-config"]["command"])
    assert f"{plane['prometheus_scrape_interval_s']:g}s" == flags["interval"][0]
