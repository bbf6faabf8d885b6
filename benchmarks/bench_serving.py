"""Benchmark the serving path: /recommend end to end against its own parts.

Starts a real data plane (Triton, the index service, two router replicas) on free loopback
ports in a temporary home, loads one MovieLens-1M-sized version (6,040 users, 3,706 items,
64-d, exact index) and routes every user to it. Then it measures, for k=10:

* in-process floor: the same TorchScript and FAISS index called in this process, one user
  at a time, one thread each;
* direct: Triton (gRPC) then the index service (``POST /search``), no router: with sync
  clients (sequential and with N client threads at saturation), and sequentially with the
  router's own asyncio clients (grpc.aio, httpx.AsyncClient) to separate their cost;
* end to end: ``POST /recommend`` through the routers (round-robin over both replicas),
  sequentially, at a fixed open-loop rate and at saturation (closed loop, C workers);
* route propagation: the time from a route-table write until every replica serves it;
* seen-items exclusion: a second version (same model) whose index carries a seen-items file
  with MovieLens-1M-shaped histories (per-user counts lognormal, median 69, as the real
  panel users' at replay day 0): ``POST /search`` with ``user_ids`` on it vs without on
  the plain index, and ``/recommend`` routed to each.

It prints p50/p99 latency and throughput per path, the router's own overhead (end to end
minus direct) and the ratios, and a per-request breakdown of a sequential /recommend from
each service's own metrics. No asserts: it reports.

    .venv/bin/python benchmarks/bench_serving.py           # ~3 min
    .venv/bin/python benchmarks/bench_serving.py --quick   # ~1 min, noisier

The client runs on the same machine as the servers and competes with them for its cores,
so saturation figures are those of the whole machine, not of the servers alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

K = 10
VERSION = 1


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Stats:
    """Latencies (seconds) of one measured run, its wall time and its failures."""

    def __init__(self, name: str, latencies: list[float], elapsed: float, failures: int = 0,
                 note: str = "") -> None:
        self.name = name
        self.lat = np.asarray(latencies, dtype=np.float64)
        self.elapsed = elapsed
        self.failures = failures
        self.note = note

    @property
    def n(self) -> int:
        return len(self.lat)

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.lat, q) * 1000) if self.n else float("nan")

    @property
    def p50(self) -> float:
        return self.pct_ms(50)

    @property
    def p99(self) -> float:
        return self.pct_ms(99)

    @property
    def rate(self) -> float:
        return self.n / self.elapsed if self.elapsed > 0 else float("nan")

    def line(self) -> str:
        fail = f", {self.failures} failed" if self.failures else ""
        return (f"{self.name}: n={self.n}, p50 {self.p50:.2f} ms, p99 {self.p99:.2f} ms, "
                f"{self.rate:,.0f} req/s{fail}{(' ' + self.note) if self.note else ''}")


# ---------------------------------------------------------------------------- in process
def bench_in_process(bundle: Path, index_dir: Path, users: np.ndarray, n: int) -> Stats:
    """TorchScript embed + FAISS search in this process, one user at a time, one thread."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model = torch.jit.load(str(bundle / "serving_tower.pt"), map_location="cpu").eval()
    index = faiss.read_index(str(index_dir / "index.faiss"))

    def one(uid: int) -> None:
        with torch.inference_mode():
            vec = model(torch.tensor([[uid]], dtype=torch.int64)).numpy().astype(np.float32, copy=False)
        index.search(vec, K)

    for uid in users[:50]:
        one(int(uid))
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        one(int(users[i % len(users)]))
        lat.append(time.perf_counter() - t0)
    return Stats("in-process (sequential, 1 thread)", lat, time.perf_counter() - start)


