"""`trigger_stats`: one row per trigger and UTC day of counts and a dispatch latency histogram.

An event counts on the day it was recorded: a delivery received before midnight that succeeds
after it is `received` on one day and `succeeded` on the next. Latency samples are the
`duration_ms` of successful attempts. Histograms are mergeable (projections.histogram), so any
range of days and triggers combines without rereading the log.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ledger.events import RecordedEvent
from ledger.rows import execute_many, fetch_dicts, in_list, in_values, insert_many, padded
from ledger.schema import BigInt, metadata
from projections import histogram
from projections.base import BulkFold

NAME = "trigger_stats"
Row = dict[str, Any]
Key = tuple[str, date]

COUNTERS = (
    "received",
    "duplicates",
    "duplicates_body_mismatch",
    "filtered",
    "succeeded",
    "failed_transient",
    "failed_permanent",
    "dead_lettered",
    "replays",
)
INDEXES: list[tuple[str, list[str]]] = [("ix_trigger_stats_day", ["day"])]
_CHUNK = 200  # keys per load query


def columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("trigger_id", sa.String(64), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),  # UTC
        *(sa.Column(name, sa.Integer, nullable=False) for name in COUNTERS),
        sa.Column("latency_count", sa.Integer, nullable=False),
        sa.Column("latency_sum_ms", sa.Float, nullable=False),
        sa.Column("latency_histogram", sa.Text, nullable=False),  # {"bucket": count}, see histogram
        sa.Column("last_seq", BigInt, nullable=False),
    ]


table = sa.Table(NAME, metadata, *columns())
for _name, _cols in INDEXES:
    sa.Index(_name, *(table.c[c] for c in _cols))


def shadow_table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), *columns())


@dataclass(frozen=True, slots=True)
class Change:
    """What one event adds to its trigger's day."""

    counts: Mapping[str, int]
    latency_ms: float | None = None


# A delivery's changes, made once (read-only: every delivery's event shares one).
_RECEIVED = {
    filtered: Change(MappingProxyType({"received": 1, "filtered": int(filtered)}))
    for filtered in (False, True)
}
_DUPLICATE = {
    matches: Change(
        MappingProxyType({"duplicates": 1, "duplicates_body_mismatch": int(not matches)})
    )
    for matches in (True, False)
}


def change_of(event: RecordedEvent) -> Change | None:
    """The fold's heart (pure): which counters an event moves, None for events not counted."""
    data = event.data
    match event.type:
        case "webhook.received":
            return _RECEIVED[data.get("initial_status") == "filtered"]
        case "webhook.duplicate":
            return _DUPLICATE[bool(data.get("body_matches", True))]
        case "execution.succeeded":
            duration = data.get("duration_ms")
            return Change({"succeeded": 1}, float(duration) if duration is not None else None)
        case "execution.failed":
            category = "permanent" if data.get("error_category") == "permanent" else "transient"
            return Change({f"failed_{category}": 1})
        case "execution.dead_lettered":
            return Change({"dead_lettered": 1})
        case "execution.replay_requested":
            return Change({"replays": 1})
        case _:
            return None


def key_of(event: RecordedEvent) -> Key:
    return event.trigger_id, event.recorded_at.astimezone(UTC).date()


