"""The report a person reads after a canary rollout: each router metric over time, canary
against control, with every ramp step marked by its verdict, then the step-by-step analysis
(final checks and every look). Logged to the canary version's MLflow run under ``rollout/``.

Where simulated users run (a panel file, :func:`dayloop.simulation.truth.panel_path`), the
report also sets the decision beside the truth: each version's expected clicks per list over
the whole panel (:mod:`dayloop.simulation.truth`), and says whether the decision agrees.
Production has no panel and the report has no such section.

The time series come from Prometheus range queries over the routers' raw counters. They are
for reading, not deciding: the verdicts shown are the ones the analysis reached from exact
per-step windows (:mod:`dayloop.rollout.prom`), never recomputed from these curves.

Module import stays light (stdlib and the stdlib-only ``serving.fileio``): matplotlib, the
Prometheus client and the truth (numpy, torch) load inside the functions that need them, so
a DAG file importing this module parses fast.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from serving.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

REPORT_FILE = "rollout_report.html"
METRICS_PNG = "rollout_metrics.png"
TRUTH_FILE = "truth.json"
ARTIFACT_PATH = "rollout"

# Rows of the figure, in order: (key, axis label).
METRICS: tuple[tuple[str, str], ...] = (
    ("request_rate", "requests/s"),
    ("error_ratio", "errors / requests"),
    ("p99_latency_s", "p99 latency (s)"),
    ("nonfinite_rate", "non-finite outputs/s"),
    ("ctr", "clicks / impression"),
    ("route_share", "route share"),
)
CANARY_COLOR = "#1f77b4"
CONTROL_COLOR = "#ff7f0e"
DECISION_COLORS = {"pass": "#2ca02c", "fail": "#d62728", "aborted": "#7f7f7f"}
UNKNOWN_DECISION_COLOR = "#bbbbbb"
PHASE_CSS = {"pass": "pass", "fail": "fail", "inconclusive": "inconclusive", "aborted": "aborted"}

# Prometheus refuses a range query of more than 11,000 points per series.
_MAX_POINTS = 10_000
_FETCH_BEFORE = timedelta(seconds=30)
_FETCH_AFTER = timedelta(seconds=10)


# --------------------------------------------------------------------------- Prometheus


def _queries(selector: str, window: int) -> dict[str, str]:
    """PromQL per metric. Counters go through prom.window_query (increase() for series that
    existed, the last value for series born inside the window), so the first errors or NaN
    that create a series are not lost, which plain rate() would do."""
    from dayloop.rollout.prom import window_query

    def per_s(metric: str) -> str:
        return f"({window_query(metric, selector, window)} / {window})"

    requests = window_query("dayloop_router_requests_total", selector, window)
    # A version that never failed has no errors series at all; where its requests series
    # exists that absence means zero errors (the convention of dayloop.rollout.prom).
    errors = f"({window_query('dayloop_router_errors_total', selector, window)} or ({requests} * 0))"
    nonfinite = f"({per_s('dayloop_router_nonfinite_total')} or ({requests} * 0))"
    clicks = window_query("dayloop_router_clicks_total", selector, window)
    impressions = window_query("dayloop_router_impressions_total", selector, window)
    buckets = window_query("dayloop_router_request_seconds_bucket", selector, window, by="version, le")
    observed = window_query('dayloop_router_request_seconds_bucket', selector + ',le="+Inf"', window)
    return {
        "request_rate": per_s("dayloop_router_requests_total"),
        "error_ratio": f"{errors} / ({requests} > 0)",
        # No observations in the window would make the quantile NaN: only versions with some.
        "p99_latency_s": f"histogram_quantile(0.99, {buckets}) and on (version) ({observed} > 0)",
        "nonfinite_rate": nonfinite,
        "ctr": f"{clicks} / ({impressions} > 0)",
        "route_share": f"avg by (version) (dayloop_router_route_share{{{selector}}})",
    }


def _points(row: Any, query: str) -> tuple[int, list[tuple[float, float]]]:
    from dayloop.rollout.prom import PrometheusUnavailable

    try:
        version = int(row["metric"]["version"])
        raw = row["values"]
        pts = [(float(t), float(v)) for t, v in raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise PrometheusUnavailable(f"unreadable range series {str(row)[:200]} for {query!r}") from exc
    # A quantile above the top bucket is +Inf; a plot can show neither that nor NaN.
    return version, [(t, v) for t, v in pts if math.isfinite(v)]


def fetch_series(prom_url: str, versions: list[int], start: datetime, end: datetime,
                 step_s: float = 5.0, timeout_s: float = 10.0) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """Range queries over ``[start, end]`` (aware datetimes): metric -> version -> [(unix_ts, value)].

    Metrics: ``request_rate``, ``error_ratio``, ``p99_latency_s``, ``nonfinite_rate`` (per
    second), ``ctr`` and ``route_share`` (averaged over replicas), each over a rate window of
    ``max(4 * step, 10 s)``. A version without a series has no entry. Long spans widen the
    step to stay under Prometheus' point limit. Raises ``PrometheusUnavailable`` when
    Prometheus cannot be reached or answers something else than a matrix.
    """
    from dayloop.rollout.prom import connect, query_range, require_aware, versions_selector

    require_aware(start, "start")
    require_aware(end, "end")
    if end <= start:
        raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    if not (isinstance(step_s, (int, float)) and math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"step_s must be a positive number, got {step_s!r}")
    selector = versions_selector(versions)
    step = max(float(step_s), (end - start).total_seconds() / _MAX_POINTS)
    window = math.ceil(max(4.0 * step, 10.0))
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    with connect(prom_url, timeout_s) as client:
        for name, query in _queries(selector, window).items():
            got: dict[int, list[tuple[float, float]]] = {}
            for row in query_range(client, query, start, end, step, name=name):
                version, pts = _points(row, query)
                if pts:
                    got.setdefault(version, []).extend(pts)
            out[name] = {v: sorted(p) for v, p in got.items()}
    return out


# --------------------------------------------------------------------------- rendering


def _when(value: Any) -> datetime | None:
    """An ISO timestamp as an aware datetime (naive ones read as UTC), or None."""
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, str) and value:
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _num(value: Any, fmt: str = "g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else html.escape(str(value))
    return format(value, fmt)


def _vlabel(version: Any) -> str:
    return f"v{version}"


def _origin(steps: Sequence[Mapping], series: Mapping | None) -> float | None:
    starts = [t for s in steps if (t := _when(s.get("started_at"))) is not None]
    if starts:
        return min(starts).timestamp()
    stamps = [pts[0][0] for per_version in (series or {}).values() for pts in per_version.values() if pts]
    return min(stamps) if stamps else None


def _metrics_png(rollout: Mapping, steps: Sequence[Mapping], series: Mapping, origin: float) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    canary, control = rollout.get("version"), rollout.get("champion")
    arms = [(canary, f"{_vlabel(canary)} (canary)", CANARY_COLOR)]
    if control is not None:
        arms.append((control, f"{_vlabel(control)} (control)", CONTROL_COLOR))
    thresholds = (rollout.get("plan") or {}).get("thresholds") or {}
    limits = {"error_ratio": thresholds.get("max_error_ratio"), "p99_latency_s": thresholds.get("p99_budget_s")}

    fig = Figure(figsize=(11, 2.3 * len(METRICS)))
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend state
    axes = fig.subplots(len(METRICS), 1, sharex=True, squeeze=False)[:, 0]
    spans = []
    for s in steps:
        t0, t1 = _when(s.get("started_at")), _when(s.get("ended_at"))
        if t0 is None:
            continue
        color = DECISION_COLORS.get(str(s.get("decision")), UNKNOWN_DECISION_COLOR)
        spans.append((t0.timestamp() - origin, None if t1 is None else t1.timestamp() - origin,
                      color, s.get("percent")))
    for ax, (key, ylabel) in zip(axes, METRICS, strict=True):
        per_version = series.get(key) or {}
        drawn = 0
        for version, label, color in arms:
            pts = per_version.get(version) or per_version.get(str(version)) or []
            if pts:
                ax.plot([t - origin for t, _ in pts], [v for _, v in pts], color=color, linewidth=1.4,
                        label=label)
                drawn += 1
            else:
                # Keeps the legend honest about which arm had no data on this row.
                ax.plot([], [], color=color, linewidth=1.4, label=f"{label}: no data")
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
        for x0, x1, color, _ in spans:
            ax.axvline(x0, color=color, linewidth=1.2, linestyle="--")
            if x1 is not None and x1 > x0:
                ax.axvspan(x0, x1, color=color, alpha=0.08, linewidth=0)
        limit = limits.get(key)
        if isinstance(limit, (int, float)) and drawn:
            ax.axhline(limit, color="#555555", linewidth=0.8, linestyle=":", label=f"limit {limit:g}")
        if drawn:
            ax.set_ylim(bottom=0.0)  # every metric is >= 0; a zero line should sit on the floor
        # Names on the y axis keep the top edge free for the step labels.
        ax.set_ylabel(f"{key}\n{ylabel}", fontsize=8)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    top = axes[0]
    for x0, _, color, percent in spans:
        # Percent labels in the top row, y in axes coordinates so they sit above the data.
        top.text(x0, 1.02, f"{_num(percent)}%", transform=top.get_xaxis_transform(), color=color,
                 fontsize=8, ha="left", va="bottom", fontweight="bold")
    axes[-1].set_xlabel("seconds since the first step started")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _phase_cell(phase: Any) -> str:
    text = str(phase) if phase is not None else "–"
    return f'<td class="{PHASE_CSS.get(text, "other")}">{html.escape(text)}</td>'


def _summary(rollout: Mapping, steps: Sequence[Mapping]) -> str:
    e = html.escape
    plan = rollout.get("plan") or {}
    rows = [("outcome", str(rollout.get("outcome", "?"))), ("reason", str(rollout.get("reason") or "–")),
            ("canary", _vlabel(rollout.get("version"))),
            ("control", _vlabel(rollout.get("champion")) if rollout.get("champion") is not None else "none"),
            ("route salt", str(rollout.get("salt") or "–")), ("plan", str(plan.get("name", "–")))]
    for key in ("analysis_interval_seconds", "drain_seconds", "promote_grace_seconds"):
        if key in plan:
            rows.append((key.replace("_", " "), _num(plan[key])))
    out = ["<table class='kv'>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows]
    out.append("</table>")

    ran = {s.get("index"): s for s in steps}
    out.append("<h3>Plan steps</h3><table><tr><th>#</th><th>percent</th><th>bake (s)</th>"
               "<th>max bake (s)</th><th>min requests</th><th>min impressions</th><th>decision</th></tr>")
    for i, p in enumerate(plan.get("steps") or []):
        decision = (ran.get(i) or {}).get("decision", "not reached")
        out.append(f"<tr><td>{i + 1}</td><td>{_num(p.get('percent'))}%</td><td>{_num(p.get('bake_seconds'))}</td>"
                   f"<td>{_num(p.get('max_bake_seconds'))}</td><td>{_num(p.get('min_requests'))}</td>"
                   f"<td>{_num(p.get('min_impressions'))}</td>{_phase_cell(decision)}</tr>")
    out.append("</table>")
    thresholds = plan.get("thresholds") or {}
    if thresholds:
        out.append("<h3>Thresholds</h3><table class='kv'>")
        out += [f"<tr><th>{e(str(k))}</th><td>{_num(v)}</td></tr>" for k, v in thresholds.items()]
        out.append("</table>")
    return "\n".join(out)


def _clock(value: Any) -> str:
    t = _when(value)
    return t.astimezone(timezone.utc).strftime("%H:%M:%S") if t else str(value or "–")


def _final_analysis(step: Mapping) -> Mapping:
    # The operator's step record may carry the final look whole, under "result".
    return step.get("analysis") or (step.get("result") or {}).get("analysis") or {}


def _step_section(step: Mapping) -> str:
    e = html.escape
    index = step.get("index")
    title = (f"Step {index + 1 if isinstance(index, int) else e(str(index))}: "
             f"{_num(step.get('percent'))}% &mdash; {e(str(step.get('decision', '?')).upper())}")
    t0, t1 = _when(step.get("started_at")), _when(step.get("ended_at"))
    took = f" ({(t1 - t0).total_seconds():.0f} s)" if t0 and t1 else ""
    out = [f"<h3 class='{PHASE_CSS.get(str(step.get('decision')), 'other')}'>{title}</h3>",
           f"<p>{e(str(step.get('started_at') or '–'))} &rarr; {e(str(step.get('ended_at') or '–'))}{e(took)}</p>"]
    analysis = _final_analysis(step)
    if analysis:
        out.append(f"<p>final analysis: <b>{e(str(analysis.get('phase', '?')))}</b></p>")
        out.append("<table class='checks'><tr><th>check</th><th>phase</th><th>message</th></tr>")
        for c in analysis.get("checks") or []:
            out.append(f"<tr><td>{e(str(c.get('name', '?')))}</td>{_phase_cell(c.get('phase'))}"
                       f"<td class='msg'>{e(str(c.get('message', '')))}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>no final analysis for this step</p>")
    looks = step.get("looks") or []
    out.append(f"<details{' open' if step.get('decision') != 'pass' else ''}><summary>{len(looks)} look(s)</summary>")
    if looks:
        out.append("<table class='looks'><tr><th>time (UTC)</th><th>elapsed (s)</th><th>phase</th>"
                   "<th>decision</th><th>reasons</th></tr>")
        for look in looks:
            reasons = "".join(f"<li>{e(str(r))}</li>" for r in look.get("reasons") or [])
            decision = e(str(look.get("decision") or "–"))
            out.append(f"<tr><td>{e(_clock(look.get('at')))}</td><td>{_num(look.get('elapsed_s'), '.1f')}</td>"
                       f"{_phase_cell(look.get('phase'))}<td>{decision}</td>"
                       f"<td class='msg'><ul>{reasons}</ul></td></tr>")
        out.append("</table>")
    out.append("</details>")
    return "\n".join(out)


def failed_checks(steps: Sequence[Mapping]) -> list[str]:
    """Names of the verdict checks (advisory ones left out) that failed the rollout's failed
    step; empty when no step failed or it failed without a failing check (inconclusive too long)."""
    failed = [s for s in steps if s.get("decision") == "fail"]
    if not failed:
        return []
    checks = _final_analysis(failed[-1]).get("checks") or []
    return [str(c.get("name")) for c in checks if c.get("phase") == "fail" and not c.get("advisory")]


def _truth_section(truth: Mapping | None) -> str:
    if truth is None:
        return ""
    e = html.escape
    if "sentence" not in truth:
        return f"<h2>Truth (simulated users)</h2><p class='missing'>Truth not computed: {e(str(truth.get('error')))}.</p>"
    css = {True: "pass", False: "fail"}.get(truth.get("agrees"), "aborted")
    return (f"<h2>Truth (simulated users)</h2><p class='{css}'><b>{e(str(truth['sentence']))}</b></p>"
            "<p class='note'>Each version's expected clicks per list under the simulator's click model, "
            "over every panel user (the simulator draws them uniformly), from the version's own bundle "
            "and top-k by exact inner product: what the CTR test estimates, without sampling noise.</p>")


def render_report(out_dir: Path, rollout: Mapping, steps: Sequence[Mapping],
                  series: Mapping | None, truth: Mapping | None = None) -> Path:
    """Write ``rollout_report.html`` (standalone, plot inlined) and ``rollout_metrics.png`` to
    ``out_dir``; return the HTML path. ``series=None`` (no Prometheus) gives the report without
    the plot, saying why (``rollout["plots_missing"]`` when set). ``truth`` (a
    :class:`~dayloop.simulation.truth.TruthVerdict` as dict, or ``{"error": ...}``) adds the
    truth section and ``truth.json``; None (production) adds neither."""
    e = html.escape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = sorted(steps, key=lambda s: s.get("index") if isinstance(s.get("index"), int) else 0)
    canary, control = rollout.get("version"), rollout.get("champion")
    outcome = str(rollout.get("outcome", "unknown"))
    vs = f"champion {_vlabel(control)}" if control is not None else "no champion"
    title = f"Rollout of {_vlabel(canary)} vs {vs}: {outcome.upper()}"

    png_path = out_dir / METRICS_PNG
    origin = _origin(steps, series)
    if series is not None and origin is not None:
        png = _metrics_png(rollout, steps, series, origin)
        atomic_write_bytes(png_path, png)
        plot = (f"<img alt='{e(METRICS_PNG)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                f"<p class='note'>Dashed lines: step starts, coloured by the step's decision (green pass, "
                f"red fail, grey aborted); x = 0 at {e(datetime.fromtimestamp(origin, timezone.utc).isoformat())}. "
                f"Rates over a sliding window: a curve lags its step's start by up to the window.</p>")
    else:
        # A stale PNG from an earlier render of the same folder would contradict the page.
        png_path.unlink(missing_ok=True)
        why = rollout.get("plots_missing") or ("Prometheus was unreachable" if series is None
                                               else "no step start or sample to place them")
        plot = f"<p class='missing'>Plots missing: {e(str(why))}.</p>"

    verdict_css = {"promoted": "pass", "rolled_back": "fail", "failed": "fail"}.get(outcome, "aborted")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
td.msg {{ font-family: monospace; font-size: 0.85em; }}
td.msg ul {{ margin: 0; padding-left: 1.2em; }}
.pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }} .inconclusive {{ color: #9a6700; }}
.aborted, .other {{ color: #57606a; }}
h1.pass {{ color: #1a7f37; }} h1.fail {{ color: #cf222e; }}
.missing {{ color: #cf222e; font-weight: bold; }} .note {{ color: #57606a; font-size: 0.85em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1 class="{verdict_css}">{e(title)}</h1>
<p class="note">generated {e(datetime.now(timezone.utc).isoformat(timespec="seconds"))}</p>
<h2>Summary</h2>
{_summary(rollout, steps)}
{_truth_section(truth)}
<h2>Metrics, canary vs control</h2>
{plot}
<h2>Steps</h2>
{chr(10).join(_step_section(s) for s in steps) or "<p>no step ran</p>"}
</body></html>
"""
    truth_path = out_dir / TRUTH_FILE
    if truth is not None:
        atomic_write_text(truth_path, json.dumps(dict(truth), indent=2, sort_keys=True) + "\n")
    else:
        truth_path.unlink(missing_ok=True)
    path = out_dir / REPORT_FILE
    # Readers (the MLflow upload, a person refreshing the page) never see half a file.
    atomic_write_text(path, doc)
    return path