# ---------------------------------------------------------------------------- direct
class DirectPath:
    """Triton gRPC embed then index-service search, synchronous, with its own connections."""

    def __init__(self, triton_grpc: str, index_url: str) -> None:
        import httpx
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.triton = grpcclient.InferenceServerClient(triton_grpc)
        self.http = httpx.Client(base_url=index_url, timeout=10.0)
        self.legs: list[tuple[float, float]] | None = None  # (Triton, index) seconds when set

    def recommend(self, uid: int) -> list[int]:
        t0 = time.perf_counter()
        inp = self._grpc.InferInput("USER_ID__0", [1, 1], "INT64")
        inp.set_data_from_numpy(np.array([[uid]], dtype=np.int64))
        out = self.triton.infer("user_tower", [inp], model_version=str(VERSION))
        vec = out.as_numpy("EMBEDDING__0")[0]
        t1 = time.perf_counter()
        resp = self.http.post("/search", json={"version": VERSION, "vectors": [vec.tolist()], "k": K})
        resp.raise_for_status()
        ids = resp.json()["ids"][0]
        if self.legs is not None:
            self.legs.append((t1 - t0, time.perf_counter() - t1))
        return ids

    def close(self) -> None:
        self.http.close()
        self.triton.close()


def bench_direct_sequential(ep: dict, users: np.ndarray, n: int) -> tuple[Stats, np.ndarray]:
    """Sequential direct calls; also returns each call's (Triton, index) leg times."""
    path = DirectPath(ep["triton_grpc"], ep["index_url"])
    try:
        for uid in users[:50]:
            path.recommend(int(uid))
        path.legs = []
        lat = []
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            path.recommend(int(users[i % len(users)]))
            lat.append(time.perf_counter() - t0)
        return Stats("direct (sequential)", lat, time.perf_counter() - start), np.asarray(path.legs)
    finally:
        path.close()


async def _direct_async_sequential(ep: dict, users: np.ndarray, n: int) -> tuple[Stats, np.ndarray]:
    """The direct path with the router's own client libraries (grpc.aio, httpx.AsyncClient),
    sequentially: separates what those libraries cost from what the router adds."""
    import httpx
    import tritonclient.grpc.aio as grpcaio

    triton = grpcaio.InferenceServerClient(ep["triton_grpc"])
    legs: list[tuple[float, float]] = []
    try:
        async with httpx.AsyncClient(base_url=ep["index_url"], timeout=10.0) as http:
            async def one(uid: int) -> None:
                t0 = time.perf_counter()
                inp = grpcaio.InferInput("USER_ID__0", [1, 1], "INT64")
                inp.set_data_from_numpy(np.array([[uid]], dtype=np.int64))
                out = await triton.infer("user_tower", [inp], model_version=str(VERSION))
                vec = out.as_numpy("EMBEDDING__0")[0]
                t1 = time.perf_counter()
                resp = await http.post("/search", json={"version": VERSION, "vectors": [vec.tolist()], "k": K})
                resp.raise_for_status()
                legs.append((t1 - t0, time.perf_counter() - t1))

            for uid in users[:50]:
                await one(int(uid))
            legs.clear()
            start = time.perf_counter()
            for i in range(n):
                await one(int(users[i % len(users)]))
            elapsed = time.perf_counter() - start
    finally:
        await triton.close()
    arr = np.asarray(legs)
    return Stats("direct, async clients (sequential)", list(arr.sum(axis=1)), elapsed), arr


def bench_direct_saturation(ep: dict, users: np.ndarray, threads: int, seconds: float) -> Stats:
    """Closed loop: ``threads`` client threads, each with its own gRPC and HTTP connections."""
    paths = [DirectPath(ep["triton_grpc"], ep["index_url"]) for _ in range(threads)]
    lats: list[list[float]] = [[] for _ in range(threads)]
    fails = [0] * threads
    go = threading.Event()
    stop_at = [0.0]

    def worker(w: int) -> None:
        rng = random.Random(w)
        path = paths[w]
        path.recommend(int(users[w]))  # connect before the clock starts
        go.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            try:
                path.recommend(int(users[rng.randrange(len(users))]))
                lats[w].append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                fails[w] += 1

    ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in ts:
        t.start()
    time.sleep(0.5)
    start = time.perf_counter()
    stop_at[0] = start + seconds
    go.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    for p in paths:
        p.close()
    return Stats(f"direct (saturation, {threads} threads)", [x for ls in lats for x in ls], elapsed, sum(fails))


