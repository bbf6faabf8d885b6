"""Benchmark the FAISS index choices on a synthetic clustered catalogue.

Prints, for exact (flat), IVF and HNSW indexes over the same unit vectors: build
time, recall@k against exact search, batched search throughput (queries/s) and the
speed ratio to exact search measured in the same run. No asserts: it reports.

    .venv/bin/python benchmarks/bench_faiss.py                    # 1M x 64, ~5-7 min on 2 cores
    .venv/bin/python benchmarks/bench_faiss.py --n-items 200000   # quick look

Ground truth is exact search of the query set (default 1000 queries), which is
also the baseline timing; its cost grows with n_items * queries.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def gaussian_mixture(
    n: int, dim: int, centres: np.ndarray, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit vectors around random centres, generated in chunks to bound float64 temporaries."""
    out = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        labels = rng.integers(0, len(centres), size=m)
        pts = centres[labels] + rng.standard_normal((m, dim)) * (spread / math.sqrt(dim))
        out[lo : lo + m] = _unit(pts)
    return out


def timed_search(index, queries: np.ndarray, k: int, min_seconds: float = 1.0) -> tuple[float, np.ndarray]:
    """Batched search repeated until ``min_seconds`` passed; returns (queries/s, ids)."""
    runs = 0
    start = time.perf_counter()
    while True:
        _, found = index.search(queries, k)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return runs * len(queries) / elapsed, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000, help="query batch size (also ground-truth set)")
    parser.add_argument("--clusters", type=int, default=0, help="mixture components (default: sqrt(n_items))")
    parser.add_argument("--spread", type=float, default=1.0, help="item noise norm around its centre")
    parser.add_argument("--query-spread", type=float, default=1.5, help="query (user) noise norm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="flat,ivf,hnsw", help="comma list of flat, ivf, hnsw")
    # The stage's HNSW default (M=32, efConstruction=80) took ~8 min to build 1M x 64
    # on 2 shared cores; the benchmark defaults to a cheaper graph to stay under ~10 min.
    # Pass 0 to use choose_index_spec's values.
    parser.add_argument("--hnsw-m", type=int, default=16, help="HNSW M (0: choose_index_spec's)")
    parser.add_argument("--hnsw-ef-construction", type=int, default=40, help="(0: choose_index_spec's)")
    args = parser.parse_args(argv)

    import dataclasses

    import faiss

    from dayloop.index import faiss_index as fi

    kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    threads = fi.configure_faiss_threads(args.threads)
    n, dim, k = args.n_items, args.dim, args.k
    n_clusters = args.clusters or max(1, int(math.sqrt(n)))
    rng = np.random.default_rng(args.seed)

    def say(msg: str) -> None:
        print(msg, flush=True)

    say(f"faiss {faiss.__version__}, threads={threads}, n_items={n:,}, dim={dim}, k={k}, "
        f"queries={args.queries}, clusters={n_clusters}, spread={args.spread}, query_spread={args.query_spread}")

    t0 = time.perf_counter()
    centres = _unit(rng.standard_normal((n_clusters, dim)))
    x = gaussian_mixture(n, dim, centres, args.spread, rng)
    # Queries are fresh draws (like user vectors), not perturbed catalogue rows.
    queries = gaussian_mixture(args.queries, dim, centres, args.query_spread, rng)
    ids = rng.permutation(n).astype(np.int64) * 3 + 17
    say(f"data: {time.perf_counter() - t0:.1f}s, catalogue {x.nbytes / 2**20:.0f} MiB")

    rows: list[tuple[str, str, float, float, float]] = []  # kind, params, build_s, recall, qps

    # Exact search is both the ground truth and the speed baseline.
    t0 = time.perf_counter()
    flat = fi.build_index(x, ids, fi.IndexSpec(kind="flat"))
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = fi.exact_search(x, ids, queries, k)
    say(f"ground truth (exact, {args.queries} queries): {time.perf_counter() - t0:.1f}s")
    exact_qps, _ = timed_search(flat, queries, k, min_seconds=0.0 if n >= 500_000 else 1.0)
    if "flat" in kinds:
        recall = fi.recall_against_exact(flat, x, ids, queries, k, ground_truth=truth)
        rows.append(("flat", "-", flat_build, recall, exact_qps))
    del flat
    say(f"flat: build {flat_build:.1f}s, {exact_qps:,.0f} q/s")

    def measure(index, kind: str, fixed: str, knob: str, value: int, initial: int, build: float) -> None:
        """Recall and q/s of ``index`` at its current search setting ``knob=value``: one row."""
        recall = fi.recall_against_exact(index, x, ids, queries, k, ground_truth=truth)
        qps, _ = timed_search(index, queries, k)
        tag = " (initial)" if value == initial else ""
        rows.append((kind, f"{fixed}{knob}={value}{tag}", build, recall, qps))
        say(f"  {knob}={value}: recall {recall:.4f}, {qps:,.0f} q/s")

    if "ivf" in kinds:
        spec = fi.choose_index_spec(n, dim, exact_threshold=0, k=k)
        t0 = time.perf_counter()
        ivf = fi.build_index(x, ids, spec, seed=args.seed)
        build = time.perf_counter() - t0
        say(f"ivf: nlist={spec.nlist} build {build:.1f}s")
        probes = sorted({max(1, spec.nprobe // 4), max(1, spec.nprobe // 2), spec.nprobe,
                         min(spec.nlist, spec.nprobe * 2), min(spec.nlist, spec.nprobe * 4)})
        for p in probes:
            fi.set_search_params(ivf, nprobe=p)
            measure(ivf, "ivf", f"nlist={spec.nlist} ", "nprobe", p, spec.nprobe, build)
        del ivf

    if "hnsw" in kinds:
        spec = fi.choose_index_spec(n, dim, exact_threshold=0, k=k, approximate="hnsw")
        if args.hnsw_m:
            spec = dataclasses.replace(spec, hnsw_m=args.hnsw_m)
        if args.hnsw_ef_construction:
            spec = dataclasses.replace(spec, ef_construction=args.hnsw_ef_construction)
        t0 = time.perf_counter()
        hnsw = fi.build_index(x, ids, spec, seed=args.seed)
        build = time.perf_counter() - t0
        say(f"hnsw: M={spec.hnsw_m} efConstruction={spec.ef_construction} build {build:.1f}s")
        for ef in sorted({k, spec.ef_search, 2 * spec.ef_search, 4 * spec.ef_search}):
            fi.set_search_params(hnsw, ef_search=ef)
            measure(hnsw, "hnsw", f"M={spec.hnsw_m} ", "efSearch", ef, spec.ef_search, build)
        del hnsw

    say("")
    say(f"{'index':<6} {'params':<34} {'build_s':>8} {'recall@' + str(k):>10} {'q/s':>10} {'vs exact':>9}")
    for kind, params, build, recall, qps in rows:
        say(f"{kind:<6} {params:<34} {build:>8.1f} {recall:>10.4f} {qps:>10,.0f} {qps / exact_qps:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