def rollout_truth(settings, rollout: Mapping, steps: Sequence[Mapping],
                  panel_file: Path | None = None) -> dict | None:
    """The truth beside the rollout's decision (a TruthVerdict as dict), None where there is
    no panel file or no control, ``{"error": ...}`` when it could not be computed."""
    from dayloop.simulation.truth import judge_rollout, panel_path

    try:
        path = Path(panel_file) if panel_file is not None else panel_path(settings)
        if rollout.get("champion") is None or not path.is_file():
            return None
        margin = (rollout.get("plan") or {}).get("thresholds", {})["ctr_margin"]
        verdict = judge_rollout(settings, int(rollout["version"]), int(rollout["champion"]), margin,
                                str(rollout.get("outcome")), failed_checks(steps), panel_file=path)
    except Exception as exc:  # noqa: BLE001 - the truth is extra: it must never cost the report
        log.warning("truth of the rollout of v%s not computed: %s", rollout.get("version"), exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if verdict is None:  # the panel went away in between
        return None
    log.info("truth: %s", verdict.sentence)
    return verdict.as_dict()


def write_and_log_report(settings, prom_url: str | None, rollout: Mapping, steps: Sequence[Mapping],
                         out_dir: Path, panel_file: Path | None = None) -> dict:
    """Fetch the series around the steps, render the report into ``out_dir`` and log that
    folder to the canary version's MLflow run; ``{"html", "artifact_uri", "plots", "truth"}``.
    ``truth`` is None unless simulated users ran (``panel_file``, by default the deployment's
    :func:`~dayloop.simulation.truth.panel_path`)."""
    from dayloop.registry import Registry
    from dayloop.rollout.prom import PrometheusUnavailable

    starts = [t for s in steps if (t := _when(s.get("started_at"))) is not None]
    ends = [t for s in steps if (t := _when(s.get("ended_at"))) is not None]
    versions = [v for v in (rollout.get("champion"), rollout.get("version")) if v is not None]
    series, why = None, None
    if prom_url is None:
        why = "no Prometheus URL was given"
    elif not starts:
        why = "no step started"
    else:
        start = min(starts) - _FETCH_BEFORE
        end = max([*ends, *starts]) + _FETCH_AFTER
        try:
            series = fetch_series(prom_url, versions, start, end)
        except PrometheusUnavailable as exc:
            why = f"Prometheus was unreachable ({exc})"
    if why:
        log.warning("rollout report of v%s without plots: %s", rollout.get("version"), why)
    truth = rollout_truth(settings, rollout, steps, panel_file)
    path = render_report(Path(out_dir), {**rollout, "plots_missing": why} if why else rollout, steps, series,
                         truth)
    uri = Registry(settings).log_artifacts(rollout["version"], Path(out_dir), ARTIFACT_PATH)
    return {"html": str(path), "artifact_uri": uri, "plots": series is not None, "truth": truth}