# ---------------------------------------------------------------------------- end to end
def bench_e2e_sequential(urls: list[str], users: np.ndarray, n: int) -> Stats:
    import httpx

    with httpx.Client(timeout=10.0) as c:
        for i, uid in enumerate(users[:50]):
            c.post(urls[i % len(urls)] + "/recommend", json={"user_id": int(uid), "k": K}).raise_for_status()
        lat, fails = [], 0
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post(urls[i % len(urls)] + "/recommend", json={"user_id": int(users[i % len(users)]), "k": K})
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
            else:
                fails += 1
        return Stats("e2e /recommend (sequential)", lat, time.perf_counter() - start, fails)


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 JSON poster on asyncio streams, for load generation.

    On a machine whose client shares the servers' cores, every millisecond of client CPU
    is taken from the servers; httpx.AsyncClient spends a few per request (and more as
    concurrency grows), this spends a fraction of one. Answers must carry Content-Length
    (uvicorn's do)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._all: list[asyncio.StreamWriter] = []

    async def post(self, url: str, payload: dict) -> int:
        """POST ``payload`` as JSON; returns the status (the body is read and dropped)."""
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        key = (host, int(port or 80))
        idle = self._idle.setdefault(key, [])
        if idle:
            reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection(*key)
            self._all.append(writer)
        body = json.dumps(payload).encode()
        try:
            writer.write(f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" not in headers:
                raise RuntimeError("answer without Content-Length")
            await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            idle.append((reader, writer))
        return status

    async def aclose(self) -> None:
        for w in self._all:
            w.close()


class HttpxPoster:
    """The same interface over httpx.AsyncClient (what the simulator uses)."""

    def __init__(self) -> None:
        import httpx

        self._c = httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=512,
                                                                       max_keepalive_connections=512))

    async def post(self, url: str, payload: dict) -> int:
        return (await self._c.post(url, json=payload)).status_code

    async def aclose(self) -> None:
        await self._c.aclose()


def _poster(kind: str) -> RawHTTP | HttpxPoster:
    return RawHTTP() if kind == "raw" else HttpxPoster()


async def _open_loop(urls: list[str], users: np.ndarray, rate: float, seconds: float,
                     client: str) -> tuple[Stats, int]:
    """Sends at fixed times t0 + i/rate whatever the answers do; latency counts from the
    intended send time, so a client or server falling behind shows in it (no coordinated
    omission). Returns the stats and how many sends started more than 5 ms late."""
    total = int(rate * seconds)
    lat: list[float] = []
    fails = [0]
    late = [0]
    rng = random.Random(1)
    c = _poster(client)
    try:
        for i in range(20):  # open connections to both replicas first
            await c.post(urls[i % len(urls)] + "/recommend", {"user_id": int(users[i]), "k": K})

        async def one(i: int, due: float) -> None:
            if time.perf_counter() - due > 0.005:
                late[0] += 1
            try:
                status = await c.post(urls[i % len(urls)] + "/recommend",
                                      {"user_id": int(users[rng.randrange(len(users))]), "k": K})
                if status == 200:
                    lat.append(time.perf_counter() - due)
                else:
                    fails[0] += 1
            except Exception:  # noqa: BLE001 - counted, the run goes on
                fails[0] += 1

        tasks = []
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        await c.aclose()
    name = f"e2e /recommend (open loop, {rate:g} req/s target)"
    return Stats(name, lat, elapsed, fails[0]), late[0]


