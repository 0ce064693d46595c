"""The upgrades page the plugin serves inside the Airflow UI: plain HTML and an inline SVG lag chart, no script.

Input: one `Upgrade` view per progress record (see the plugin for how they are read); output: one HTML document.
Every value from a record is escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from urllib.parse import quote

UPGRADE_DAG_ID = "pgactive_rolling_upgrade"
ROLLBACK_DAG_ID = "pgactive_upgrade_rollback"
IN_FLIGHT_RUN_STATES = ("queued", "running")
REFRESH_SECONDS = 10
CHART_WIDTH, CHART_HEIGHT, CHART_PAD, CHART_LEFT = 600, 170, 30, 70


@dataclass
class Gate:
    task_id: str
    map_index: int
    subject: str
    options: list[str]
    created_at: str


@dataclass
class Upgrade:
    source: str
    record: dict
    run_state: str | None  # the DAG run's state; None when the run is gone
    gates: list[Gate] = field(default_factory=list)
    halt: dict | None = None

    @property
    def in_flight(self) -> bool:
        return self.run_state in IN_FLIGHT_RUN_STATES


def render(upgrades: list[Upgrade], base_url: str = "") -> str:
    in_flight = [u for u in upgrades if u.in_flight]
    recent = sorted((u for u in upgrades if not u.in_flight), key=lambda u: u.record.get("updated_at") or "",
                    reverse=True)
    sections = [
        _section("In flight", "in-flight", in_flight, base_url, "No upgrade is running."),
        _section("Recent", "recent", recent, base_url, "No finished upgrade is recorded."),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>pgactive upgrades</title>
<style>{_STYLE}</style></head>
<body><h1>PostgreSQL major-version upgrades</h1>
<p class="hint">Refreshes every {REFRESH_SECONDS} s. Lag is measured by the sync sensor and each phase's health check.</p>
{''.join(sections)}
</body></html>"""


def _section(title: str, css: str, upgrades: list[Upgrade], base_url: str, empty: str) -> str:
    cards = "".join(_card(u, base_url) for u in upgrades) or f'<p class="empty">{escape(empty)}</p>'
    return f'<section class="{css}"><h2>{escape(title)} ({len(upgrades)})</h2>{cards}</section>'


def _card(upgrade: Upgrade, base_url: str) -> str:
    record, source = upgrade.record, upgrade.source
    conf = record.get("conf") or {}
    run_id = str(record.get("run_id", ""))
    run_link = f"{base_url}/dags/{UPGRADE_DAG_ID}/runs/{quote(run_id, safe='')}"
    return f"""<article class="upgrade" data-source="{escape(source)}">
<h3>{escape(source)} &rarr; PostgreSQL {escape(str(conf.get('target_engine_version', '?')))}
<span class="state state-{escape(str(upgrade.run_state))}">{escape(str(upgrade.run_state or 'unknown'))}</span></h3>
<dl class="facts">
<dt>Run</dt><dd><a target="_top" href="{escape(run_link)}">{escape(run_id)}</a></dd>
<dt>Step</dt><dd class="step">{escape(str(record.get('step', '')))} ({escape(str(record.get('state', '')))})</dd>
<dt>Phase</dt><dd class="phase">{escape(str(record.get('phase') or '-'))}{_percent(record.get('percent'))}</dd>
<dt>Lag now</dt><dd class="lag-now">{_bytes(record.get('replication_lag_bytes'))}
 <small>{escape(_time(record.get('lag_measured_at')))}</small></dd>
<dt>Cutover write-unavailability</dt><dd class="write-unavailable">{_unavailability(record)}</dd>
<dt>Updated</dt><dd>{escape(_time(record.get('updated_at')))}</dd>
</dl>
{_split(record.get('split'))}
{_chart(record.get('lag_history') or [], conf.get('lag_threshold_bytes'))}
{_verify(record.get('verify_progress'))}
{_gates(upgrade, base_url)}
{_halt(upgrade)}
{_rollback(upgrade, base_url)}
</article>"""


def _split(split: dict | None) -> str:
    if not split:
        return '<p class="split empty">No traffic moved yet.</p>'
    rows = "".join(
        f'<tr data-route="{escape(str(route))}"><td>{escape(str(route))}</td>'
        f'<td class="bar"><span style="width:{_clamp(value)}%"></span></td><td class="to-target">{_clamp(value)} %</td></tr>'
        for route, value in sorted(split.items()))
    return f'<table class="split"><caption>Traffic to the new instance, per route</caption>{rows}</table>'


