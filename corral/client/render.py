"""What the CLI prints: tables for people, tab-separated text for pipes, JSON/YAML for
scripts.

Every piece of user or job text goes through `clean()` (control characters and terminal
escape sequences become visible `\\x1b`-style escapes) and is printed as a Rich `Text`,
never as markup, so `[/foo]` or `x[i]` in a job's command is shown as written.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.text import Text

    console: Console
    err_console: Console


def __getattr__(name: str) -> Any:
    """`console` and `err_console` are made on first use: Rich is not imported for
    `corral --help`."""
    if name in ("console", "err_console"):
        from rich.console import Console

        made = Console(stderr=name == "err_console", highlight=False)
        globals()[name] = made
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(err: bool = False) -> Console:
    return __getattr__("err_console" if err else "console")


def _text_class() -> type[Text]:
    from rich.text import Text

    return Text


FORMATS = ("table", "wide", "json", "yaml")

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

# C0 and C1 control characters, DEL, and the invisible bidirectional-text controls
# (a command could otherwise hide or reorder what the operator reads)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(value: object, *, newlines: bool = False) -> str:
    """`value` as text that is safe to put on a terminal: every control character
    (escape, bell, backspace, carriage return, tab; newline unless `newlines`) is shown
    as a visible escape instead of acting on the terminal."""
    text = "-" if value is None else str(value)
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(_escape_char, text)


def styled(state: object) -> Text:
    value = clean(getattr(state, "value", state))
    return _text_class()(value, style=STATE_STYLE.get(value, ""))


def text(*parts: str | Text | tuple[object, str]) -> Text:
    """A line from pieces: a `str` is our own fixed wording (printed as is, no markup),
    a `(value, style)` pair is user data (cleaned), a `Text` is already safe."""
    Text = _text_class()
    out = Text()
    for p in parts:
        if isinstance(p, Text):
            out.append_text(p)
        elif isinstance(p, tuple):
            out.append(clean(p[0], newlines=True), style=p[1])
        else:
            out.append(p)
    return out


def say(*parts: str | Text | tuple[object, str], err: bool = False) -> None:
    """Print one line built by `text()`."""
    _console(err).print(text(*parts), soft_wrap=True)


def ago(ts: dt.datetime | float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, dt.datetime):
        ts = ts.timestamp()
    delta = max(0.0, (time.time() if now is None else now) - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    if delta < 86400:
        return f"{delta / 3600:.1f}h ago"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _plain(x: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    if isinstance(x, list | tuple):
        return [_plain(i) for i in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_plain(data), indent=2) + "\n")
    sys.stdout.flush()


def print_yaml(data: Any) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=False))
    sys.stdout.flush()


def print_data(data: Any, fmt: str) -> bool:
    """Print `data` as JSON or YAML if that is the format asked for; False otherwise."""
    if fmt == "json":
        print_json(data)
        return True
    if fmt == "yaml":
        print_yaml(data)
        return True
    return False


def output_format(output: str | None, as_json: bool = False) -> str:
    """The format from `-o` (or the `--json` alias); an unknown one is a usage error."""
    if as_json:
        return "json"
    fmt = (output or "table").lower()
    if fmt not in FORMATS:
        import typer

        raise typer.BadParameter(
            f"{output!r} is not an output format; choose one of {', '.join(FORMATS)}",
            param_hint="'-o' / '--output'",
        )
    return fmt


def is_terminal() -> bool:
    return _console().is_terminal


# -- tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    """A table column. `keep`: the higher, the later it is dropped when the terminal is
    narrow (ids keep the most). `shrink`: the minimum width this column may be cut to
    (with …); 0 means it is never cut (ids, states, numbers). `wide`: only in -o wide."""

    name: str
    keep: int = 50
    shrink: int = 0
    wide: bool = False


Cell = Any  # str | Text | tuple[object, str] | None | int | float


def _cell(v: Cell) -> Text:
    Text = _text_class()
    if isinstance(v, Text):
        return v
    if isinstance(v, tuple):
        return Text(clean(v[0]), style=v[1])
    return Text(clean(v))


def fit(cols: Sequence[Col], rows: Sequence[Sequence[Text]], width: int) -> dict[int, int]:
    """Which columns to show at `width` and how wide: {column index: width}. Columns
    are dropped least important first until what is left fits, cutting only the
    columns that may shrink, down to their minimum; a column that may not shrink (an
    id) is shown whole or not at all. The first column is always kept."""
    natural = {i: max([len(c.name)] + [r[i].cell_len for r in rows]) for i, c in enumerate(cols)}
    floor = {
        i: min(natural[i], max(c.shrink, len(c.name))) if c.shrink else natural[i]
        for i, c in enumerate(cols)
    }
    shown = list(range(len(cols)))
    while True:
        gaps = 2 * (len(shown) - 1)
        total = sum(natural[i] for i in shown) + gaps
        least = sum(floor[i] for i in shown) + gaps
        if least <= width or len(shown) == 1:
            break
        drop = min(shown[1:], key=lambda i: (cols[i].keep, -i))
        shown.remove(drop)
    widths = {i: natural[i] for i in shown}
    excess = total - width
    # cut the widest shrinkable column first, one character at a time
    while excess > 0:
        cands = [i for i in shown if widths[i] > floor[i]]
        if not cands:
            break
        i = max(cands, key=lambda i: widths[i])
        widths[i] -= 1
        excess -= 1
    return widths


def table(
    title: str | None,
    columns: Sequence[str | Col],
    rows: Iterable[Sequence[Cell]],
    empty: str = "nothing to show",
    fmt: str = "table",
) -> None:
    """Print rows: a table fitted to the terminal, all columns uncut with -o wide, or
    tab-separated lines (with a header line) when stdout is not a terminal."""
    emit(render_table(title, columns, rows, empty, fmt))


class Plain(str):
    """Lines for a pipe: written as they are (Rich would expand the tabs)."""


def emit(view: Any) -> None:
    """Print what render_table() (or any Rich renderable) made."""
    if isinstance(view, Plain):
        sys.stdout.write(view)
        sys.stdout.flush()
    elif view is not None:
        _console().print(view, soft_wrap=True)


def render_table(
    title: str | None,
    columns: Sequence[str | Col],
    rows: Iterable[Sequence[Cell]],
    empty: str = "nothing to show",
    fmt: str = "table",
) -> Any:
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    keep = [i for i, c in enumerate(cols) if fmt == "wide" or not c.wide]
    cols = [cols[i] for i in keep]
    cells = [[_cell(r[i]) for i in keep] for r in rows]
    if not is_terminal():  # for scripts: a header line, then one line per row
        lines = ["\t".join(c.name for c in cols)]
        lines += ["\t".join(c.plain for c in r) for r in cells]
        return Plain("\n".join(lines) + "\n")
    if not cells:
        return _text_class()(empty, style="dim")
    if fmt == "wide":
        widths = {
            i: max([len(cols[i].name)] + [r[i].cell_len for r in cells]) for i in range(len(cols))
        }
    else:
        widths = fit(cols, cells, _console().width)
    from rich.table import Table

    t = Table(
        title=title,
        box=None,
        padding=(0, 1),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        title_justify="left",
        title_style="bold",
    )
    for i, w in widths.items():
        t.add_column(cols[i].name, width=w, no_wrap=True, overflow="ellipsis")
    for r in cells:
        t.add_row(*[r[i] for i in widths])
    if fmt == "wide":
        # as wide as the rows are: the terminal wraps long lines, nothing is cut
        t.width = sum(widths.values()) + 2 * (len(widths) - 1)
    return t


def watch(draw: Callable[[], Any], interval: float, count: int) -> None:
    """Redraw what `draw()` returns every `interval` seconds until Ctrl-C (or `count`
    times when count > 0). On a terminal the screen is redrawn in place; in a pipe
    each round is printed after the previous one."""
    n = 0
    try:
        while True:
            view = draw()
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if is_terminal():
                _console().clear()
                _console().print(
                    _text_class()(f"every {interval:g}s   {stamp}   Ctrl-C stops", style="dim")
                )
            elif n:
                emit(Plain("\n"))
            emit(view)
            n += 1
            if count and n >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def human_size(n: float) -> str:
    """Bytes for people, in binary units (as `--memory 2G` and `--workdir-limit 100M`
    are read), the same units as the transfer bar's."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def transfer_bar(description: str, total: int | None) -> tuple[Progress, TaskID]:
    """A progress bar for bytes on their way (on stderr, gone when done)."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        transient=True,
        console=_console(err=True),
    )
    return bar, bar.add_task(escape(description), total=total)
