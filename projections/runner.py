"""The runner: feeds the log to every projection and moves each checkpoint in the same transaction.

One runner at a time projects a database: on PostgreSQL the others find the projector lock taken
and wait their turn; on SQLite the write lock serialises them. A failing projection stops the runner
and says why; it never skips an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.append import CheckpointsMoved
from ledger.deferred import is_alone
from ledger.events import RecordedEvent
from ledger.failures import FailureLog
from ledger.rows import array_of, execute_many, fetch_all, write_expecting
from ledger.schema import events
from ledger.schema import projection_checkpoints as checkpoints
from ledger.store import is_postgres, plan_by_index, read_events, write_transaction
from projections.base import Projection

logger = logging.getLogger(__name__)

PROJECTOR_LOCK_ID = 0x70726F6A  # "proj"


_CHECKPOINTS = sa.select(checkpoints.c.name, checkpoints.c.seq)
_HEAD = sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0).label("head")).subquery()
# The head beside every checkpoint (a row with the head alone when there is none yet).
_CHECKPOINTS_AND_HEAD = sa.select(_HEAD.c.head, checkpoints.c.name, checkpoints.c.seq).select_from(
    _HEAD.outerjoin(checkpoints, sa.true())
)


async def read_checkpoints(conn: AsyncConnection) -> dict[str, int]:
    rows = (await conn.execute(_CHECKPOINTS)).all()
    return {name: seq for name, seq in rows}


async def read_checkpoints_and_head(conn: AsyncConnection) -> tuple[dict[str, int], int]:
    """The checkpoints and the head of the log, in one statement: one snapshot. In two, on
    PostgreSQL each sees what committed before it, and an append folded in between (its events
    in the head, its checkpoints moved in its own transaction) put the projections behind by
    what they had folded, or, read the other way round, ahead of the log; a runner's poll then
    took the projector lock for nothing and turned appends' inline folds away."""
    rows = (await conn.execute(_CHECKPOINTS_AND_HEAD)).all()
    return {name: seq for _, name, seq in rows if name is not None}, int(rows[0][0])


async def set_checkpoint(conn: AsyncConnection, name: str, seq: int) -> None:
    values = {"seq": seq, "updated_at": datetime.now(UTC)}
    result = await conn.execute(
        checkpoints.update().where(checkpoints.c.name == name).values(values)
    )
    if result.rowcount == 0:
        await conn.execute(checkpoints.insert().values(name=name, **values))


_MOVE_CHECKPOINT = (
    checkpoints.update()
    .where(checkpoints.c.name == sa.bindparam("b_name"))
    .values(seq=sa.bindparam("b_seq"), updated_at=sa.bindparam("b_at"))
)
_NAMES = sa.bindparam("names", type_=array_of(checkpoints.c.name.type))
_AT_BEFORE = sa.and_(
    checkpoints.c.name == sa.any_(_NAMES), checkpoints.c.seq == sa.bindparam("before")
)
# PostgreSQL, in one round trip: with the projector lock (no rows when another runner holds it),
# every checkpoint moved from `before` to `seq` when all of them stood at `before`, else none.
_MOVE_LOCKED_CHECKPOINTS = (
    checkpoints.update()
    .where(
        _AT_BEFORE,
        sa.select(sa.func.count()).where(_AT_BEFORE).scalar_subquery()
        == sa.func.cardinality(_NAMES),
        sa.func.pg_try_advisory_xact_lock(
            sa.bindparam("k", type_=sa.BigInteger()), type_=sa.Boolean
        ),
    )
    .values(seq=sa.bindparam("seq"), updated_at=sa.bindparam("at"))
    .returning(checkpoints.c.name)
)


async def _take_projector_lock(conn: AsyncConnection, *, wait: bool) -> bool:
    if not is_postgres(conn):
        return True  # the SQLite write transaction already excludes other runners
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    result = await conn.execute(sa.text(f"SELECT {function}(:k)"), {"k": PROJECTOR_LOCK_ID})
    return wait or bool(result.scalar())


