"""Prometheus metrics of one hookledger process, on a registry of its own (one per app).

Call sites only count and observe (`count_webhook`, `observe_attempt`, `observe_append`); what
lives in the database (executions by status, dispatcher backlog, projector lag) is read at scrape
time by server.monitoring and set here with `set_gauges`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
APPEND_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
ATTEMPT_OUTCOMES = ("succeeded", "failed_transient", "failed_permanent")


class Metrics:
    """Every metric hookledger exposes; thread-safe and cheap to call from any coroutine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._webhooks = Counter(
            "hookledger_webhooks_received",
            "Deliveries answered by the receiver, by trigger and outcome "
            "(accepted, duplicate, rejected; reason: the error code of a rejection).",
            ["trigger_id", "outcome", "reason"],
            registry=r,
        )
        # The labelled children by label values, since `.labels()` checks and joins its
        # arguments on every call. It holds the very children the counter keeps (one per label
        # set ever counted), so it grows only as they do.
        self._webhook_children: dict[tuple[str, str, str], Counter] = {}
        self._attempts = Histogram(
            "hookledger_dispatch_attempt_seconds",
            "Duration of dispatch attempts, by trigger and outcome.",
            ["trigger_id", "outcome"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self._append_size = Histogram(
            "hookledger_append_batch_size",
            "Commands committed together by the group-commit appender.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self._append_seconds = Histogram(
            "hookledger_append_batch_seconds",
            "Duration of one append transaction, commit included.",
            buckets=APPEND_SECONDS_BUCKETS,
            registry=r,
        )
        self._executions = Gauge(
            "hookledger_executions",
            "Executions by status (trigger_executions).",
            ["status"],
            registry=r,
        )
        self._backlog = Gauge(
            "hookledger_dispatch_backlog",
            "Executions due for an attempt now (pending, retrying or with an expired lease).",
            registry=r,
        )
        self._lag_events = Gauge(
            "hookledger_projection_lag_events",
            "Events a projection is behind the log.",
            ["projection"],
            registry=r,
        )
        self._lag_seconds = Gauge(
            "hookledger_projection_lag_seconds",
            "Age of the oldest event a projection has not folded in (0 when caught up).",
            ["projection"],
            registry=r,
        )
        self._database_up = Gauge(
            "hookledger_database_up", "1 when the last scrape could read the database.", registry=r
        )

    def count_webhook(
        self, trigger_id: str, outcome: str, reason: str = "", times: int = 1
    ) -> None:
        """`times` answered deliveries: `accepted`, `duplicate` or `rejected` (with its reason)."""
        key = (trigger_id, outcome, reason)
        child = self._webhook_children.get(key)
        if child is None:
            child = self._webhook_children[key] = self._webhooks.labels(*key)
        child.inc(times)

    def observe_attempt(self, trigger_id: str, outcome: str, seconds: float) -> None:
        """One dispatch attempt: outcome `succeeded`, `failed_transient` or `failed_permanent`."""
        self._attempts.labels(trigger_id, outcome).observe(seconds)

    def observe_append(self, batch_size: int, seconds: float) -> None:
        """One committed append batch (the appender's commit listener)."""
        self._append_size.observe(batch_size)
        self._append_seconds.observe(seconds)

    def set_gauges(
        self,
        *,
        executions: Mapping[str, int],
        backlog: int,
        lag: Mapping[str, tuple[int, float]],
    ) -> None:
        for status, count in executions.items():
            self._executions.labels(status).set(count)
        self._backlog.set(backlog)
        for name, (events, seconds) in lag.items():
            self._lag_events.labels(name).set(events)
            self._lag_seconds.labels(name).set(seconds)
        self._database_up.set(1)

    def set_database_down(self) -> None:
        """The gauges read from the database are unknown while it cannot be read: the labelled
        ones leave the page (a dashboard shows no data, not the last scrape's numbers as if
        current) and the backlog reads NaN, until a scrape reads them again (`set_gauges`)."""
        self._database_up.set(0)
        for gauge in (self._executions, self._lag_events, self._lag_seconds):
            gauge.clear()
        self._backlog.set(math.nan)

    def render(self) -> bytes:
        return generate_latest(self.registry)
