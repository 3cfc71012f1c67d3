"""The append-only event store: events, group-commit appends, reads, keys, signatures, chain."""

from ledger.append import append_commands
from ledger.appender import Appender
from ledger.commands import Appended, AppendEvents, DeliveryOutcome, RecordDelivery
from ledger.errors import LedgerError, StorageUnavailable, StreamVersionConflict
from ledger.events import NewEvent, RecordedEvent
from ledger.store import create_engine, iter_events, read_events, read_stream, write_transaction

__all__ = [
    "AppendEvents",
    "Appended",
    "Appender",
    "DeliveryOutcome",
    "LedgerError",
    "NewEvent",
    "RecordDelivery",
    "RecordedEvent",
    "StorageUnavailable",
    "StreamVersionConflict",
    "append_commands",
    "create_engine",
    "iter_events",
    "read_events",
    "read_stream",
    "write_transaction",
]
