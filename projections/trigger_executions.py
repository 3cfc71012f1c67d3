"""`trigger_executions`: one row per execution, folded from its stream's events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ledger.codec import parse_time
from ledger.events import RecordedEvent, execution_of_stream
from ledger.schema import BigInt, UTCDateTime, events, json_text, metadata
from projections.base import IN_WINDOW, BulkFold, Increment

NAME = "trigger_executions"
Row = dict[str, Any]

STATUSES = ("recorded", "filtered", "pending", "running", "succeeded", "retrying", "dead_lettered")
TERMINAL = frozenset({"recorded", "filtered", "succeeded", "dead_lettered"})
DISPATCHABLE = ("pending", "retrying", "running")


def columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("execution_id", sa.String(36), primary_key=True),
        sa.Column("trigger_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("received_event_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_category", sa.String(16)),
        sa.Column("last_error", sa.Text),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("duplicate_count", sa.Integer, nullable=False),
        sa.Column("last_duplicate_at", UTCDateTime),
        sa.Column("replay_count", sa.Integer, nullable=False),
        sa.Column("last_replay_at", UTCDateTime),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("completed_at", UTCDateTime),
        sa.Column("last_seq", BigInt, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),  # stream version: the dispatcher's claim
    ]


INDEXES: list[tuple[str, list[str]]] = [
    ("ix_trigger_executions_trigger_id_execution_id", ["trigger_id", "execution_id"]),
    ("ix_trigger_executions_status_next_attempt_at", ["status", "next_attempt_at"]),
    ("ix_trigger_executions_trigger_id_status", ["trigger_id", "status"]),  # server/due.py
]

table = sa.Table(NAME, metadata, *columns())
for _name, _cols in INDEXES:
    sa.Index(_name, *(table.c[c] for c in _cols))


def shadow_table(name: str) -> sa.Table:
    """A copy of the table without secondary indexes, for rebuilds and point-in-time views."""
    return sa.Table(name, sa.MetaData(), *columns())


def may_make_due(event: RecordedEvent) -> bool:
    """Whether folding `event` may leave an execution due for dispatch, so that the dispatcher
    looks (server/app.py gives it to the runner, whose `advanced` wakes the dispatcher). Only
    what surely cannot is left out: a duplicate (it changes counts only) and a delivery received
    as `recorded` or `filtered` (nothing to dispatch). Everything else may (a pending delivery,
    a failed attempt's retry, a replay, a trigger resumed or given a destination), and the
    dispatcher's poll (`HOOKLEDGER_DISPATCH_POLL_S`) catches what becomes due with time."""
    if event.type == "webhook.duplicate":
        return False
    if event.type == "webhook.received":
        return _initial_status(event) == "pending"
    return True


def _initial_status(event: RecordedEvent) -> str:
    """The status a delivery's execution starts in (a log older than `initial_status`: pending)."""
    return str(event.data.get("initial_status", "pending"))


def _received(event: RecordedEvent) -> Row:
    data = event.data
    status = _initial_status(event)
    return {
        "execution_id": data["execution_id"],
        "trigger_id": event.trigger_id,
        "idempotency_key": event.idempotency_key,
        "received_event_id": event.id,
        "status": status,
        "attempts": 0,
        "error_category": None,
        "last_error": None,
        "last_status_code": None,
        "next_attempt_at": event.recorded_at if status == "pending" else None,
        "lease_until": None,
        "duplicate_count": 0,
        "last_duplicate_at": None,
        "replay_count": 0,
        "last_replay_at": None,
        "received_at": event.recorded_at,
        "completed_at": None,
    }


def _time(value: str | None) -> datetime | None:
    return parse_time(value) if value else None


def _change(row: Row, event: RecordedEvent) -> Row:
    """The columns an execution event changes (the fold's heart)."""
    data, at = event.data, event.recorded_at
    match event.type:
        case "webhook.duplicate":
            return {"duplicate_count": row["duplicate_count"] + 1, "last_duplicate_at": at}
        case "execution.started":
            lease = _time(data["lease_until"])
            return {
                "status": "running",
                "attempts": data["attempt"],
                "lease_until": lease,
                "next_attempt_at": lease,
            }
        case "execution.succeeded":
            return {
                "status": "succeeded",
                "attempts": data["attempt"],
                "error_category": None,
                "last_error": None,
                "last_status_code": data["status_code"],
                "next_attempt_at": None,
                "lease_until": None,
                "completed_at": at,
            }
        case "execution.failed":
            retry_at = _time(data.get("retry_at"))
            return {
                "status": "retrying" if retry_at else row["status"],
                "attempts": data["attempt"],
                "error_category": data["error_category"],
                "last_error": data["error"],
                "last_status_code": data.get("status_code"),
                "next_attempt_at": retry_at,
                "lease_until": None,
            }
        case "execution.dead_lettered":
            category = data.get("error_category") or row["error_category"] or "permanent"
            return {
                "status": "dead_lettered",
                "error_category": category,
                "last_error": row["last_error"] or data["reason"],
                "next_attempt_at": None,
                "lease_until": None,
                "completed_at": at,
            }
        case "execution.replay_requested":
            return {
                "status": "pending",
                "attempts": 0,
                "replay_count": row["replay_count"] + 1,
                "last_replay_at": at,
                "next_attempt_at": at,
                "lease_until": None,
                "completed_at": None,
            }
        case _:
            return {}


def evolve(row: Row | None, event: RecordedEvent) -> Row | None:
    """The execution's row after `event` (pure). Events of other streams leave it as it is."""
    if row is not None and event.seq <= row["last_seq"]:
        return row  # already folded in: applying an event twice equals once
    if event.type == "webhook.received":
        changed: Row = _received(event)
    elif row is None:
        return None
    else:
        changed = row | _change(row, event)
    return changed | {"last_seq": event.seq, "version": event.version}


def execution_id_of(event: RecordedEvent) -> str | None:
    return execution_of_stream(event.stream)


# The rebuild's set-wise fold (projections.base.BulkFold): a log's bulk is its deliveries and
# their duplicates, so those are folded by SQL in the database: each window's deliveries in one
# statement, the whole log's duplicates in one after the last window; the rest (attempts,
# replays) still goes through `evolve`. The statements say, in SQL, what `_received` and the
# `webhook.duplicate` case of `_change` say: keep them together.
_e = events
_IN_EXECUTIONS = sa.func.substr(_e.c.stream, 1, len("execution-")) == "execution-"
_OPENS = sa.and_(_e.c.type == "webhook.received", _e.c.version == 1, _IN_EXECUTIONS)
_DUPLICATE = sa.and_(_e.c.type == "webhook.duplicate", _IN_EXECUTIONS)


def _bulk_create(target: sa.Table, dialect: str) -> sa.Executable:
    """`_received`, for every delivery of the window: INSERT … SELECT."""
    opened = (
        sa.select(
            json_text(_e.c.data, "execution_id").label("execution_id"),
            _e.c.trigger_id,
            _e.c.idempotency_key,
            _e.c.id,
            sa.func.coalesce(json_text(_e.c.data, "initial_status"), "pending").label("status"),
            _e.c.recorded_at,
            _e.c.seq,
            _e.c.version,
        )
        .where(IN_WINDOW, _OPENS)
        .subquery("opened")
    )
    o = opened.c
    values: dict[str, Any] = {
        "execution_id": o.execution_id,
        "trigger_id": o.trigger_id,
        "idempotency_key": o.idempotency_key,
        "received_event_id": o.id,
        "status": o.status,
        "attempts": sa.literal(0),
        "next_attempt_at": sa.case((o.status == "pending", o.recorded_at)),
        "duplicate_count": sa.literal(0),
        "replay_count": sa.literal(0),
        "received_at": o.recorded_at,
        "last_seq": o.seq,
        "version": o.version,
    }
    names = [c.name for c in target.c]
    columns = [values.get(name, sa.null()).label(name) for name in names]
    return target.insert().from_select(names, sa.select(*columns))


def _bulk_amend(target: sa.Table, dialect: str) -> sa.Executable:
    """The `webhook.duplicate` case of `_change`, for every execution of the range at once (a
    rebuild gives it the whole log, after its last window)."""
    found = (
        sa.select(
            sa.func.substr(_e.c.stream, len("execution-") + 1).label("execution_id"),
            sa.func.count().label("n"),
            sa.func.max(_e.c.seq).label("seq"),
            sa.func.max(_e.c.version).label("version"),
            # SQLite takes a bare column beside max() from the row of that max (documented);
            # elsewhere it is looked up by seq below.
            *([_e.c.recorded_at] if dialect == "sqlite" else []),
        )
        .where(IN_WINDOW, _DUPLICATE)
        .group_by(_e.c.stream)
        .subquery("duplicates")
    )
    d = found.c
    last_at: sa.ColumnElement[Any] = (
        d.recorded_at
        if dialect == "sqlite"
        else sa.select(_e.c.recorded_at).where(_e.c.seq == d.seq).scalar_subquery()
    )
    later = d.seq > target.c.last_seq  # SET sees the old row: both cases test the same
    return (
        target.update()
        .where(target.c.execution_id == d.execution_id)
        .values(
            duplicate_count=target.c.duplicate_count + d.n,
            last_duplicate_at=last_at,
            last_seq=sa.case((later, d.seq), else_=target.c.last_seq),
            version=sa.case((later, d.version), else_=target.c.version),
        )
    )


BULK = BulkFold(covers=sa.or_(_OPENS, _DUPLICATE), create=_bulk_create, amend=_bulk_amend)


# The live fold's shortcut for duplicates (projections.base.Increment): the `webhook.duplicate`
# case of `_change` and `evolve`'s guard, as one UPDATE of the row where it stands, all of a
# batch's duplicates of an execution at once.
def _duplicate_columns(target: sa.Table) -> dict[str, Any]:
    c = target.c
    return {
        "added": sa.Integer(),
        "at": c.last_duplicate_at.type,
        "first_seq": c.last_seq.type,
        "seq": c.last_seq.type,
        "version": c.version.type,
    }


def _add_duplicates(target: sa.Table, change: Any) -> sa.Executable:
    return (
        target.update()
        .where(target.c.execution_id == change.key, target.c.last_seq < change.first_seq)
        .values(
            duplicate_count=target.c.duplicate_count + change.added,
            last_duplicate_at=change.at,
            last_seq=change.seq,
            version=change.version,
        )
    )


def _duplicates_values(events: list[RecordedEvent]) -> Row:
    last = events[-1]
    return {
        "added": len(events),
        "at": last.recorded_at,
        "first_seq": events[0].seq,
        "seq": last.seq,
        "version": last.version,
    }


INCREMENT = Increment(
    types=frozenset({"webhook.duplicate"}),
    columns=_duplicate_columns,
    statement=_add_duplicates,
    values=_duplicates_values,
)
