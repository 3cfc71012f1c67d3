"""The tables of the log and of projection checkpoints, declared once on a named MetaData.

Projections declare their read tables on the same `metadata` (see projections/), so that one
Alembic history owns the whole schema. Names are stable: migrations and code refer to them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

IDEMPOTENCY_INDEX = "uq_events_trigger_id_idempotency_key"
STREAM_VERSION_CONSTRAINT = "uq_events_stream_version"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends (timestamptz on PostgreSQL, ISO text on SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class json_text(FunctionElement[str]):  # noqa: N801 (an SQL function, named as one)
    """`json_text(column, "key")`: the string at `key` of the JSON text in `column` (an event's
    `data` or `meta`, text on both backends), read by the database itself, so that a reader
    wanting one field of a stored event neither ships the whole text to Python nor parses it
    there. A string literal in the SQL, not a bind: compiled once, the same on every call."""

    type = sa.String()
    name = "json_text"
    inherit_cache = True

    def __init__(self, column: sa.ColumnElement[Any], key: str) -> None:
        if not key.isidentifier():
            raise ValueError(f"not a plain JSON key: {key!r}")
        super().__init__(column, sa.literal_column(f"'{key}'"))


# PostgreSQL's JSON functions refuse a text holding the escape \u0000 ("cannot be converted to
# text"), wherever it stands, though a stored body may hold a NUL (text/plain, a form): every
# such escape is read as \ufffd instead. The text keeps its shape (a backslash, u, four hex
# digits), so it stays valid JSON whether that backslash began an escape or was one; only a value
# that held a NUL (or the text "\u0000") reads differently. It costs a scan of the text.
_NUL_ESCAPE, _NUL_READ_AS = r"E'\\u0000'", r"E'\\ufffd'"


@compiles(json_text, "postgresql")
def _json_text_postgresql(element: json_text, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses
    text = f"replace({compiler.process(column, **kw)}, {_NUL_ESCAPE}, {_NUL_READ_AS})"
    return f"(CAST({text} AS JSON) ->> {compiler.process(key, **kw)})"


@compiles(json_text)
def _json_text_sqlite(element: json_text, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses
    path = compiler.process(key, **kw).replace("'", "")
    return f"json_extract({compiler.process(column, **kw)}, '$.{path}')"


# `LIMIT 1` written into a statement's SQL instead of bound: PostgreSQL plans a generic plan (the
# appender's session uses only those, ledger/held.py) for a bound LIMIT as if it took a tenth of
# the rows; written, a read of the head is one step of an index, whatever the size of the log.
LIMIT_ONE: sa.ColumnClause[int] = sa.literal_column("1")


class likely(FunctionElement[bool]):  # noqa: N801 - reads as the SQL function it renders
    """`likely(x)` on SQLite (a hint that x is not selective), plain `x` elsewhere."""

    inherit_cache = True
    type = sa.Boolean()
    name = "likely"
    _is_implicitly_boolean = True  # a condition as it stands, not `likely(…) = 1`


@compiles(likely)
def likely_plain(element: likely, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(likely, "sqlite")
def likely_sqlite(element: likely, compiler: SQLCompiler, **kw: Any) -> str:
    return f"likely({compiler.process(element.clauses, **kw)})"


# BIGINT on PostgreSQL, but INTEGER on SQLite so that `seq` is the rowid.
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    "events",
    metadata,
    # seq is assigned by the single appender under the append lock, never by a sequence:
    # commit order is seq order, so a reader following seq never passes a gap that fills later.
    sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("trigger_id", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("data", sa.Text, nullable=False),  # JSON text: text scans and inserts beat jsonb
    sa.Column("meta", sa.Text, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("stream", "version"),
    # The idempotency arbiter: one webhook.received per (trigger_id, key), for the life of the log.
    sa.Index(
        IDEMPOTENCY_INDEX,
        "trigger_id",
        "idempotency_key",
        unique=True,
        sqlite_where=sa.text("type = 'webhook.received'"),
        postgresql_where=sa.text("type = 'webhook.received'"),
    ),
    sa.Index("ix_events_trigger_id_seq", "trigger_id", "seq"),
    sa.Index("ix_events_type_seq", "type", "seq"),
)

projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("seq", BigInt, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# The tables `rebuild --into` made (projections/target_marks.py): a rebuild replaces one only when
# its row here names the mark the table still carries (its comment on PostgreSQL, a comment in
# its CREATE statement on SQLite); the row is written in the transaction that makes the table.
rebuild_targets = sa.Table(
    "rebuild_targets",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("projection", sa.String(64), nullable=False),
    sa.Column("until_seq", BigInt, nullable=False),
    sa.Column("mark", sa.String(128), nullable=False),
    sa.Column("made_at", UTCDateTime, nullable=False),
)

# Which key seals the secrets in this database (ledger/vault.py `Vault.fingerprint`): one row,
# written by the first process to start on it, compared by every one after (server/secretkey.py).
secret_key_check = sa.Table(
    "secret_key_check",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
)

# The append-only rule, enforced by the database whatever code asks.
SQLITE_APPEND_ONLY = [
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'events is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
       BEGIN SELECT RAISE(ABORT, 'events is append-only: DELETE refused'); END""",
]
# SQLite's REPLACE (`INSERT OR REPLACE`, `REPLACE INTO`) deletes the row it conflicts with
# without firing delete triggers, unless the connection turned recursive triggers on: every
# connection hookledger opens does (ledger/store.py `_configure_sqlite`, the WAL checkpointer's).
# A connection opened elsewhere (a sqlite3 shell) has to say it too; a trigger refusing such
# inserts would cost every append several index probes (docs/decisions.md).
SQLITE_RECURSIVE_TRIGGERS = "PRAGMA recursive_triggers=ON"
POSTGRES_APPEND_ONLY = [
    """CREATE OR REPLACE FUNCTION hookledger_events_append_only() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'events is append-only: % refused', TG_OP; END $$""",
    "DROP TRIGGER IF EXISTS events_append_only ON events",
    """CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
       FOR EACH ROW EXECUTE FUNCTION hookledger_events_append_only()""",
    "DROP TRIGGER IF EXISTS events_no_truncate ON events",
    """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
       FOR EACH STATEMENT EXECUTE FUNCTION hookledger_events_append_only()""",
]

# Fails the statement it is in, and so its transaction, unless `actual = expected` (SQLSTATE
# HL001, `EXPECTED_ROWS_STATE`): an append batch sent as one statement checks with it that its
# inline fold's checkpoints all moved (ledger/append.py `_append_alone`). VOLATILE, so that it runs
# where the statement puts it, never folded or skipped by the planner.
EXPECTED_ROWS_STATE = "HL001"
POSTGRES_EXPECT_ROWS = f"""
CREATE OR REPLACE FUNCTION hookledger_expect_rows(actual bigint, expected bigint, what text)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF actual IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'hookledger: %: % rows where % were expected', what, actual, expected
            USING ERRCODE = '{EXPECTED_ROWS_STATE}';
    END IF;
    RETURN actual;
END $$"""
