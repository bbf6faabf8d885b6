"""The offline gate's infra check: does the exported user tower load and run on its own?

:func:`check_exported_model` runs the bundle's TorchScript in a fresh interpreter, the way
a server would, and reports what it saw as an :class:`InfraCheck`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dayloop.bundle_layout import MODEL_META_FILE, USER_TOWER_FILE

__all__ = ["InfraCheck", "check_exported_model"]


@dataclass(frozen=True)
class InfraCheck:
    """Result of loading and running the exported user tower in a fresh process."""

    ok: bool
    bundle_dir: str
    batch: int
    budget_ms: float
    latency_ms: float | None = None  # median over runs
    latency_p95_ms: float | None = None
    output_shape: list[int] | None = None
    output_dtype: str | None = None
    finite: bool | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return (
                f"user tower runs in a fresh process: output {self.output_shape} "
                f"{self.output_dtype}, finite, median latency {self.latency_ms:.2f} ms "
                f"(p95 {self.latency_p95_ms:.2f} ms) for batch {self.batch}"
            )
        return "user tower check failed: " + "; ".join(self.problems)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Runs in a fresh interpreter: only json/time/sys/torch, never dayloop, exactly like a
# server would. argv: meta_path tower_path batch n_runs (the paths are built here, so the
# bundle's file names stay in dayloop.bundle_layout); prints one line prefixed with the
# marker.
_CHILD_MARKER = "DAYLOOP_INFRA_RESULT="
_CHILD_SCRIPT = r"""
import json, sys, time
import torch
meta_path, tower_path, batch, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
meta = json.load(open(meta_path))
torch.manual_seed(0)
tower = torch.jit.load(tower_path, map_location="cpu")
tower.eval()
sizes = meta["feature_vocab_sizes"]
L, D = int(meta["history_length"]), int(meta["embedding_dim"])
user_idx = torch.randint(0, int(meta["n_users"]) + 1, (batch,))
hist_idx = torch.randint(0, int(meta["n_items"]) + 1, (batch, L))
feats = torch.stack([torch.randint(0, int(sizes[c]), (batch,))
                     for c in ("gender_idx", "age_idx", "occupation_idx")], dim=1)
times = []
with torch.inference_mode():
    for i in range(runs + 3):
        t0 = time.perf_counter()
        out = tower(user_idx, hist_idx, feats)
        dt = (time.perf_counter() - t0) * 1000.0
        if i >= 3:  # warm-up calls pay for the TorchScript profiling executor
            times.append(dt)
times.sort()
res = {
    "shape": list(out.shape),
    "dtype": str(out.dtype).replace("torch.", ""),
    "finite": bool(torch.isfinite(out).all()),
    "max_norm_error": float((out.norm(dim=1) - 1).abs().max()) if out.numel() else 0.0,
    "expected_dim": D,
    "median_ms": times[len(times) // 2],
    "p95_ms": times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))],
    "dayloop_imported": any(m == "dayloop" or m.startswith("dayloop.") for m in sys.modules),
}
print("%MARKER%" + json.dumps(res))
""".replace("%MARKER%", _CHILD_MARKER)


def _bundle_problems(bundle_dir: Path) -> list[str]:
    """What keeps the bundle from being run at all: missing files, an unusable meta file."""
    problems = [
        f"{bundle_dir / name} is missing"
        for name in (USER_TOWER_FILE, MODEL_META_FILE)
        if not (bundle_dir / name).is_file()
    ]
    if problems:
        return problems
    try:
        meta = json.loads((bundle_dir / MODEL_META_FILE).read_text())
        int(meta["history_length"]), int(meta["embedding_dim"]), int(meta["n_users"])
        int(meta["n_items"]), dict(meta["feature_vocab_sizes"])
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MODEL_META_FILE} is unreadable or incomplete: {exc!r}"]
    return []


def _run_child(bundle_dir: Path, batch: int, n_runs: int, timeout_s: float) -> dict[str, Any] | str:
    """The child's result, or why there is none."""
    argv = [str(bundle_dir / MODEL_META_FILE), str(bundle_dir / USER_TOWER_FILE), str(batch), str(n_runs)]
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD_SCRIPT, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"fresh-process check timed out after {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"loading/running {USER_TOWER_FILE} failed (exit {proc.returncode}): " + " | ".join(tail)
    return json.loads(lines[-1][len(_CHILD_MARKER) :])


def _output_problems(res: dict[str, Any], batch: int, budget_ms: float) -> list[str]:
    problems = []
    expected = [int(batch), int(res["expected_dim"])]
    if res["shape"] != expected:
        problems.append(f"output shape {res['shape']} != expected {expected}")
    if res["dtype"] != "float32":
        problems.append(f"output dtype {res['dtype']} != float32")
    if not res["finite"]:
        problems.append("output contains NaN or Inf")
    elif res["max_norm_error"] > 1e-3:
        problems.append(f"output rows are not unit-norm (max |norm - 1| = {res['max_norm_error']:.2e})")
    if res["dayloop_imported"]:
        problems.append("the TorchScript model pulled in the dayloop package")
    if res["median_ms"] > budget_ms:
        problems.append(f"median latency {res['median_ms']:.2f} ms > budget {budget_ms:.1f} ms")
    return problems


def check_exported_model(
    bundle_dir: Path | str,
    batch: int = 256,
    budget_ms: float = 200.0,
    n_runs: int = 20,
    timeout_s: float = 180.0,
) -> InfraCheck:
    """Load ``user_tower.pt`` in a fresh ``sys.executable`` process and run random inputs.

    Checks output shape [batch, D], float32, finite, unit norm, and the median latency
    of ``n_runs`` calls against ``budget_ms``. Never raises for a broken bundle: every
    problem (missing/corrupt file, crash, timeout) is reported in ``problems``.
    """
    bundle_dir = Path(bundle_dir)
    base = {"bundle_dir": str(bundle_dir), "batch": int(batch), "budget_ms": float(budget_ms)}
    if batch <= 0 or n_runs <= 0:
        raise ValueError(f"batch and n_runs must be positive, got {batch}, {n_runs}")
    problems = _bundle_problems(bundle_dir)
    if problems:
        return InfraCheck(ok=False, problems=problems, **base)
    res = _run_child(bundle_dir, batch, n_runs, timeout_s)
    if isinstance(res, str):
        return InfraCheck(ok=False, problems=[res], **base)
    problems = _output_problems(res, batch, budget_ms)
    return InfraCheck(
        ok=not problems,
        latency_ms=float(res["median_ms"]),
        latency_p95_ms=float(res["p95_ms"]),
        output_shape=res["shape"],
        output_dtype=res["dtype"],
        finite=bool(res["finite"]),
        problems=problems,
        **base,
    )
