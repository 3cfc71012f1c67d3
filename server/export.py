"""Exports for analytics: the log and the projections as JSON lines or CSV, streamed.

Each export reads one consistent snapshot through a server-side cursor in bounded batches, so
memory stays flat whatever the size. `after` makes exports incremental: events with `seq > after`,
projection rows changed by an event after it (`last_seq > after`). Rows come in that order, so
the last row's `seq`/`last_seq` is the cursor for the next run. Schemas: docs/analytics.md.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TextIO

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import format_time
from ledger.schema import events
from projections import histogram, trigger_executions, trigger_stats
from server.stats import latency_fields

FORMATS = ("jsonl", "csv")
BATCH = 1000

Progress = Callable[[int, int, int], None]  # (rows written, rows to write, rows written)
Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Export:
    """One exportable table: its columns in order, and how a row becomes a record."""

    name: str
    cursor_column: str  # seq for the log, last_seq for projections
    columns: tuple[str, ...]
    json_columns: tuple[str, ...]  # JSON text: nested in JSON lines, kept as text in CSV
    table_for: Callable[[str | None], sa.Table]
    derive: Callable[[Record], Record] | None = None


def _events_table(name: str | None) -> sa.Table:
    if name not in (None, "events"):
        raise ValueError("the log is exported from its own table only")
    return events


def _projection_table(module: Any) -> Callable[[str | None], sa.Table]:
    def table_for(name: str | None) -> sa.Table:
        table: sa.Table = module.table if name is None else module.shadow_table(name)
        return table

    return table_for


def _with_percentiles(record: Record) -> Record:
    merged = histogram.loads(record["latency_histogram"])
    return record | latency_fields(merged)


EXPORTS: dict[str, Export] = {
    export.name: export
    for export in (
        Export(
            "events",
            "seq",
            tuple(str(c.name) for c in events.c),
            ("data", "meta"),
            _events_table,
        ),
        Export(
            trigger_executions.NAME,
            "last_seq",
            tuple(str(c.name) for c in trigger_executions.table.c if c.name != "version"),
            (),
            _projection_table(trigger_executions),
        ),
        Export(
            trigger_stats.NAME,
            "last_seq",
            (
                "trigger_id",
                "day",
                *trigger_stats.COUNTERS,
                "latency_count",
                "latency_sum_ms",
                "latency_p50_ms",
                "latency_p95_ms",
                "latency_p99_ms",
                "latency_histogram",
                "last_seq",
            ),
            ("latency_histogram",),
            _projection_table(trigger_stats),
            _with_percentiles,
        ),
    )
}


def _scalar(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


class _Writer:
    """Formats records as JSON lines or CSV onto a text stream."""

    def __init__(self, spec: Export, fmt: str, out: TextIO) -> None:
        self._spec = spec
        self._fmt = fmt
        self._out = out

    def header(self) -> None:
        if self._fmt == "csv":
            self._write_csv([list(self._spec.columns)])

    def rows(self, records: list[Record]) -> None:
        if self._fmt == "csv":
            self._write_csv([[_scalar(r[c]) for c in self._spec.columns] for r in records])
            return
        lines = [orjson.dumps(self._json(r)) for r in records]
        self._out.write(b"\n".join(lines).decode() + "\n")

    def _json(self, record: Record) -> Record:
        fields = {c: _scalar(record[c]) for c in self._spec.columns}
        for name in self._spec.json_columns:
            # Nested as stored, never re-serialised: the body inside `data` stays exact.
            fields[name] = orjson.Fragment(fields[name])
        return fields

    def _write_csv(self, rows: list[list[Any]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        self._out.write(buffer.getvalue())


async def _check_source(conn: AsyncConnection, source: sa.Table, name: str) -> None:
    """A table that is not there, or not one of `name`'s (`--table events`), is refused by name
    before anything is written, not left to fail in the database's words."""

    def columns(sync: sa.Connection) -> set[str] | None:
        inspector = sa.inspect(sync)
        if not inspector.has_table(source.name):
            return None
        return {str(column["name"]) for column in inspector.get_columns(source.name)}

    found = await conn.run_sync(columns)
    if found is None:
        raise ValueError(f"no table {source.name!r} in this database")
    if not set(source.c.keys()) <= found:
        raise ValueError(f"table {source.name!r} is not a table of {name}")


async def export(
    engine: AsyncEngine,
    name: str,
    out: TextIO,
    *,
    fmt: str = "jsonl",
    after: int = 0,
    table: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Write `name` (or its point-in-time copy `table`) to `out`; the number of rows written."""
    spec = EXPORTS[name]
    source = spec.table_for(table)
    cursor = source.c[spec.cursor_column]
    where = cursor > after
    done = 0
    async with engine.connect() as conn:
        await _check_source(conn, source, name)
        writer = _Writer(spec, fmt, out)
        writer.header()
        total = (
            await conn.execute(sa.select(sa.func.count()).where(where).select_from(source))
        ).scalar_one()
        query = sa.select(source).where(where).order_by(cursor).execution_options(yield_per=BATCH)
        result = await conn.stream(query)
        async for partition in result.mappings().partitions(BATCH):
            records = [dict(row) for row in partition]
            if spec.derive is not None:
                records = [spec.derive(r) for r in records]
            writer.rows(records)
            done += len(records)
            if progress:
                progress(done, total, done)
    return done