def _chart(history: list[dict], threshold: int | None) -> str:
    points: list[tuple[datetime, int]] = [(at, b) for p in history
                                          if (at := _parse(p.get("at"))) and (b := p.get("bytes")) is not None]
    if not points:
        return '<p class="lag-chart empty">No lag measured yet.</p>'
    first, last = points[0][0], points[-1][0]
    span = max((last - first).total_seconds(), 1.0)
    top = max(max(b for _, b in points), threshold or 0, 1)
    width, height = CHART_WIDTH - CHART_LEFT - CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD

    def x(at: datetime) -> float:
        return round(CHART_LEFT + (at - first).total_seconds() / span * width, 1)

    def y(value: float) -> float:
        return round(CHART_PAD + height - value / top * height, 1)

    line = " ".join(f"{x(at)},{y(b)}" for at, b in points)
    dots = "".join(f'<circle cx="{x(at)}" cy="{y(b)}" r="2"><title>{escape(at.isoformat())}: {b} bytes</title></circle>'
                   for at, b in points)
    right = CHART_LEFT + width
    limit = (f'<line class="threshold" x1="{CHART_LEFT}" x2="{right}" y1="{y(threshold)}" y2="{y(threshold)}"/>'
             f'<text x="{right}" y="{y(threshold) - 4}" text-anchor="end">threshold {_bytes(threshold)}</text>'
             if threshold else "")
    return f"""<figure class="lag"><figcaption>Replication lag over time ({len(points)} measurements)</figcaption>
<svg class="lag-chart" data-points="{len(points)}" data-max-bytes="{max(b for _, b in points)}"
 width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img"
 aria-label="replication lag in bytes over time">
<line class="axis" x1="{CHART_LEFT}" y1="{CHART_PAD + height}" x2="{right}" y2="{CHART_PAD + height}"/>
<line class="axis" x1="{CHART_LEFT}" y1="{CHART_PAD}" x2="{CHART_LEFT}" y2="{CHART_PAD + height}"/>
<text x="{CHART_LEFT - 4}" y="{CHART_PAD + 4}" text-anchor="end">{_bytes(top)}</text>
<text x="{CHART_LEFT - 4}" y="{CHART_PAD + height}" text-anchor="end">0 B</text>
<text x="{CHART_LEFT}" y="{CHART_HEIGHT - 8}">{escape(first.strftime('%H:%M:%S'))}</text>
<text x="{right}" y="{CHART_HEIGHT - 8}" text-anchor="end">{escape(last.strftime('%H:%M:%S'))} UTC</text>
{limit}<polyline class="lag-line" points="{line}"/>{dots}</svg></figure>"""


def _verify(figures: dict | None) -> str:
    if not figures:
        return ""
    return (f'<p class="verify">Verification ({escape(str(figures.get("task", "")))}): '
            f'{escape(str(figures.get("chunks_done", "?")))}/{escape(str(figures.get("chunks", "?")))} chunks, '
            f'{escape(str(figures.get("rows", "?")))} rows, {escape(str(figures.get("rows_per_second", "?")))} rows/s</p>')


def _gates(upgrade: Upgrade, base_url: str) -> str:
    if not upgrade.gates:
        return '<p class="gates empty">No gate is waiting for an answer.</p>'
    run_id = quote(str(upgrade.record.get("run_id", "")), safe="")
    items = "".join(
        f'<li class="gate"><a target="_top" href="{escape(_ti_link(base_url, run_id, g))}">{escape(g.subject)}</a> '
        f'<small>{escape(g.task_id)} since {escape(_time(g.created_at))}; options: {escape(", ".join(g.options))}</small></li>'
        for g in upgrade.gates)
    return f'<div class="gates"><h4>Waiting for an answer</h4><ul>{items}</ul></div>'


def _ti_link(base_url: str, run_id: str, gate: Gate) -> str:
    link = f"{base_url}/dags/{UPGRADE_DAG_ID}/runs/{run_id}/tasks/{quote(gate.task_id, safe='')}"
    return f"{link}/mapped/{gate.map_index}" if gate.map_index >= 0 else link


def _halt(upgrade: Upgrade) -> str:
    rollback = upgrade.record.get("rollback") or upgrade.halt
    if not rollback:
        return ""
    return (f'<p class="halted">Rolled back: requested by {escape(str(rollback.get("requested_by")))} at '
            f'{escape(_time(rollback.get("at")))}: {escape(str(rollback.get("reason")))}</p>')


def _rollback(upgrade: Upgrade, base_url: str) -> str:
    if upgrade.record.get("detached"):
        return '<p class="rollback">The old instance is detached: a rollback is no longer possible.</p>'
    conf = json.dumps({"source_instance": upgrade.source, "reason": "", "requested_by": ""})
    return (f'<p class="rollback"><a class="rollback-link" target="_top" href="{escape(base_url)}/dags/{ROLLBACK_DAG_ID}">'
            f'Trigger a rollback</a> (press <em>Trigger</em> on {ROLLBACK_DAG_ID}; conf '
            f'<code>{escape(conf)}</code>, the reason is required)</p>')


def _unavailability(record: dict) -> str:
    value = record.get("write_unavailable_ms")
    if value is not None:
        return f"{escape(str(value))} ms"
    return "cut over (not measured)" if record.get("cut_over") else "not cut over yet"


def _percent(value) -> str:
    return f" ({escape(str(value))} %)" if value is not None else ""


def _clamp(value) -> int:
    try:
        return max(0, min(100, int(value)))
    except (TypeError, ValueError):
        return 0


def _bytes(value) -> str:
    if value is None:
        return "unknown"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _parse(text) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _time(text) -> str:
    parsed = _parse(text) if text else None
    return parsed.strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else "-"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1a202c}
h1{font-size:1.3em}h2{font-size:1.1em;border-bottom:1px solid #cbd5e0}h3{font-size:1em;margin:0 0 8px}
.hint,.empty,small{color:#4a5568}
.upgrade{border:1px solid #cbd5e0;border-radius:6px;padding:12px;margin:0 0 16px}
.facts{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0 0 8px}.facts dt{font-weight:600}
.facts dd{margin:0}
.state{font-size:.8em;padding:1px 6px;border-radius:4px;background:#e2e8f0}
.state-running{background:#bee3f8}.state-success{background:#c6f6d5}.state-failed{background:#fed7d7}
table.split{border-collapse:collapse;margin:4px 0}table.split td{padding:2px 8px}
td.bar{width:200px}td.bar span{display:block;height:10px;background:#3182ce}
svg.lag-chart{background:#f7fafc;border:1px solid #e2e8f0}svg text{font-size:10px;fill:#4a5568}
.axis{stroke:#a0aec0}.threshold{stroke:#e53e3e;stroke-dasharray:4 3}
.lag-line{fill:none;stroke:#3182ce;stroke-width:2}circle{fill:#2b6cb0}
.halted{color:#c53030}.gate a,.rollback-link{font-weight:600}
"""
