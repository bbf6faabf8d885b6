"""Render Dayloop's Prometheus configuration for a set of scrape targets.

``python -m serving.prometheus.render --out DIR --router HOST:PORT [--router ...]
[--index HOST:PORT] [--triton HOST:PORT] [--interval 1s]``

Writes ``DIR/prometheus.yml`` (from ``prometheus.yml.tmpl``) and ``DIR/rules.yml`` (a copy
of the recording rules, which the config names by relative path), each atomically.
Standard library only, so any Python can run it. Targets and the interval are checked
before they reach the YAML: a typo fails here, not as a Prometheus that scrapes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from string import Template
from typing import Iterable

from serving.fileio import atomic_write_text

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "prometheus.yml.tmpl"
RULES = HERE / "rules.yml"
CONFIG_NAME = "prometheus.yml"
RULES_NAME = "rules.yml"
ALERTS = HERE / "alerts.yml"
ALERTS_NAME = "alerts.yml"

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
_TARGET = re.compile(rf"^{_HOST}:(\d{{1,5}})$")
_DURATION = re.compile(r"^([1-9]\d*)(ms|s|m|h)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def check_target(target: str) -> str:
    """``host:port`` with a port in 1..65535, else ValueError."""
    m = _TARGET.match(target.strip())
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise ValueError(f"scrape target must be host:port, got {target!r}")
    return target.strip()


def _duration_ms(value: str) -> int:
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"interval must be a positive Prometheus duration like 1s or 15s, got {value!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def _targets(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [check_target(t) for t in ([value] if isinstance(value, str) else value)]


def config_text(routers: str | Iterable[str], index_service: str | Iterable[str] | None = None,
                triton: str | Iterable[str] | None = None, scrape_interval: str = "1s",
                evaluation_interval: str | None = None,
                alertmanager: str | Iterable[str] | None = None) -> str:
    """The prometheus.yml text for these targets (a job with no target scrapes nothing)."""
    routers = _targets(routers)
    if not routers:
        raise ValueError("at least one router target is needed")
    index_targets, triton_targets = _targets(index_service), _targets(triton)
    evaluation_interval = evaluation_interval or scrape_interval
    _duration_ms(scrape_interval)
    _duration_ms(evaluation_interval)
    # JSON lists are valid YAML flow sequences, and the targets are checked above,
    # so nothing in them can change the document's structure.
    return Template(TEMPLATE.read_text()).substitute(
        scrape_interval=scrape_interval,
        scrape_timeout=scrape_interval,  # Prometheus refuses a timeout longer than the interval
        evaluation_interval=evaluation_interval,
        router_targets=json.dumps(routers),
        index_targets=json.dumps(index_targets),
        triton_targets=json.dumps(triton_targets),
        alertmanager_targets=json.dumps(_targets(alertmanager)),
    )


def alertmanager_text(webhooks: Iterable[str]) -> str:
    """alertmanager.yml: every alert to each webhook (the rollout alerts' connection, the
    data plane's alert log), grouped by alert name and version, resent every 5 minutes
    while it fires, and a "resolved" message when it stops."""
    urls = []
    for url in webhooks:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or any(c in url for c in " \n\"'"):
            raise ValueError(f"webhook must be an http(s) URL without quotes or spaces, got {url!r}")
        urls.append(url)
    if not urls:
        raise ValueError("at least one webhook is needed")
    configs = "\n".join(f"      - url: {json.dumps(u)}\n        send_resolved: true" for u in urls)
    return (
        "# Rendered by serving/prometheus/render.py; edit that, not this copy.\n"
        "route:\n"
        "  receiver: dayloop\n"
        "  group_by: [alertname, version]\n"
        "  group_wait: 1s\n"
        "  group_interval: 5s\n"
        "  repeat_interval: 5m\n"
        "receivers:\n"
        "  - name: dayloop\n"
        "    webhook_configs:\n"
        f"{configs}\n"
    )


def render_config(out_dir: Path | str, routers: str | Iterable[str],
                  index_service: str | Iterable[str] | None = None,
                  triton: str | Iterable[str] | None = None, scrape_interval: str = "1s",
                  alertmanager: str | Iterable[str] | None = None) -> Path:
    """Write prometheus.yml, rules.yml and alerts.yml into ``out_dir``; returns the config's path.

    Every argument is checked before anything is written."""
    text = config_text(routers, index_service, triton, scrape_interval, alertmanager=alertmanager)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Rules first: a config never points at a rules file that is not there yet.
    atomic_write_text(out / RULES_NAME, RULES.read_text())
    atomic_write_text(out / ALERTS_NAME, ALERTS.read_text())
    atomic_write_text(out / CONFIG_NAME, text)
    return out / CONFIG_NAME


def main(argv: list[str] | None = None) -> int:
    """CLI: render the configuration into --out."""
    p = argparse.ArgumentParser(prog="python -m serving.prometheus.render",
                                description="Render Dayloop's Prometheus config and rules.")
    p.add_argument("--out", type=Path, required=True, help="directory for prometheus.yml and rules.yml")
    p.add_argument("--router", action="append", default=[], required=True,
                   help="router replica host:port (repeatable)")
    p.add_argument("--index", action="append", default=[], help="index service host:port (repeatable)")
    p.add_argument("--triton", action="append", default=[], help="Triton metrics host:port (8002)")
    p.add_argument("--interval", default="1s",
                   help="scrape and evaluation interval (default 1s for the demo; 15s in production)")
    a = p.parse_args(argv)
    try:
        path = render_config(a.out, a.router, a.index, a.triton, a.interval)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
