"""What an appending connection knows of the log from its own committed transactions: the head
it left, and of the keys it saw lately (appended, or read as received before) each one's
original with the version of its stream. A duplicate whose original is known costs no read of
the log (ledger/originals.py `_read_head_and_originals`).

Every append changes the head, so while the log's head is the one this connection left, nothing
but this connection appended since, and what it knows is exactly what the log holds: an original
never changes (the log is append-only), and every version this connection moved it wrote down.
A head that differs (another process, another connection of this one, a database restored)
forgets it all (`holds`). PostgreSQL's held connection may plan on what it knows without reading
the head (ledger/append.py `append_and_fold`): there another append since breaks `seq`'s
primary key, and the batch is planned on the log. What a transaction learned is kept only once
its COMMIT succeeded (`learned_at_commit`, by the connection's runner: ledger/writers.py,
ledger/held.py); a connection that failed is dropped with what it knew.

Bounded (`CAPACITY`): the retries senders make soon after a delivery find their original here;
an older key is read from the log as before, and known again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

from ledger.commands import Original
from ledger.events import execution_stream

if TYPE_CHECKING:
    from ledger.commands import PlanState

# conn.info: the KnownLog of a connection whose runner keeps one (its committed appends)...
KNOWN = "hookledger_known"
# ... and what its current transaction's append would add to it: (the head it left, its state,
# whether the next batch may be planned on what is known without a read).
KNOWN_LEFT = "hookledger_known_left"

CAPACITY = 8192  # keys (and as many streams): ~4 MB

T = TypeVar("T")
V = TypeVar("V")


class KnownLog:
    """The head a connection's last committed append left; recent originals and versions."""

    __slots__ = ("head", "originals", "unread_next", "versions")

    def __init__(self) -> None:
        self.head: tuple[int, str] | None = None
        # The next batch of deliveries may be planned on `head` and what is known, reading
        # nothing (PostgreSQL's held connection: ledger/append.py `append_and_fold`).
        self.unread_next = False
        # Each original as a plain tuple of its fields, which the garbage collector stops
        # tracking: thousands of objects kept alive, each a delivery, made its full collections
        # more frequent and longer (+3 % of a new delivery's instructions, for a dataclass).
        self.originals: dict[tuple[str, str], tuple[str, str, str]] = {}  # in the order learned
        self.versions: dict[str, int] = {}  # likewise

    def holds(self, head: tuple[int, str]) -> bool:
        """Whether what is known here still holds, the log's head being `head` (read under the
        append lock); when it does not, all is forgotten: someone else appended."""
        if head == self.head:
            return True
        self.forget()
        return False

    def recall(
        self, keys: Iterable[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], Original], dict[str, int]]:
        """The originals of `keys` known here, with their streams' versions (after `holds`)."""
        originals: dict[tuple[str, str], Original] = {}
        versions: dict[str, int] = {}
        kept_originals, kept_versions = self.originals, self.versions
        for key in keys:
            fields = kept_originals.pop(key, None)
            if fields is None:
                continue
            kept_originals[key] = fields  # to the end, as the most recently used
            stream = execution_stream(fields[1])
            version = kept_versions.pop(stream, None)
            if version is not None:
                kept_versions[stream] = version
                originals[key] = Original(*fields)
                versions[stream] = version
        return originals, versions

    def learn(self, head: tuple[int, str], state: PlanState, unread_next: bool) -> None:
        """What a committed append planned on (`state`, its versions moved by its events) and
        the head it left."""
        self.head = head
        self.unread_next = unread_next
        learned = {k: _fields(o) for k, o in state.originals.items()}
        _bound(self.originals, learned)
        _bound(self.versions, state.versions)

    def forget(self) -> None:
        self.head = None
        self.unread_next = False
        self.originals = {}
        self.versions = {}


def _fields(original: Original) -> tuple[str, str, str]:
    return original.event_id, original.execution_id, original.body_sha256


def _bound(kept: dict[T, V], seen: dict[T, V]) -> None:
    """`kept` updated with `seen`, then its oldest let go past `CAPACITY`. A name updated keeps
    its place, but `recall` moved what it found to the end: what is in use stays (a mix of new
    deliveries and retries of a few keys otherwise let those go every `CAPACITY` deliveries)."""
    kept.update(seen)
    excess = len(kept) - CAPACITY
    if excess > 0:
        for name in list(itertools.islice(kept, excess)):
            del kept[name]


def knows_its_log(conn: sa.Connection) -> None:
    """Have `conn` keep a KnownLog (its runner calls `learned_at_commit` after each COMMIT)."""
    conn.info.pop(KNOWN_LEFT, None)
    conn.info[KNOWN] = KnownLog()


def known_log(conn: sa.Connection) -> KnownLog | None:
    known: KnownLog | None = conn.info.get(KNOWN)
    return known


def leave(conn: sa.Connection, head: tuple[int, str], state: PlanState) -> None:
    """In an append's transaction: what it would teach `conn`'s KnownLog once committed."""
    if KNOWN in conn.info:
        conn.info[KNOWN_LEFT] = (head, state, False)


def leave_unread_next(conn: sa.Connection) -> None:
    """In an append's transaction, after `leave`: once it is committed, the next batch may be
    planned on what it left without reading the log (`expected_head`)."""
    left = conn.info.get(KNOWN_LEFT)
    if left is not None:
        conn.info[KNOWN_LEFT] = (*left[:2], True)


def unread_next(conn: sa.Connection) -> bool:
    """Whether the next batch will be planned without a read (`expected_head`): what this
    transaction's append left says so, or, before any, what the connection learned last."""
    left = conn.info.get(KNOWN_LEFT)
    if left is not None:
        return bool(left[2])
    known = known_log(conn)
    return known is not None and known.unread_next


def expected_head(conn: sa.Connection) -> tuple[int, str] | None:
    """The head to plan this batch on without a read, if the last committed one left it so
    (`leave_unread_next`); taken, for this batch only."""
    known = known_log(conn)
    if known is None or not known.unread_next:
        return None
    known.unread_next = False
    return known.head


def learned_at_commit(conn: sa.Connection) -> None:
    """After the COMMIT of a transaction of `conn` succeeded: what its append left, learned. (A
    failed one's connection is dropped with it: SqliteWriter, HeldConnection.)"""
    left = conn.info.pop(KNOWN_LEFT, None)
    known = conn.info.get(KNOWN)
    if left is not None and known is not None:
        known.learn(*left)
