"""A frozen dataclass as the tuple of its fields' values, and back, cheaply.

A frozen dataclass's `__init__` matches its keywords, then sets each field through
`object.__setattr__`: ~2.2 us for an event of eleven fields. Where many are made from values
already checked — every event read from the log (`ledger.store.to_recorded`), every delivery
across the ledger link (`server.link`), a delivery's new event and its outcome in the append
(`ledger.events.new_event`, `ledger.commands`) — they are restored instead, as pickle restores
an object: its slots set through their own descriptors, without `__init__` (~1.3 us). Every
field is given, so none is left to a default.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Fields(Generic[T]):
    """`of(value)`: the tuple of its fields, in their order; `made(values)`: the value back."""

    def __init__(self, kind: type[T]) -> None:
        self._kind = kind
        names = tuple(f.name for f in dataclasses.fields(kind))  # type: ignore[arg-type]
        getter = operator.attrgetter(*names)  # a tuple (of two names or more), made in C
        self.of: Callable[[T], tuple[Any, ...]] = (
            getter if len(names) > 1 else lambda value: (getter(value),)
        )
        self._setters = tuple(kind.__dict__[name].__set__ for name in names)  # slots' descriptors

    def made(self, values: tuple[Any, ...]) -> T:
        made = object.__new__(self._kind)
        for setter, value in zip(self._setters, values, strict=True):
            setter(made, value)
        return made
