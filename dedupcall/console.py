"""Rich tables of the CLI: status, flights, config. Takes ``report`` views; no I/O but
printing. Every value is a ``Text`` with control characters escaped: keys and ids come
from callers, and must never be read as rich markup or reach the terminal as escapes."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from dedupcall.metrics import COUNTERS

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def cell(value: Any) -> Text:
    """``value`` as plain text: no markup, control characters shown as ``\\xNN``."""
    return Text("-" if value is None else str(value).translate(_CONTROL))


def _row(table: Table, *values: Any) -> None:
    table.add_row(*(cell(v) for v in values))


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _titled(title: str, table: Table) -> Group:
    return Group(Text(title.translate(_CONTROL), style="bold"), table)


def config_table(config: dict[str, Any], title: str = "config") -> Group:
    table = Table()
    table.add_column("setting")
    table.add_column("value", justify="right")
    for name, value in config.items():
        _row(table, name, "none" if value is None else value)
    return _titled(title, table)


def items_table(items: list[dict[str, Any]], title: str = "flights", *, wide: bool = True) -> Group:
    """The flights; not ``wide`` (a narrow terminal) leaves out kind and request id."""
    columns = ["state", "key", "kind", "priority", "attempts", "age", "executor", "waiters"]
    if wide:
        columns.append("request id")
    else:
        columns.remove("kind")
    table = Table()
    for name in columns:
        folds = name in ("key", "executor", "request id")
        table.add_column(
            name,
            justify="right" if name in ("priority", "attempts", "waiters") else "left",
            overflow="fold" if folds else "ellipsis",
            no_wrap=not folds,
            min_width=12 if name == "key" else None,
        )
    for item in items:
        values = {
            **item,
            "age": _seconds(item["age"]),
            "request id": item["request_id"],
        }
        _row(table, *(values[name] for name in columns))
    return _titled(f"{title} ({len(items)})", table)


def status_group(view: dict[str, Any], url: str) -> Group:
    """``dedupcall status``: queue counts, instances with their numbers, totals, config."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    _row(head, "namespace", view["namespace"])
    _row(head, "redis", url)
    _row(
        head,
        "queue",
        f"{view['queue_length']} queued, {view['running']} running, {view['delayed']} delayed",
    )
    instances = Table()
    instances.add_column("instance", overflow="fold")
    for name in ("beat", "exec", "join", "cache", "fail", "p50 wait", "p99 wait"):
        instances.add_column(name, justify="right")
    for info in view["instances"]:
        stats = info["stats"]
        _row(
            instances,
            info["id"],
            f"{_seconds(info['last_seen'])} ago",
            *(stats.get(k, 0) for k in ("executed", "joined", "cached", "failed")),
            _ms(info["wait_p50"]),
            _ms(info["wait_p99"]),
        )
    counters = Table.grid(padding=(0, 2))
    for _ in range(4):
        counters.add_column()
        counters.add_column(justify="right")
    cells = [(name, str(view["totals"][name])) for name in COUNTERS]
    for row in range(0, len(cells), 4):
        chunk = [part for cell in cells[row : row + 4] for part in cell]
        _row(counters, *chunk)
    return Group(
        head,
        Text(),
        _titled(f"live instances ({len(view['instances'])})", instances),
        _titled("counters, summed over live instances", counters),
        Text(),
        config_table(view["config"], "shared config"),
    )


def show(console: Console, *parts: Any) -> None:
    for part in parts:
        console.print(part)
