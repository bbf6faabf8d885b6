"""The user simulator as a real process against a throwaway router on loopback.

The router proper is tested elsewhere; here a tiny FastAPI app (source below, run by a real
uvicorn process) stands in for it with a deliberately good model (version 1: the user's
relevant items) and a bad one (version 2: random items), chosen by user-id parity, plus
switches to fail, or slow down, on purpose.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dayloop.config import SyntheticSettings
from dayloop.data.synthetic import SyntheticWorld
from dayloop.simulation.panel import panel_from_synthetic
from serving_helpers import ROOT, Service, free_port, read_json, serving_python

pytestmark = pytest.mark.integration

N_ITEMS = 150

FAKE_ROUTER = r'''
import asyncio
import os
import random
import uuid

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse

with np.load(os.environ["FAKE_PANEL"], allow_pickle=False) as panel:
    indptr, items = panel["rel_indptr"], panel["rel_items"]
    RELEVANT = {int(u): items[indptr[i]:indptr[i + 1]].tolist()
                for i, u in enumerate(panel["user_ids"].tolist())}
N_ITEMS = int(os.environ["FAKE_N_ITEMS"])
rng = random.Random(0)
state = {}
app = FastAPI()


def reset(fail_every=0, delay_s=0.0):
    state.clear()
    state.update(fail_every=fail_every, delay_s=delay_s, requests=0, errors=0, served=0,
                 impressions={}, clicks={"1": 0, "2": 0}, bad_feedback=0)


reset()


@app.post("/_mode")
async def mode(body: dict):
    reset(int(body.get("fail_every", 0)), float(body.get("delay_s", 0.0)))
    return {"ok": True}


@app.get("/_stats")
async def stats():
    return {k: state[k] for k in ("requests", "errors", "served", "clicks", "bad_feedback")}


@app.post("/recommend")
async def recommend(body: dict):
    state["requests"] += 1
    if state["fail_every"] and state["requests"] % state["fail_every"] == 0:
        state["errors"] += 1
        return JSONResponse(status_code=500, content={"detail": "planted failure"})
    if state["delay_s"]:
        await asyncio.sleep(state["delay_s"])
    user, k = int(body["user_id"]), int(body["k"])
    version = 1 if user % 2 == 0 else 2
    if version == 1:
        recs = RELEVANT.get(user, [])[:k]
    else:
        recs = rng.sample(range(1, N_ITEMS + 1), k)
    imp = uuid.uuid4().hex
    state["impressions"][imp] = version
    state["served"] += 1
    return {"user_id": user, "items": recs, "scores": [1.0 / (i + 1) for i in range(len(recs))],
            "version": version, "impression_id": imp, "revision": 1}


@app.post("/feedback")
async def feedback(body: dict):
    version = state["impressions"].get(body.get("impression_id"))
    if version is None or body.get("event") != "click":
        state["bad_feedback"] += 1
        return JSONResponse(status_code=404, content={"detail": "unknown impression"})
    state["clicks"][str(version)] += 1
    return {"recorded": True, "version": version}
'''


@pytest.fixture(scope="module")
def panel_path(tmp_path_factory) -> Path:
    settings = SyntheticSettings(n_users=200, n_items=N_ITEMS, dim=8, events_per_day=100,
                                 history_days=1, replay_days=2, seed=11)
    world = SyntheticWorld(settings, dt.date(2026, 3, 1))
    path = tmp_path_factory.mktemp("panel") / "panel.npz"
    return panel_from_synthetic(world, dt.date(2026, 3, 1), top_n=10).write(path)


@pytest.fixture(scope="module")
def fake_router(tmp_path_factory, panel_path):
    app_dir = tmp_path_factory.mktemp("fake-router")
    (app_dir / "fake_router.py").write_text(FAKE_ROUTER)
    port = free_port()
    env = {**os.environ, "FAKE_PANEL": str(panel_path), "FAKE_N_ITEMS": str(N_ITEMS)}
    svc = Service("fake-router", [str(serving_python()), "-m", "uvicorn", "fake_router:app",
                                  "--app-dir", str(app_dir), "--host", "127.0.0.1",
                                  "--port", str(port), "--log-level", "warning"],
                  app_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        svc.wait_http(f"{url}/_stats", timeout=60)
        yield url
    finally:
        svc.stop()


def set_mode(url: str, **mode) -> None:
    import httpx

    httpx.post(f"{url}/_mode", json=mode, timeout=5).raise_for_status()


def simulate(args: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run([str(serving_python()), "-m", "serving.simulator", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, lines


def test_good_model_earns_clearly_more_clicks_at_the_asked_rate(fake_router, panel_path, tmp_path):
    set_mode(fake_router)
    stats_file = tmp_path / "stats.json"
    rate, duration = 40, 5
    proc, lines = simulate(["--router", fake_router, "--panel", str(panel_path), "--rate", str(rate),
                            "--duration", str(duration), "--seed", "3", "--report-every", "1",
                            "--stats-file", str(stats_file)])
    assert proc.returncode == 0, proc.stderr
    final = json.loads(stats_file.read_text())
    assert lines[-1] == final and final["final"] is True
    assert len(lines) >= 4  # periodic reports before the final one
    assert abs(final["sent"] - rate * duration) <= 0.1 * rate * duration
    assert final["failed"] == {} and final["ok"] == final["sent"]
    v1, v2 = final["per_version"]["1"], final["per_version"]["2"]
    assert v1["impressions"] > 50 and v2["impressions"] > 50
    assert v1["ctr"] > 3 * v2["ctr"] and v1["ctr"] - v2["ctr"] > 1.0
    # Every simulated click reached the router, attributed to the version that served it.
    fake = read_json(f"{fake_router}/_stats")
    assert fake["served"] == final["sent"]
    assert final["feedback_failed"] == 0 and fake["bad_feedback"] == 0
    assert fake["clicks"] == {"1": v1["clicks"], "2": v2["clicks"]}
    assert final["feedback_ok"] == v1["clicks"] + v2["clicks"]
    assert final["latency_ms"]["p50"] is not None
    assert final["latency_ms"]["p50"] <= final["latency_ms"]["p95"] <= final["latency_ms"]["p99"]


def test_failures_are_counted_by_kind(fake_router, panel_path, tmp_path):
    set_mode(fake_router, fail_every=4)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rate, duration = 40, 3
    proc, lines = simulate(["--router", fake_router, "--router", dead, "--panel", str(panel_path),
                            "--rate", str(rate), "--duration", str(duration)])
    assert proc.returncode == 0, proc.stderr
    final = lines[-1]
    fake = read_json(f"{fake_router}/_stats")
    # Round robin, but a refused connection (nothing listens: the request never reached a
    # router) goes on to the next replica, as a load balancer would send it.
    assert fake["requests"] == final["sent"]
    assert final["retried_on_other_replica"] == final["sent"] // 2
    assert final["failed"] == {"http_500": fake["errors"]}
    assert fake["errors"] == fake["requests"] // 4 > 0
    assert final["ok"] == fake["served"]
    assert final["ok"] + sum(final["failed"].values()) == final["sent"]
    # with no replica listening, every send is a connection failure
    proc, lines = simulate(["--router", dead, "--router", f"http://127.0.0.1:{free_port()}", "--panel",
                            str(panel_path), "--rate", str(rate), "--duration", "1"])
    assert proc.returncode == 0, proc.stderr
    assert lines[-1]["failed"] == {"connection": lines[-1]["sent"]} and lines[-1]["sent"] > 0


def test_overload_and_timeouts_are_counted_not_dropped(fake_router, panel_path, tmp_path):
    set_mode(fake_router, delay_s=1.0)
    rate, duration = 30, 2
    proc, lines = simulate(["--router", fake_router, "--panel", str(panel_path), "--rate", str(rate),
                            "--duration", str(duration), "--max-in-flight", "3",
                            "--timeout", "0.4"])
    assert proc.returncode == 0, proc.stderr
    final = lines[-1]
    assert final["sent"] == rate * duration
    assert final["ok"] == 0
    assert final["failed"]["timeout"] >= 3
    assert final["failed"]["overload"] == final["overload"]["in_flight_cap"] > final["sent"] // 2
    assert sum(final["failed"].values()) == final["sent"]


def test_sigterm_ends_the_run_with_final_stats(fake_router, panel_path, tmp_path):
    set_mode(fake_router)
    stats_file = tmp_path / "stats.json"
    proc = subprocess.Popen([str(serving_python()), "-m", "serving.simulator", "--router", fake_router,
                             "--panel", str(panel_path), "--rate", "20", "--duration", "0",
                             "--report-every", "0.5", "--stats-file", str(stats_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not stats_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert stats_file.exists(), proc.stderr.read() if proc.poll() is not None else "no stats"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, err
    final = json.loads(stats_file.read_text())
    assert final["final"] is True and final["sent"] > 0 and final["failed"] == {}
    assert json.loads(out.splitlines()[-1]) == final


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--router", "http://127.0.0.1:9", "--panel", "/nonexistent/panel.npz"], "cannot read panel"),
        (["--router", "127.0.0.1:9", "--panel", "x.npz"], "http(s) URL"),
        (["--router", "http://127.0.0.1:9", "--panel", "x.npz", "--rate", "0"], "must be positive"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    proc, _ = simulate(args, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
