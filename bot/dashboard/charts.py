"""The dashboard's charts, drawn on the server as SVG: no script, no build step.

Pure: rows in, SVG text out. Each series differs by a fill pattern or a line style and
marker as well as by colour, and is named in a legend, so nothing is told by colour
alone; each chart also comes with its numbers as a table (the page shows it below).
"""

from __future__ import annotations

import html
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bot.dashboard.views import duration, percentile
from bot.store import FinishedRow

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 16, 40
DAY = 86400.0
#: series colours (CSS classes s0..s7 in dashboard.css, light and dark)
SERIES = 8
#: each outcome's pattern and colour, the same on every day (green for success, red for
#: an agent's failure, grey for no changes ...)
OUTCOME_STYLES = {
    "succeeded": 0,
    "no_changes": 7,
    "agent_failed": 2,
    "timed_out": 3,
    "infra_error": 4,
    "cancelled": 6,
    "rejected": 5,
}
#: per-repository and per-agent charts show this many, and the rest as "other"
TOP_N = 6


@dataclass(frozen=True)
class Chart:
    """One chart: its SVG and the same numbers as rows of a table."""

    title: str
    svg: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def days_between(since: float, now: float) -> list[str]:
    first, last = int(since // DAY), int(now // DAY)
    return [time.strftime("%Y-%m-%d", time.gmtime(d * DAY)) for d in range(first, last + 1)]


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _nice(top: float, whole: bool) -> float:
    """The top of the axis: four equal steps of a round size (1, 2, 2.5 or 5 times a
    power of ten; whole numbers only for counts) that reach `top`."""
    if top <= 0 or (whole and top <= 4):
        return 4.0 if whole else 1.0
    power = 10.0 ** math.floor(math.log10(top / 4))
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * power
        if whole and (step < 1 or step != int(step)):
            continue
        if step * 4 >= top:
            return step * 4
    return top


def _fmt(value: float, unit: str) -> str:
    if unit == "$":
        return f"${value:,.2f}"
    if unit == "s":
        # exact, as an axis step needs: 2.5s, 1m20s (never 1.3m, nor 2.5 shown as 2)
        if value < 60 and value != round(value):
            return f"{value:.1f}s"
        return duration(value)
    return f"{value:,.0f}"


def _frame(title: str, desc: str, top: float, unit: str, days: Sequence[str], body: str) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
        f"<desc>{html.escape(desc)}</desc>",
        _defs(),
    ]
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{html.escape(_fmt(value, unit))}</text>"
        )
    every = max(1, len(days) // 8)
    for i, day in enumerate(days):
        if i % every == 0:
            x = LEFT + plot_w * (i + 0.5) / max(1, len(days))
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{day[5:]}</text>'
            )
    parts.append(body)
    parts.append("</svg>")
    return "".join(parts)


def _defs() -> str:
    """Fill patterns, one per series, so stacked bars differ by more than colour."""
    shapes = (
        "",
        '<path d="M0,6 L6,0" class="ink"/>',
        '<circle cx="3" cy="3" r="1.2" class="dot"/>',
        '<path d="M0,0 L6,6 M0,6 L6,0" class="ink"/>',
        '<path d="M0,3 L6,3" class="ink"/>',
        '<path d="M3,0 L3,6" class="ink"/>',
        '<path d="M0,0 L6,6" class="ink"/>',
        '<rect x="2" y="2" width="2" height="2" class="dot"/>',
    )
    patterns = "".join(
        f'<pattern id="p{i}" width="6" height="6" patternUnits="userSpaceOnUse">'
        f'<rect width="6" height="6" class="s{i}"/>{shape}</pattern>'
        for i, shape in enumerate(shapes)
    )
    return f"<defs>{patterns}</defs>"


def _nothing() -> str:
    x, y = (LEFT + WIDTH - RIGHT) / 2, TOP + (HEIGHT - TOP - BOTTOM) / 2
    return (
        f'<text class="legend" x="{x}" y="{y}" text-anchor="middle">nothing in this period</text>'
    )


def _legend(
    names: Sequence[str], *, lines: bool = False, styles: Sequence[int] | None = None
) -> str:
    items, x = [], LEFT
    for n, name in enumerate(names):
        i = styles[n] if styles is not None else n
        mark = (
            f'<line x1="{x}" x2="{x + 18}" y1="{HEIGHT - 10}" y2="{HEIGHT - 10}" '
            f'class="line l{i % SERIES}"/>{_marker(i, x + 9, HEIGHT - 10)}'
            if lines
            else f'<rect x="{x}" y="{HEIGHT - 16}" width="12" height="12" '
            f'fill="url(#p{i % SERIES})" class="edge"/>'
        )
        items.append(
            f'{mark}<text class="legend" x="{x + (22 if lines else 16)}" '
            f'y="{HEIGHT - 6}">{html.escape(name)}</text>'
        )
        x += (22 if lines else 16) + 7 * len(name) + 14
    return "".join(items)


def _marker(i: int, x: float, y: float) -> str:
    kind = i % 3
    if kind == 0:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" class="mark m{i % SERIES}"/>'
    if kind == 1:
        return (
            f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" '
            f'class="mark m{i % SERIES}"/>'
        )
    return (
        f'<path d="M{x:.1f},{y - 4:.1f} L{x + 4:.1f},{y + 3:.1f} L{x - 4:.1f},{y + 3:.1f} Z" '
        f'class="mark m{i % SERIES}"/>'
    )