async def _closed_loop(urls: list[str], users: np.ndarray, workers: int, seconds: float, client: str) -> Stats:
    """``workers`` loops, each sending its next request when its last one is answered."""
    lat: list[float] = []
    fails = [0]
    c = _poster(client)
    try:
        # two connections per worker (one per replica) opened before the clock starts
        await asyncio.gather(*(c.post(urls[i % len(urls)] + "/recommend", {"user_id": int(users[i]), "k": K})
                               for i in range(2 * workers)))
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            rng = random.Random(100 + w)
            i = w
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    status = await c.post(urls[i % len(urls)] + "/recommend",
                                          {"user_id": int(users[rng.randrange(len(users))]), "k": K})
                    if status == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        fails[0] += 1
                except Exception:  # noqa: BLE001
                    fails[0] += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(workers)))
        elapsed = time.perf_counter() - start
    finally:
        await c.aclose()
    return Stats(f"e2e /recommend (saturation, {workers} workers)", lat, elapsed, fails[0])


# ---------------------------------------------------------------------------- CPU
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by each named process group,
    plus this process as "client". Linux /proc only; empty where it is missing."""
    out = {name: 0.0 for name in groups}
    by_pgid = {pgid: name for name, pgid in groups.items()}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # the command name may hold spaces: fields start after its closing paren
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgrp, utime, stime = int(fields[2]), int(fields[11]), int(fields[12])
        used = (utime + stime) / _TICK
        if int(entry) == os.getpid():
            out["client"] = used
        elif pgrp in by_pgid:
            out[by_pgid[pgrp]] += used
    try:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
        # busy = everything but idle and iowait, over all CPUs
        out["_machine_busy"] = (sum(ticks) - ticks[3] - ticks[4]) / _TICK
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_line(before: dict[str, float], after: dict[str, float], stats: Stats) -> str:
    """CPU milliseconds per answered request, by service, and the machine's utilisation."""
    if not before or not stats.n:
        return ""
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    routers = sum(v for k, v in used.items() if k.startswith("router"))
    parts = [("client", used.get("client", 0.0)), ("routers", routers),
             ("triton", used.get("triton", 0.0)), ("index", used.get("index_service", 0.0))]
    total = sum(v for _, v in parts)
    capacity = stats.elapsed * (os.cpu_count() or 1)
    line = ("    CPU ms/request: " + ", ".join(f"{k} {v / stats.n * 1000:.2f}" for k, v in parts if v or k != "routers")
            + f"; total {total / stats.n * 1000:.2f}. CPU busy: these processes {total / capacity:.0%}")
    if "_machine_busy" in used:
        others = max(0.0, used["_machine_busy"] - total)
        line += f", other processes on the machine {others / capacity:.0%}"
    return line


# ---------------------------------------------------------------------------- breakdown
_SERIES = {
    "router_response": ("dayloop_router_response_seconds", 1.0),
    "router_attempt": ("dayloop_router_request_seconds", 1.0),
    "index_search": ("dayloop_index_search_seconds", 1.0),
    "triton_request": ("nv_inference_request_duration_us", 1e-6),
    "triton_queue": ("nv_inference_queue_duration_us", 1e-6),
    "triton_compute": ("nv_inference_compute_infer_duration_us", 1e-6),
    "triton_count": ("nv_inference_request_success", 1.0),
}


def scrape(ep: dict) -> dict[str, float]:
    """Cumulative sums (seconds) and counts of the latency series of every service."""
    import httpx

    urls = [u + "/metrics" for u in ep["router_urls"]] + [ep["index_url"] + "/metrics", ep["triton_metrics"]]
    out: dict[str, float] = {}
    with httpx.Client(timeout=5.0) as c:
        for url in urls:
            for line in c.get(url).text.splitlines():
                if line.startswith("#"):
                    continue
                name = line.split("{", 1)[0].split(" ", 1)[0]
                value = float(line.rsplit(" ", 1)[1])
                for key, (series, scale) in _SERIES.items():
                    if name in (series, series + "_sum", series + "_total"):
                        out[key + "_sum"] = out.get(key + "_sum", 0.0) + value * scale
                    elif name == series + "_count":
                        out[key + "_count"] = out.get(key + "_count", 0.0) + value
    return out