@dataclass(slots=True)
class DayStats:
    """A row being folded: counters and the histogram as a dict (serialised once, at store)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    latency: histogram.Histogram = field(default_factory=dict)
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    last_seq: int = 0

    @classmethod
    def from_row(cls, row: Row) -> DayStats:
        return cls(
            {name: row[name] for name in COUNTERS},
            histogram.loads(row["latency_histogram"]),
            row["latency_count"],
            row["latency_sum_ms"],
            row["last_seq"],
        )

    def fold(self, seq: int, change: Change) -> None:
        if seq <= self.last_seq:
            return  # already folded in: applying an event twice equals once
        for name, count in change.counts.items():
            self.counts[name] += count
        if change.latency_ms is not None:
            histogram.add(self.latency, change.latency_ms)
            self.latency_count += 1
            self.latency_sum_ms += change.latency_ms
        self.last_seq = seq

    def to_row(self, key: Key) -> Row:
        return {
            "trigger_id": key[0],
            "day": key[1],
            **self.counts,
            "latency_count": self.latency_count,
            "latency_sum_ms": self.latency_sum_ms,
            "latency_histogram": histogram.dumps(self.latency),
            "last_seq": self.last_seq,
        }


def changes_of(events: Iterable[RecordedEvent]) -> list[tuple[Key, int, Change]]:
    changes = []
    at: datetime | None = None
    key: Key = ("", date.min)
    for event in events:
        change = change_of(event)
        if change is None:
            continue
        if event.recorded_at is not at or event.trigger_id != key[0]:
            # an append's events share one time (and mostly a trigger): its day is found once
            at, key = event.recorded_at, key_of(event)
        changes.append((key, event.seq, change))
    return changes


def fold(changes: Iterable[tuple[Key, int, Change]], rows: dict[Key, DayStats]) -> set[Key]:
    """Fold `changes` into `rows` (missing days are created); the keys that changed."""
    touched = set()
    for key, seq, change in changes:
        rows.setdefault(key, DayStats()).fold(seq, change)
        touched.add(key)
    return touched


def _load(conn: sa.Connection, target: sa.Table, keys: set[Key]) -> dict[Key, Row]:
    found: dict[Key, Row] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), _CHUNK):
        chunk = ordered[start : start + _CHUNK]
        # A superset (every trigger × every day of the chunk), narrowed here: portable and indexed.
        triggers = padded(sorted({t for t, _ in chunk}))
        days = padded(sorted({d for _, d in chunk}))
        asked = in_values("trigger", triggers) | in_values("day", days)
        query = _load_statement(target, len(triggers), len(days))
        for row in fetch_dicts(conn, query, asked):
            key = (row["trigger_id"], row["day"])
            if key in keys:
                found[key] = row
    return found


@functools.lru_cache(maxsize=128)
def _load_statement(target: sa.Table, triggers: int, days: int) -> sa.Select[Any]:
    return sa.select(target).where(
        target.c.trigger_id.in_(in_list(target.c.trigger_id, "trigger", triggers)),
        target.c.day.in_(in_list(target.c.day, "day", days)),
    )


@functools.lru_cache(maxsize=64)
def _update_statement(target: sa.Table) -> sa.Update:
    keys = ("trigger_id", "day")
    values: dict[str, Any] = {
        c.name: sa.bindparam(f"b_{c.name}") for c in target.c if c.name not in keys
    }
    return (
        target.update()
        .where(
            target.c.trigger_id == sa.bindparam("b_trigger_id"),
            target.c.day == sa.bindparam("b_day"),
        )
        .values(values)
    )


def _add_counts(
    conn: sa.Connection, target: sa.Table, changes: list[tuple[Key, int, Change]]
) -> None:
    """Days whose changes here are counts alone (deliveries, duplicates, failures: the bulk of a
    log) are added in the database, one upsert a day, without reading their rows first: the
    same row as `fold` makes, its guard (an event at or below `last_seq` is in already) on the
    day's first event here: a fold never gives a day some events it holds and some it does not
    (checkpoints move with the folds; rebuilds fill an empty table)."""
    first: dict[Key, int] = {}
    for key, seq, _ in changes:
        first.setdefault(key, seq)
    days: dict[Key, DayStats] = {}
    fold(changes, days)  # each day's additions: the fold's own, from zero
    rows = [day.to_row(key) | {"first_seq": first[key]} for key, day in days.items()]
    execute_many(conn, _add_counts_statement(target, conn.dialect.name), rows)


@functools.lru_cache(maxsize=16)
def _add_counts_statement(target: sa.Table, dialect: str) -> sa.Executable:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(target)
    added = insert.excluded
    first = sa.bindparam("first_seq", type_=target.c.last_seq.type)
    return insert.on_conflict_do_update(
        index_elements=[target.c.trigger_id, target.c.day],
        set_={name: target.c[name] + added[name] for name in COUNTERS}
        | {"last_seq": added.last_seq},
        where=target.c.last_seq < first,
    )


class TriggerStatsProjection:
    """The `Projection` the runner and rebuild drive (projections.base.Projection)."""

    def __init__(self) -> None:
        self.name = NAME
        self.table = table
        self.bulk: BulkFold | None = (
            None  # its folds are additive per (trigger, day): apply is already batched
        )

    def shadow_table(self, name: str) -> sa.Table:
        return shadow_table(name)

    def index_ddl(self, table_name: str) -> list[sa.Index]:
        target = shadow_table(table_name)
        return [sa.Index(name, *(target.c[c] for c in cols)) for name, cols in INDEXES]

    def apply(self, conn: sa.Connection, table: sa.Table, events: Sequence[RecordedEvent]) -> None:
        changes = changes_of(events)
        timed = {key for key, _, change in changes if change.latency_ms is not None}
        if len(timed) < len({key for key, _, _ in changes}):
            _add_counts(conn, table, [c for c in changes if c[0] not in timed])
            changes = [c for c in changes if c[0] in timed]
        if not changes:
            return
        existing = _load(conn, table, {key for key, _, _ in changes})
        rows = {key: DayStats.from_row(row) for key, row in existing.items()}
        touched = fold(changes, rows)
        inserts = [rows[k].to_row(k) for k in sorted(touched) if k not in existing]
        updates = [rows[k].to_row(k) for k in sorted(touched) if k in existing]
        if inserts:
            insert_many(conn, table, inserts)
        if updates:
            statement = _update_statement(table)
            execute_many(conn, statement, updates, prefix="b_")


PROJECTION = TriggerStatsProjection()
