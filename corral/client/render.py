"""Tables for people (Rich) and JSON for scripts."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterable, Sequence

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

STATE_STYLE = {
    "succeeded": "green",
    "running": "green",
    "failed": "red",
    "cancelled": "yellow",
    "queued": "cyan",
    "locked": "cyan",
    "draining": "yellow",
    "retired": "dim",
    "terminated": "dim",
    "pending": "cyan",
    "warning": "yellow",
    "error": "red",
    "info": "",
    "debug": "dim",
}


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    delta = time.time() - ts
    if delta < 0:
        delta = 0
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    if delta < 86400:
        return f"{delta / 3600:.1f}h ago"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def styled(value: str) -> str:
    style = STATE_STYLE.get(value, "")
    return f"[{style}]{value}[/{style}]" if style else value


def print_json(data) -> None:
    def plain(x):
        if isinstance(x, BaseModel):
            return x.model_dump(mode="json")
        if isinstance(x, list):
            return [plain(i) for i in x]
        return x

    sys.stdout.write(json.dumps(plain(data), indent=2) + "\n")


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    empty: str = "nothing to show",
) -> None:
    rows = list(rows)
    if not rows:
        console.print(f"[dim]{empty}[/dim]")
        return
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["-" if v is None else str(v) for v in r])
    console.print(t)