def mean_breakdown(before: dict[str, float], after: dict[str, float], client: Stats) -> list[tuple[str, float]]:
    """Per-request means (ms) between two scrapes, outermost first."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def mean(key: str, count_key: str | None = None) -> float:
        n = d(count_key or key + "_count")
        return d(key + "_sum") / n * 1000 if n else float("nan")

    return [
        ("client: POST /recommend round trip", float(client.lat.mean() * 1000)),
        ("router: /recommend handler (route, attempt, impression)", mean("router_response")),
        ("router: attempt (Triton gRPC + index HTTP, as awaited)", mean("router_attempt")),
        ("Triton: request (queue + Python-backend compute)", mean("triton_request", "triton_count_sum")),
        ("Triton:   of which queue (dynamic batcher)", mean("triton_queue", "triton_count_sum")),
        ("Triton:   of which compute (stub + TorchScript)", mean("triton_compute", "triton_count_sum")),
        ("index service: /search (parse, search, encode)", mean("index_search")),
    ]


# ---------------------------------------------------------------------------- routes
def bench_propagation(dp, urls: list[str], trials: int) -> tuple[list[float], list[float], list[float]]:
    """Write a new revision ``trials`` times; for each, seconds from the start of the write
    until every replica's /health shows it, how long the write call took, and the time
    from the write's acknowledgement to the last replica."""
    import httpx

    from serving.routing import single_version_table

    to_all, write_s, after_ack = [], [], []
    rev = dp.router.routes().revision
    rng = random.Random(7)
    with httpx.Client(timeout=5.0) as c:
        for i in range(trials):
            # a random pause so the writes land at different points of the replicas' poll cycle
            time.sleep(rng.uniform(0.05, 0.35))
            t0 = time.perf_counter()
            out = dp.router.write_routes(single_version_table(VERSION, salt=f"s{i % 2}"), rev, "bench", f"trial {i}")
            t_ack = time.perf_counter()
            rev = out.revision
            pending = set(urls)
            while pending:
                for u in list(pending):
                    if int(c.get(u + "/health").json().get("revision", 0)) >= rev:
                        pending.discard(u)
                if time.perf_counter() - t0 > 10:
                    raise TimeoutError(f"revision {rev} not applied everywhere after 10 s: {pending}")
            t_all = time.perf_counter()
            to_all.append(t_all - t0)
            write_s.append(t_ack - t0)
            after_ack.append(t_all - t_ack)
    return to_all, write_s, after_ack


# ---------------------------------------------------------------------------- exclusion
SEEN_VERSION = 2


