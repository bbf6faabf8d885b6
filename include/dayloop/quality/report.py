"""Standalone HTML report of an offline gate decision (plots inlined as base64 PNG)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dayloop.training.metrics import parse_metric_column
from serving.fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    # the policy module, not the package: the package's run module imports this one
    from dayloop.quality.offline_gate.policy import GateDecision

REPORT_FILE = "offline_report.html"
METRICS_PNG = "metric_distributions.png"
SCORES_PNG = "score_histograms.png"
_COLORS = {"challenger": "#1f77b4", "champion": "#ff7f0e", "popularity": "#7f7f7f"}


def _metric_columns(df: pd.DataFrame) -> list[str]:
    cols = []
    for col in df.columns:
        try:
            parse_metric_column(str(col))
        except ValueError:
            continue
        cols.append(str(col))
    return sorted(cols, key=lambda c: (parse_metric_column(c)[0], parse_metric_column(c)[1]))


def _png(fig: object) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches an Agg canvas; no global pyplot/backend state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    return buf.getvalue()


def _share_hist(ax: object, values: np.ndarray, bins: np.ndarray, label: str, legend: str) -> None:
    """One side's step histogram on ``ax``, as shares of its (non-empty) ``values``."""
    ax.hist(  # type: ignore[attr-defined]
        values,
        bins=bins,
        histtype="step",
        linewidth=1.5,
        color=_COLORS.get(label),
        label=legend,
        weights=np.full(values.size, 1.0 / values.size),
    )


def _metric_plot(frames: Mapping[str, pd.DataFrame], columns: list[str]) -> bytes:
    from matplotlib.figure import Figure

    names = sorted({parse_metric_column(c)[0] for c in columns})
    ks = sorted({parse_metric_column(c)[1] for c in columns})
    fig = Figure(figsize=(4 * len(ks), 3 * len(names)))
    axes = fig.subplots(len(names), len(ks), squeeze=False)
    bins = np.linspace(0.0, 1.0, 21)
    for r, name in enumerate(names):
        for c, k in enumerate(ks):
            ax = axes[r][c]
            col = f"{name}@{k}"
            for label, df in frames.items():
                if col not in df.columns:
                    continue
                values = df[col].to_numpy(np.float64)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    continue
                _share_hist(ax, values, bins, label, f"{label} (mean {values.mean():.3f})")
            ax.set_title(f"per-user {col}")
            ax.set_xlabel(col)
            ax.set_ylabel("share of users")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _score_plot(samples: Mapping[str, np.ndarray], psi_value: float | None) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    finite = {k: np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for k, v in samples.items()}
    all_values = np.concatenate([v for v in finite.values() if v.size] or [np.zeros(1)])
    bins = np.linspace(all_values.min(), all_values.max() + 1e-9, 31)
    for label, values in finite.items():
        if values.size == 0:
            continue
        _share_hist(ax, values, bins, label, f"{label} (n={values.size})")
    title = "top-1 score per user"
    if psi_value is not None:
        title += f" (PSI {psi_value:.4f})"
    ax.set_title(title)
    ax.set_xlabel("top-1 score per user, z-scored over the user's scores of all items")
    ax.set_ylabel("share of users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–" if value is None else str(value)
    return f"{value:.4f}"


def _mean_rows(frames: Mapping[str, pd.DataFrame], columns: list[str]) -> str:
    """Table rows: each metric's finite mean per frame, then each frame's user count."""
    rows = []
    for col in columns:
        cells = []
        for df in frames.values():
            v = df[col].to_numpy(np.float64) if col in df.columns else np.array([])
            v = v[np.isfinite(v)]
            cells.append(f"<td>{_fmt(float(v.mean())) if v.size else '–'}</td>")
        rows.append(f"<tr><th>{html.escape(col)}</th>{''.join(cells)}</tr>")
    users_row = "".join(f"<td>{len(df)}</td>" for df in frames.values())
    rows.append(f"<tr><th>evaluated users</th>{users_row}</tr>")
    return "".join(rows)


def _render(
    decision: GateDecision, frames: Mapping[str, pd.DataFrame], columns: list[str], images: Mapping[str, bytes]
) -> str:
    """The self-contained HTML document (images inlined)."""
    header = "".join(f"<th>{html.escape(label)}</th>" for label in frames)
    reason_items = []
    for reason in decision.reasons:
        cls = "fail" if reason.startswith("FAIL") else ("pass" if reason.startswith("PASS") else "info")
        reason_items.append(f'<li class="{cls}">{html.escape(reason)}</li>')
    gate_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in sorted(decision.metrics.items())
    )
    verdict = "PASSED" if decision.passed else "FAILED"
    mode = " (bootstrap: no champion)" if decision.bootstrap else ""
    imgs = "".join(
        f'<h2>{html.escape(name.removesuffix(".png").replace("_", " "))}</h2>'
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in images.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dayloop offline gate: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}
.verdict {{ font-size: 1.6em; font-weight: bold; color: {'#1a7f37' if decision.passed else '#cf222e'}; }}
li.fail {{ color: #cf222e; }} li.pass {{ color: #1a7f37; }} li.info {{ color: #555; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Offline gate</h1>
<p class="verdict">{verdict}{html.escape(mode)}</p>
<p>generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}</p>
<h2>Checks</h2><ul>{''.join(reason_items)}</ul>
<h2>Mean per-user metrics</h2>
<table><tr><th>metric</th>{header}</tr>{_mean_rows(frames, columns)}</table>
<h2>Gate figures</h2><table>{gate_rows}</table>
{imgs}
</body></html>
"""


def write_offline_report(
    decision: GateDecision,
    challenger_df: pd.DataFrame,
    champion_df: pd.DataFrame | None,
    popularity_df: pd.DataFrame,
    score_samples: Mapping[str, np.ndarray] | None,
    out_dir: Path,
) -> Path:
    """Write ``offline_report.html`` (self-contained) plus its PNGs to ``out_dir``.

    Each file is written to a temporary name and renamed, the HTML last, so a reader
    never sees a half-written report. Returns the HTML path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames: dict[str, pd.DataFrame] = {"challenger": challenger_df}
    if champion_df is not None:
        frames["champion"] = champion_df
    frames["popularity"] = popularity_df
    columns = _metric_columns(challenger_df)
    if not columns:
        raise ValueError("challenger frame has no metric columns (expected e.g. 'recall@10')")

    images: dict[str, bytes] = {METRICS_PNG: _metric_plot(frames, columns)}
    samples = {k: v for k, v in (score_samples or {}).items() if np.asarray(v).size}
    if samples:
        images[SCORES_PNG] = _score_plot(samples, decision.metrics.get("psi"))
    for name, data in images.items():
        atomic_write_bytes(out_dir / name, data)
    return atomic_write_text(out_dir / REPORT_FILE, _render(decision, frames, columns, images))
