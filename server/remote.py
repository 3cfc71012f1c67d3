"""What an ingest worker has instead of the main process's appender and metrics registry:
both go over the ledger link (server/link.py) to the main process's."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from ledger.appender import Overdue
from ledger.commands import AppendEvents, Command, RecordDelivery
from ledger.events import NewEvent
from server.link import APPEND, COUNT, DELIVERY, METRICS, OUTCOME, LedgerLink, delivery_fields
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class RemoteAppender:
    """What a worker has instead of an appender (ledger.appender.Appender's interface)."""

    def __init__(self, link: LedgerLink, wait_s: float | None = None) -> None:
        self._link = link
        self._overdue = Overdue(wait_s) if wait_s else None  # as the main process's Appender
        self.folder = None
        self.committed = asyncio.Event()  # never set: a worker runs no projector
        # Called when the main process's appender commits a batch (its sizes are not known here).
        self.commit_listeners: list[Callable[[int, float], None]] = link.committed

    async def submit(self, command: Command) -> Any:
        if isinstance(command, RecordDelivery):
            return OUTCOME.made(await self._call(DELIVERY, delivery_fields(command)))
        return await self._call(APPEND, command)

    def _call(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        future = self._link.call(kind, payload)
        if self._overdue is not None:
            self._overdue.watch(future)
        return future

    async def append(self, events_: list[NewEvent], *, expected_version: int | None = None) -> Any:
        return await self.submit(AppendEvents(events=events_, expected_version=expected_version))

    async def run(self) -> None:
        await self._link.lost.wait()  # then `hookledger serve` stops this worker (server/cli.py)
        logger.error("evt=ledger_link_lost the main process is gone; this worker stops")

    async def close(self) -> None:
        self._link.close()


class RemoteMetrics(Metrics):
    """A worker's metrics: counts go to the main process's registry, and a scrape reads it, so
    every process answers `/metrics` with the same numbers.

    The counts of one loop iteration travel as one frame, at its end: a frame per answer cost
    the main process, the busier of the two, an unpickling and a dispatch per request. A scrape
    sends the counts made so far before its own call, so it sees every answer counted before it.
    """

    def __init__(self, link: LedgerLink) -> None:
        super().__init__()
        self._link = link
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def count_webhook(
        self, trigger_id: str, outcome: str, reason: str = "", times: int = 1
    ) -> None:
        if not self._counts:
            asyncio.get_running_loop().call_soon(self._send_counts)
        self._counts[(trigger_id, outcome, reason)] += times

    def _send_counts(self) -> None:
        counts, self._counts = self._counts, collections.Counter()
        if counts:  # (none left when a scrape took them first)
            self._link.send((COUNT, 0, [(*key, times) for key, times in counts.items()]))

    def observe_append(self, batch_size: int, seconds: float) -> None:
        """Nothing: the main process's appender observes its own batches."""

    async def page(self) -> bytes:
        self._send_counts()  # this iteration's counts first: the scrape sees them
        body: bytes = await self._link.call(METRICS, None)
        return body