class ProjectionRunner:
    """Keeps every projection caught up with the log."""

    def __init__(
        self,
        engine: AsyncEngine,
        projections: Sequence[Projection],
        *,
        batch: int = 1000,
        poll_s: float = 0.2,
        wake: asyncio.Event | None = None,
        wakes: Callable[[RecordedEvent], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.projections = list(projections)
        self._batch = batch
        self._poll_s = poll_s
        self._wake = wake or asyncio.Event()
        # Set after a fold of events of which one at least `wakes` says wakes (any, without it):
        # the dispatcher's wake. A duplicate wakes nothing, so a burst of them costs the
        # dispatcher no look for due executions a batch.
        self.advanced = asyncio.Event()
        self._wakes = wakes
        self._failures = FailureLog(logger, "projector_failed")
        self.positions: dict[str, int] = {}
        self.caught_up_at = time.monotonic()
        # PostgreSQL: the last inline fold found the checkpoints at the head, so the next one
        # folds first and lets the checkpoints' check carry its writes (see `fold_appended`).
        self._folding_inline = False

    async def step(self) -> int:
        """Project the next batch; the events read (0: caught up, or another runner's turn)."""
        if not await self._behind():
            return 0
        async with write_transaction(self.engine) as conn:
            if not await _take_projector_lock(conn, wait=False):
                return 0
            if is_postgres(conn):
                # Its folds are the appender's, by index, into tables that may have outgrown
                # their statistics (a catch-up after a restart, a failed inline fold).
                await plan_by_index(conn)
            positions = await read_checkpoints(conn)
            low = min(positions.get(p.name, 0) for p in self.projections)
            batch = await read_events(conn, after=low, limit=self._batch)
            for projection in self.projections:
                await self._apply(conn, projection, positions.get(projection.name, 0), batch)
        self.positions = (
            positions | {p.name: batch[-1].seq for p in self.projections} if batch else positions
        )
        self._advanced(batch)
        return len(batch)

    async def _behind(self) -> bool:
        """Whether a projection is behind the log, from a look that takes no lock: a poll that
        finds nothing to do must not hold the projector lock, since an append that finds it
        held leaves its events to this runner (`fold_appended`), and every append after it
        too, its checkpoints then behind, until this runner has caught up under load."""
        return any(behind > 0 for behind in (await self.lag()).values())

    @staticmethod
    async def _apply(
        conn: AsyncConnection, projection: Projection, position: int, batch: list[RecordedEvent]
    ) -> None:
        pending = [event for event in batch if event.seq > position]
        if pending:
            await conn.run_sync(projection.apply, projection.table, pending)
            await set_checkpoint(conn, projection.name, pending[-1].seq)

    def fold_appended(
        self, conn: sa.Connection, before: int, appended: list[RecordedEvent]
    ) -> bool:
        """Fold events in the transaction that appends them, when every projection stood at
        `before`, the head before them: an acknowledged delivery is in the projections when its
        sender hears back, and nothing is read back from the log or committed twice.

        Otherwise (a projection is behind or rebuilt, another runner is folding) leave them to
        `step`, and say so. A projection that fails here raises: the appender
        (`ledger.append.append_and_fold`) rolls the transaction back to its savepoint and keeps
        the append, or on SQLite rolls it back whole and appends the batch again without the
        fold, and leaves the fold to `step`, which stops on it and says why: a bug in a fold
        never refuses deliveries. It touches nothing but `conn`: the appender reports the
        commit through `folded`. On PostgreSQL, after a fold that stood at the head, the fold
        writes first and its rows go with the check (`CheckpointsMoved` when it declines).
        """
        now, seq = datetime.now(UTC), appended[-1].seq
        names = [p.name for p in self.projections]
        if conn.dialect.name == "postgresql":
            asked = {
                "names": names,
                "before": before,
                "seq": seq,
                "at": now,
                "k": PROJECTOR_LOCK_ID,
            }
            if is_alone(conn):
                # The batch goes as one statement, its own transaction (ledger.append
                # `_append_alone`): the fold's writes with it, then the checkpoints moved, which
                # must all move, or nothing of it is written (and the batch is appended again in
                # a transaction, as below).
                self._fold_all(conn, appended)
                write_expecting(
                    conn,
                    _MOVE_LOCKED_CHECKPOINTS,
                    asked,
                    len(names),
                    "the inline fold's checkpoints were not all at the head before it",
                )
                self._folding_inline = True
                return True
            # After a fold that stood at the head (steady appends) this one folds first: its
            # writes wait (ledger.deferred) and go with the append's rows in the statement that
            # checks and moves the checkpoints, one round trip for the three; declined, they
            # are undone with the savepoint (`CheckpointsMoved`). Otherwise the checkpoints are
            # moved first, in the round trip that checks them: the savepoint the appender rolls
            # back to if a fold fails undoes that too.
            ahead, self._folding_inline = self._folding_inline, False  # until this one stands
            if ahead:
                self._fold_all(conn, appended)
            moved = fetch_all(conn, _MOVE_LOCKED_CHECKPOINTS, asked)
            if moved and len(moved) != len(names):
                # All stood at `before` in the statement's snapshot, but one changed before
                # the lock was won (a rebuild's swap): undo (see `append_and_fold`).
                raise RuntimeError("a checkpoint moved while the inline fold took the lock")
            if not moved:
                if ahead:
                    raise CheckpointsMoved()
                return False
            if not ahead:
                self._fold_all(conn, appended)
            self._folding_inline = True
            return True
        # The SQLite write lock excludes other runners.
        positions = {name: seq for name, seq in fetch_all(conn, _CHECKPOINTS)}
        if any(positions.get(name) != before for name in names):
            return False
        moving = [{"name": name, "seq": seq, "at": now} for name in names]
        execute_many(conn, _MOVE_CHECKPOINT, moving, prefix="b_")
        self._fold_all(conn, appended)
        return True

    def _fold_all(self, conn: sa.Connection, appended: list[RecordedEvent]) -> None:
        for projection in self.projections:
            projection.apply(conn, projection.table, appended)

    def folded(self, appended: list[RecordedEvent]) -> None:
        """After the commit of the events `fold_appended` folded (on the event loop)."""
        self.positions = {p.name: appended[-1].seq for p in self.projections}
        self._advanced(appended)

    def _advanced(self, folded: list[RecordedEvent]) -> None:
        wakes = self._wakes
        if folded and (wakes is None or any(map(wakes, folded))):
            self.advanced.set()

    async def catch_up(self) -> None:
        while await self.step():
            pass
        self.caught_up_at = time.monotonic()

    async def run(self) -> None:
        while True:
            try:
                await self.catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives a database outage
                # A projection that fails stops here and retries from the same checkpoint:
                # it never skips the event it cannot fold.
                self._failures.failed(exc)
                await asyncio.sleep(1.0)
                continue
            self._failures.succeeded()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    async def wait_for(self, seq: int, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a deadline for polling, not for one await
        """Return once every projection has folded in `seq` (read-your-writes for commands)."""
        deadline = time.monotonic() + timeout
        while True:
            async with self.engine.connect() as conn:
                positions = await read_checkpoints(conn)
            if all(positions.get(p.name, 0) >= seq for p in self.projections):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projections did not reach seq {seq} in {timeout} s")
            self._wake.set()
            await asyncio.sleep(0.005)

    async def lag(self) -> dict[str, int]:
        """Events each projection is behind the head of the log."""
        async with self.engine.connect() as conn:
            positions, head = await read_checkpoints_and_head(conn)
        return {p.name: head - positions.get(p.name, 0) for p in self.projections}
