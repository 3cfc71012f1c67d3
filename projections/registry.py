"""Every projection hookledger keeps, by name."""

from __future__ import annotations

from projections import trigger_executions, trigger_stats, triggers
from projections.base import Projection, RowProjection

TRIGGERS = RowProjection(
    name=triggers.NAME,
    table=triggers.table,
    key_column="id",
    key_of=triggers.key_of,
    evolve=triggers.evolve,
    shadow=triggers.shadow_table,
    keyed_by_stream=True,  # stream trigger-<id>
)

TRIGGER_EXECUTIONS = RowProjection(
    name=trigger_executions.NAME,
    table=trigger_executions.table,
    key_column="execution_id",
    key_of=trigger_executions.execution_id_of,
    evolve=trigger_executions.evolve,
    shadow=trigger_executions.shadow_table,
    indexes=trigger_executions.INDEXES,
    keyed_by_stream=True,  # stream execution-<id>
    bulk=trigger_executions.BULK,
    increment=trigger_executions.INCREMENT,
)

TRIGGER_STATS = trigger_stats.PROJECTION

PROJECTIONS: dict[str, Projection] = {
    p.name: p for p in (TRIGGERS, TRIGGER_EXECUTIONS, TRIGGER_STATS)
}
