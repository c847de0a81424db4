"""The dashboard's small charts: series over the last hour, drawn as inline SVG on
the server (no script, nothing fetched). Pure functions; time is passed in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

BUCKETS = 60  # one a minute over the last hour
WINDOW = 3600.0


@dataclass(frozen=True)
class Series:
    label: str
    css: str  # class of its line (colour)
    values: list[float]


def _spread(values: list[float], start: float, end: float, origin: float, step: float) -> None:
    """Add the part of [start, end) inside each bucket, in bucket lengths."""
    if end <= start:
        return
    first = max(0, int((start - origin) // step))
    last = min(len(values) - 1, int((end - origin) // step))
    for i in range(first, last + 1):
        lo = origin + i * step
        overlap = min(end, lo + step) - max(start, lo)
        if overlap > 0:
            values[i] += overlap / step


def origin(now: float) -> float:
    """Start of the first bucket: buckets fall on whole minutes, the last one is the
    minute under way."""
    step = WINDOW / BUCKETS
    return (now // step + 1) * step - WINDOW


def job_series(
    times: Iterable[tuple[float, float | None, float | None]], now: float
) -> tuple[Series, Series, Series]:
    """Mean number of jobs queued and running in each minute (a job that ran for 15 s
    of a minute counts a quarter; the minute under way counts its elapsed part), and
    jobs finished in it, from (created_at, started_at, finished_at) of each job."""
    first = origin(now)
    step = WINDOW / BUCKETS
    queued = [0.0] * BUCKETS
    running = [0.0] * BUCKETS
    done = [0.0] * BUCKETS
    for created, started, finished in times:
        end = min(finished if finished is not None else now, now)
        _spread(queued, created, min(started if started is not None else end, end), first, step)
        if started is not None:
            _spread(running, started, end, first, step)
        if finished is not None and first <= finished < now:
            done[int((finished - first) // step)] += 1
    elapsed = (now - (first + (BUCKETS - 1) * step)) / step
    if elapsed > 0:
        queued[-1] /= elapsed
        running[-1] /= elapsed
    return (
        Series("queued", "s-queued", queued),
        Series("running", "s-running", running),
        Series("finished / min", "s-done", done),
    )


def latency_series(minutes: Iterable[tuple[float, float, int]], now: float) -> Series:
    """Mean heartbeat handling time per minute, in milliseconds, from (start of the
    minute, sum of seconds, count)."""
    first = origin(now)
    step = WINDOW / BUCKETS
    total = [0.0] * BUCKETS
    count = [0] * BUCKETS
    for ts, seconds, n in minutes:
        i = int((ts - first) // step)
        if 0 <= i < BUCKETS:
            total[i] += seconds * 1000
            count[i] += n
    return Series(
        "heartbeat ms (mean)",
        "s-latency",
        [t / c if c else 0.0 for t, c in zip(total, count, strict=True)],
    )


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def svg(title: str, series: Sequence[Series], width: int = 320, height: int = 90) -> Markup:
    """A line chart of equally long series sharing one y axis from 0 to their max."""
    top = max((max(s.values, default=0.0) for s in series), default=0.0) or 1.0
    pad = 14
    inner_h = height - 2 * pad
    n = max((len(s.values) for s in series), default=1)
    dx = width / max(n - 1, 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        f' role="img" aria-label="{escape(title)}">',
        f'<text x="2" y="10" class="t">{escape(title)}</text>',
        f'<text x="{width - 2}" y="10" class="t" text-anchor="end">max {_fmt(top)}</text>',
        f'<line x1="0" y1="{height - pad}" x2="{width}" y2="{height - pad}" class="axis"/>',
    ]
    for s in series:
        points = " ".join(
            f"{i * dx:.1f},{height - pad - (v / top) * inner_h:.1f}" for i, v in enumerate(s.values)
        )
        last = s.values[-1] if s.values else 0.0
        parts.append(
            f'<polyline class="{escape(s.css)}" points="{points}" fill="none">'
            f"<title>{escape(s.label)}: now {_fmt(last)}</title></polyline>"
        )
    legend_x = 2
    for s in series:
        label = f"{s.label} {_fmt(s.values[-1] if s.values else 0.0)}"
        css = f"t {escape(s.css)}-l"
        parts.append(f'<text x="{legend_x}" y="{height - 2}" class="{css}">{escape(label)}</text>')
        legend_x += 8 + 6 * len(label)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - numbers and escaped labels only
