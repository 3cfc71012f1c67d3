"""ledger.fields: a frozen dataclass to the tuple of its fields and back, without its __init__."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from datetime import UTC, datetime

import pytest

from ledger.commands import DeliveryOutcome
from ledger.events import NewEvent, RecordedEvent
from ledger.fields import Fields


@dataclass(frozen=True, slots=True)
class _Checked:
    name: str
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a name is required")


@pytest.mark.parametrize(
    "value",
    [
        RecordedEvent(
            seq=1,
            id="id",
            stream="s",
            version=1,
            type="webhook.received",
            trigger_id="t",
            idempotency_key=None,
            data={"a": [1]},
            meta={},
            recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
            hash="h",
        ),
        NewEvent(stream="s", type="webhook.received", trigger_id="t", data={"a": 1}),
        DeliveryOutcome(
            event_id="e", execution_id="x", is_duplicate=True, original_event_id="o", seq=3
        ),
        _Checked("n", ["a"]),
    ],
)
def test_a_value_made_from_its_fields_equals_it(value: object) -> None:
    fields = Fields(type(value))
    made = fields.made(fields.of(value))
    assert made == value and type(made) is type(value)
    assert fields.of(made) == fields.of(value)


def test_made_sets_the_fields_without_init_and_the_value_stays_frozen() -> None:
    fields = Fields(_Checked)
    made = fields.made(("", ["kept"]))  # __post_init__ would refuse it: restored, not built
    assert (made.name, made.tags) == ("", ["kept"])
    with pytest.raises(FrozenInstanceError):
        made.name = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("values", [("only one",), ("a", [], "one too many")])
def test_made_refuses_more_or_fewer_values_than_fields(values: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        Fields(_Checked).made(values)
