"""What the registry says now: versions, aliases, gate decisions and index links.

``python -m dayloop.status`` prints it; the demo prints it at the end.
"""

from __future__ import annotations

from dayloop.config import Settings, load_settings

_METRICS = ("recall_at_10", "ndcg_at_10", "recall_at_100")


def _fmt(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.4f}"
    except ValueError:
        return value


def version_rows(settings: Settings) -> list[dict[str, str]]:
    """One dict per registered version, oldest first."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, TAG_GATE_DECISION, TAG_LOGICAL_DATE, Registry

    reg = Registry(settings)
    aliases = {}
    for alias in (CHAMPION, PREVIOUS, CHALLENGER):
        mv = reg.alias_version(alias)
        if mv is not None:
            aliases.setdefault(str(mv.version), []).append(alias)
    rows = []
    for mv in sorted(reg.client.search_model_versions(f"name = '{reg.name}'"), key=lambda v: int(v.version)):
        tags = dict(mv.tags)
        rows.append({
            "version": str(mv.version),
            "logical_date": tags.get(TAG_LOGICAL_DATE, "-"),
            "aliases": ",".join(aliases.get(str(mv.version), [])) or "-",
            "gate": tags.get(TAG_GATE_DECISION, "-"),
            "vs": tags.get("gate.offline.champion_version", "-"),
            **{m.replace("_at_", "@"): _fmt(tags.get(f"gate.offline.{m}")) for m in _METRICS},
            "champion ndcg@10": _fmt(tags.get("gate.offline.champion.ndcg_at_10")),
            "popularity ndcg@10": _fmt(tags.get("gate.offline.popularity.ndcg_at_10")),
            "psi": _fmt(tags.get("gate.offline.psi")),
            "index": f"{tags.get('dayloop.index.kind', '-')} r@100={_fmt(tags.get('dayloop.index.recall_at_100'))}",
            "rollout": tags.get("dayloop.rollout.status", "-"),
        })
    return rows


def reasons(settings: Settings, version: int) -> list[str]:
    """The offline gate's reasons recorded on a version, in order."""
    from dayloop.registry import Registry

    tags = Registry(settings).version_tags(version)
    keyed = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tags.items()
                   if k.startswith("gate.offline.reason.") and k.rsplit(".", 1)[1].isdigit())
    return [v for _, v in keyed]


def render(settings: Settings) -> str:
    rows = version_rows(settings)
    if not rows:
        return f"model {settings.model_name}: no versions registered yet"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = [f"model {settings.model_name}:",
             "  " + "  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  " + "  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    for r in rows:
        why = reasons(settings, int(r["version"]))
        if why:
            lines.append(f"  version {r['version']} gate reasons:")
            lines += [f"    - {w}" for w in why]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(load_settings()))