def stacked_bars(
    title: str,
    days: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    unit: str = "",
    styles: Sequence[int] | None = None,
) -> Chart:
    """Bars per day, the series stacked; `styles` picks each series' pattern and colour
    (by default its place)."""
    styles = list(styles) if styles is not None else list(range(len(series)))
    totals = [sum(values[i] for _, values in series) for i in range(len(days))]
    top = _nice(max(totals, default=0), whole=unit == "")
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    bar = max(1.0, slot * 0.7)
    body = []
    for i, day in enumerate(days):
        y: float = TOP + plot_h
        x = LEFT + slot * i + (slot - bar) / 2
        for s, (name, values) in enumerate(series):
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top
            y -= h
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="url(#p{styles[s] % SERIES})" class="edge"><title>{html.escape(day)} '
                f"{html.escape(name)}: {html.escape(_fmt(value, unit))}</title></rect>"
            )
    body.append(_legend([name for name, _ in series], styles=styles))
    if not any(totals):
        body.append(_nothing())
    desc = f"{title}, per day from {days[0]} to {days[-1]}" if days else title
    rows = tuple(
        (day, *(_fmt(values[i], unit) for _, values in series), _fmt(totals[i], unit))
        for i, day in enumerate(days)
        if totals[i]
    )
    return Chart(
        title,
        _frame(title, desc, top, unit, days, "".join(body)),
        ("day", *(name for name, _ in series), "total"),
        rows,
    )


def lines(
    title: str,
    days: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    unit: str = "",
) -> Chart:
    top = _nice(
        max((v for _, values in series for v in values if v is not None), default=0), whole=False
    )
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    body = []
    for s, (name, values) in enumerate(series):
        points = [
            (LEFT + slot * (i + 0.5), TOP + plot_h - plot_h * v / top, days[i], v)
            for i, v in enumerate(values)
            if v is not None
        ]
        if not points:
            continue
        path = " ".join(
            f"{'M' if j == 0 else 'L'}{x:.1f},{y:.1f}" for j, (x, y, _, _) in enumerate(points)
        )
        body.append(f'<path d="{path}" class="line l{s % SERIES}" fill="none"/>')
        for x, y, day, v in points:
            body.append(
                f"<g>{_marker(s, x, y)}<title>{html.escape(day)} {html.escape(name)}: "
                f"{html.escape(_fmt(v, unit))}</title></g>"
            )
    body.append(_legend([name for name, _ in series], lines=True))
    if not any(v is not None for _, values in series for v in values):
        body.append(_nothing())
    desc = f"{title}, per day from {days[0]} to {days[-1]}" if days else title
    rows = tuple(
        (day, *("" if values[i] is None else _fmt(values[i] or 0.0, unit) for _, values in series))
        for i, day in enumerate(days)
        if any(values[i] is not None for _, values in series)
    )
    return Chart(
        title,
        _frame(title, desc, top, unit, days, "".join(body)),
        ("day", *(name for name, _ in series)),
        rows,
    )


def outcomes_per_day(rows: Iterable[FinishedRow], days: Sequence[str]) -> Chart:
    index = {day: i for i, day in enumerate(days)}
    counts: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    for row in rows:
        i = index.get(_day(row.finished_at))
        if i is not None:
            name = row.outcome or row.state
            counts[name][i] += 1
    names = [n for n in OUTCOME_STYLES if n in counts] + sorted(
        n for n in counts if n not in OUTCOME_STYLES
    )
    return stacked_bars(
        "Tasks finished per day, by outcome",
        days,
        [(n, counts[n]) for n in names],
        styles=[OUTCOME_STYLES.get(n, 7) for n in names],
    )


def times_per_day(rows: Iterable[FinishedRow], days: Sequence[str]) -> Chart:
    """Queue wait (queued to the start of the last attempt) and run time (that attempt)."""
    index = {day: i for i, day in enumerate(days)}
    waits: list[list[float]] = [[] for _ in days]
    runs: list[list[float]] = [[] for _ in days]
    for row in rows:
        i = index.get(_day(row.finished_at))
        if i is None or row.started_at is None:
            continue
        waits[i].append(max(0.0, row.started_at - row.created_at))
        runs[i].append(max(0.0, row.finished_at - row.started_at))
    series = [
        ("wait p50", [percentile(v, 50) for v in waits]),
        ("wait p95", [percentile(v, 95) for v in waits]),
        ("run p50", [percentile(v, 50) for v in runs]),
        ("run p95", [percentile(v, 95) for v in runs]),
    ]
    return lines("Queue wait and run time per day (p50, p95)", days, series, unit="s")


def cost_per_day(rows: Iterable[FinishedRow], days: Sequence[str], by: str) -> Chart:
    """Cost per day per agent (`by` "agent") or per repository ("repo")."""
    index = {day: i for i, day in enumerate(days)}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    for row in rows:
        i = index.get(_day(row.finished_at))
        if i is not None and row.cost_usd:
            sums[getattr(row, by)][i] += float(row.cost_usd)
    ranked = sorted(sums, key=lambda k: -sum(sums[k]))
    series = [(k, sums[k]) for k in ranked[:TOP_N]]
    if len(ranked) > TOP_N:
        other = [sum(sums[k][i] for k in ranked[TOP_N:]) for i in range(len(days))]
        series.append(("other", other))
    what = "agent" if by == "agent" else "repository"
    return stacked_bars(f"Cost per day per {what}", days, series, unit="$")