def make_seen_index(index_dir: Path, out: Path, users: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """``index_dir`` copied to ``out`` plus a seen-items file; returns each user's seen count.

    Counts are lognormal with median 69 (MovieLens-1M panel users at replay day 0: median 69,
    p99 1,096, max 1,728 ratings of 3,706 movies), capped at half the catalogue."""
    import shutil

    from serving.fileio import file_sha256
    from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file

    shutil.copytree(index_dir, out)
    rng = np.random.default_rng(9)
    counts = np.clip(rng.lognormal(np.log(69), 1.3, size=users.size).astype(np.int64), 1, item_ids.size // 2)
    pairs_u = np.repeat(users, counts)
    pairs_i = np.concatenate([rng.choice(item_ids, size=c, replace=False) for c in counts])
    path = write_seen_file(out / SEEN_FILE, *csr_from_pairs(pairs_u, pairs_i), "2026-01-01")
    meta = json.loads((out / "index_meta.json").read_text())
    meta["seen_items"] = {"file": SEEN_FILE, "fingerprint": file_sha256(path), "last_day": "2026-01-01"}
    (out / "index_meta.json").write_text(json.dumps(meta))
    return counts


def bench_index_search(index_url: str, version: int, vectors: np.ndarray, users: np.ndarray, n: int,
                       with_users: bool) -> Stats:
    """Sequential ``POST /search`` of one user vector, with or without its user id."""
    import httpx

    def body(i: int) -> dict:
        b = {"version": version, "vectors": [vectors[i % len(vectors)].tolist()], "k": K}
        if with_users:
            b["user_ids"] = [int(users[i % len(users)])]
        return b

    with httpx.Client(base_url=index_url, timeout=10.0) as c:
        for i in range(50):
            c.post("/search", json=body(i)).raise_for_status()
        lat = []
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            c.post("/search", json=body(i)).raise_for_status()
            lat.append(time.perf_counter() - t0)
    name = f"index /search v{version} " + ("with user_ids (exclusion)" if with_users else "without user_ids")
    return Stats(name, lat, time.perf_counter() - start)


def bench_exclusion(dp, ep: dict, urls: list[str], bundle: Path, users: np.ndarray, n: int) -> list[Stats]:
    """Search and /recommend with the seen-items exclusion vs without, sequential, same users."""
    import torch

    from serving.routing import single_version_table

    tower = torch.jit.load(str(bundle / "serving_tower.pt"), map_location="cpu").eval()
    sample = users[:500]
    with torch.inference_mode():
        vectors = tower(torch.from_numpy(sample.reshape(-1, 1))).numpy().astype(np.float32)
    plain = bench_index_search(ep["index_url"], VERSION, vectors, sample, n, with_users=False)
    excluded = bench_index_search(ep["index_url"], SEEN_VERSION, vectors, sample, n, with_users=True)
    # The baseline right before, not the e2e run minutes earlier: neighbours' load drifts.
    e2e_plain = bench_e2e_sequential(urls, users, n)
    e2e_plain.name = f"e2e /recommend (sequential, v{VERSION}: no seen file)"
    rev = dp.router.routes().revision
    rev = dp.router.write_routes(single_version_table(SEEN_VERSION), rev, "bench", "exclusion").revision
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and min(dp.router.applied_revisions().values()) < rev:
        time.sleep(0.05)
    e2e_seen = bench_e2e_sequential(urls, users, n)
    e2e_seen.name = f"e2e /recommend (sequential, v{SEEN_VERSION}: exclusion)"
    dp.router.write_routes(single_version_table(VERSION), rev, "bench", "back to the plain index")
    return [plain, excluded, e2e_plain, e2e_seen]


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (~1 min): noisier figures")
    parser.add_argument("--rate", type=float, default=50.0, help="open-loop rate, req/s")
    parser.add_argument("--concurrency", default="8,16", help="closed-loop worker counts, comma list")
    parser.add_argument("--direct-threads", type=int, default=8, help="client threads for direct saturation")
    parser.add_argument("--load-client", choices=("raw", "httpx"), default="raw",
                        help="client of the open-loop and saturation runs (raw: lean asyncio HTTP/1.1)")
    parser.add_argument("--n-users", type=int, default=6040)
    parser.add_argument("--n-items", type=int, default=3706)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)

    seq_n = 300 if args.quick else 1000
    open_s = 8.0 if args.quick else 20.0
    sat_s = 6.0 if args.quick else 15.0
    trials = 5 if args.quick else 10
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]


    from serving.client import DataPlaneClient
    from serving.launch import DataPlane, PlaneConfig
    from serving.routing import single_version_table
    from serving_helpers import free_port, make_bundle, make_index, serving_python

    say(f"bench_serving: {os.cpu_count()} CPU(s); the client and every server share them, so "
        f"figures are for the whole machine (client included), not the servers alone.")
    say(f"model: {args.n_users:,} users, {args.n_items:,} items, dim {args.dim}, exact index, k={K}")

    tmp = tempfile.TemporaryDirectory(prefix="bench_serving_")
    work = Path(tmp.name)
    t0 = time.perf_counter()
    bundle = make_bundle(work / "bundle", seed=0, n_users=args.n_users, n_items=args.n_items,
                         dim=args.dim, history_length=20)
    index_dir = make_index(bundle, work / "index")
    users = np.load(bundle / "user_ids.npy").astype(np.int64)
    np.random.default_rng(0).shuffle(users)
    say(f"bundle + index: {time.perf_counter() - t0:.1f}s")

    home = work / "plane"
    cfg = PlaneConfig(home=home, python=serving_python(), triton_http=free_port(), triton_grpc=free_port(),
                      triton_metrics=free_port(), index_port=free_port(),
                      router_ports=(free_port(), free_port()), prometheus_port=free_port())
    plane = DataPlane(cfg)
    rows: list[Stats] = []
    try:
        t0 = time.perf_counter()
        plane.start(prometheus=False)
        dp = DataPlaneClient.from_plane_file(home / "plane.json")
        meta = json.loads((index_dir / "index_meta.json").read_text())
        dp.load_version(VERSION, bundle / "serving_tower.pt", str(index_dir), args.dim, meta["fingerprint"])
        seen_counts = make_seen_index(index_dir, work / "index_seen", users, np.load(bundle / "item_ids.npy"))
        dp.load_version(SEEN_VERSION, bundle / "serving_tower.pt", str(work / "index_seen"), args.dim,
                        meta["fingerprint"])
        dp.router.write_routes(single_version_table(VERSION), 0, "bench", "bench bootstrap")
        ep = cfg.endpoints()
        urls: list[str] = list(ep["router_urls"])  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and min(dp.router.applied_revisions().values()) < 1:
            time.sleep(0.05)
        say(f"data plane up, v{VERSION} loaded and routed: {time.perf_counter() - t0:.1f}s")
        say()

        groups = {n: g for n, g in plane.status().items() if g}
        cpu_notes: list[tuple[str, str]] = []

        def run(fn, *a):
            """Run one measurement, print its line and its CPU use per request."""
            cpu0 = cpu_seconds(groups)
            out = fn(*a)
            stats = out[0] if isinstance(out, tuple) else out
            note = cpu_line(cpu0, cpu_seconds(groups), stats)
            say(stats.line())
            if note:
                say(note)
                cpu_notes.append((stats.name, note))
            return out

        floor = bench_in_process(bundle, index_dir, users, seq_n * 2)  # one thread: its CPU is its time
        say(floor.line())
        direct, direct_legs = run(bench_direct_sequential, ep, users, seq_n)
        direct_async, async_legs = run(lambda: asyncio.run(_direct_async_sequential(ep, users, seq_n)))
        direct_sat = run(bench_direct_saturation, ep, users, args.direct_threads, sat_s)
        before = scrape(ep)
        e2e = run(bench_e2e_sequential, urls, users, seq_n)
        breakdown = mean_breakdown(before, scrape(ep), e2e)
        open_loop, late = run(lambda: asyncio.run(_open_loop(urls, users, args.rate, open_s, args.load_client)))
        open_loop.note = f"({late} sends >5 ms late; latency from intended send time)"
        sats = [run(lambda c=c: asyncio.run(_closed_loop(urls, users, c, sat_s, args.load_client)))
                for c in concurrency]
        rows = [floor, direct, direct_async, direct_sat, e2e, open_loop, *sats]
        exclusion = bench_exclusion(dp, ep, urls, bundle, users, seq_n)
        search_plain, search_seen, e2e_plain, e2e_seen = exclusion
        for s in exclusion:
            say(s.line())
        rows += exclusion
        e2e_after = bench_e2e_sequential(urls, users, seq_n)  # the baseline again: the machine's drift
        e2e_after.name = f"e2e /recommend (sequential, v{VERSION} again)"
        say(e2e_after.line())
        rows.append(e2e_after)

        to_all, write_s, after_ack = bench_propagation(dp, urls, trials)
    finally:
        t_stop = time.perf_counter()
        stopped = plane.stop()
        say(f"stopped {', '.join(stopped)} in {time.perf_counter() - t_stop:.1f}s")
        tmp.cleanup()

    say()
    say(f"{'path':<48} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'fail':>5}")
    for s in rows:
        say(f"{s.name:<48} {s.p50:>8.2f} {s.p99:>8.2f} {s.rate:>9,.0f} {s.failures:>5}")
    say()
    say(f"CPU per answered request by process (client = this benchmark; load client: {args.load_client}):")
    for name, note in cpu_notes:
        say(f"  {name}:")
        say("  " + note.strip())
    say()
    say("sequential, one request at a time:")
    say(f"  router overhead (e2e - direct):  p50 {e2e.p50 - direct.p50:+.2f} ms, p99 {e2e.p99 - direct.p99:+.2f} ms")
    say(f"  of which the async clients:      p50 {direct_async.p50 - direct.p50:+.2f} ms "
        f"(direct with grpc.aio + httpx.AsyncClient - direct with sync clients)")
    say(f"  router proper (e2e - async direct): p50 {e2e.p50 - direct_async.p50:+.2f} ms, "
        f"p99 {e2e.p99 - direct_async.p99:+.2f} ms (HTTP server, validation, routing, impression, hop)")
    say(f"  e2e / direct:                    p50 {e2e.p50 / direct.p50:.2f}x, p99 {e2e.p99 / direct.p99:.2f}x")
    say(f"  e2e / in-process:                p50 {e2e.p50 / floor.p50:.2f}x, p99 {e2e.p99 / floor.p99:.2f}x")
    say(f"  direct / in-process:             p50 {direct.p50 / floor.p50:.2f}x, p99 {direct.p99 / floor.p99:.2f}x")
    say("throughput:")
    for s in sats:
        say(f"  {s.name[len('e2e /recommend ('):-1]:<24} e2e / direct saturation {s.rate / direct_sat.rate:.2f}x, "
            f"e2e / in-process (1 thread) {s.rate / floor.rate:.2f}x")
    say(f"  direct saturation / in-process (1 thread): {direct_sat.rate / floor.rate:.2f}x")
    say(f"  open loop achieved {open_loop.rate:.1f} req/s of {args.rate:g} target, "
        f"{open_loop.failures} failed, {late} late sends")
    say()
    say("where a sequential /recommend's time goes (means over that run, from each service's own metrics):")
    for label, ms in breakdown:
        say(f"  {label:<58} {ms:>7.2f} ms")
    say("  for comparison, direct calls from this process, medians:")
    for label, legs in (("sync", direct_legs), ("async", async_legs)):
        say(f"    {label:<5} clients: Triton gRPC round trip {np.median(legs[:, 0]) * 1000:.2f} ms, "
            f"index /search round trip {np.median(legs[:, 1]) * 1000:.2f} ms")
    say()
    say(f"seen-items exclusion (k={K}; seen items per user: median {np.median(seen_counts):.0f}, "
        f"p99 {np.percentile(seen_counts, 99):.0f}, max {seen_counts.max()}):")
    say(f"  index /search, with / without:   p50 {search_seen.p50 / search_plain.p50:.2f}x "
        f"({search_seen.p50:.2f} vs {search_plain.p50:.2f} ms), p99 {search_seen.p99 / search_plain.p99:.2f}x "
        f"({search_seen.p99:.2f} vs {search_plain.p99:.2f} ms)")
    say(f"  /recommend, with / without:      p50 {e2e_seen.p50 / e2e_plain.p50:.2f}x "
        f"({e2e_seen.p50:.2f} vs {e2e_plain.p50:.2f} ms), p99 {e2e_seen.p99 / e2e_plain.p99:.2f}x "
        f"({e2e_seen.p99:.2f} vs {e2e_plain.p99:.2f} ms); baseline rerun after it: p50 {e2e_after.p50:.2f} ms, "
        f"p99 {e2e_after.p99:.2f} ms")
    say()
    say(f"route-table propagation ({trials} writes; router polls its store every 0.2 s; requirement <= 1 s):")
    say(f"  write -> every replica serving: min {min(to_all):.3f} s, median {statistics.median(to_all):.3f} s, "
        f"max {max(to_all):.3f} s")
    say(f"  of which the write call itself:  median {statistics.median(write_s):.3f} s "
        f"(checks the pairing, stores, applies on the replica written to)")
    say(f"  write acknowledged -> all:       min {min(after_ack):.3f} s, median {statistics.median(after_ack):.3f} s, "
        f"max {max(after_ack):.3f} s")
    say()
    say(f"note: {os.cpu_count()}-CPU machine shared with other work; the benchmark client and every server "
        f"share those CPUs, so saturation figures are the whole machine's, and neighbours' load shows in them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
