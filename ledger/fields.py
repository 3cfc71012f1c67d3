"""A frozen dataclass as the tuple of its fields' values, and back, cheaply.

A frozen dataclass's `__init__` matches its keywords, then sets each field through
`object.__setattr__`: ~2.2 us for an event of eleven fields. Where many are made from values
already checked — every event read from the log (`ledger.store.to_recorded`), every delivery
across the ledger link (`server.link`), a delivery's new event and its outcome in the append
(`ledger.events.new_event`, `ledger.commands`) — they are restored instead, as pickle restores
an object: its slots set through their own descriptors, without `__init__` (~0.8 us). Every
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
        setters = tuple(kind.__dict__[name].__set__ for name in names)  # slots' descriptors
        self.made: Callable[[tuple[Any, ...]], T] = _maker(kind, setters)
        """`made(values)`: the value whose fields are `values`, in order (ValueError when there
        are more or fewer)."""


def _maker(kind: type[T], setters: tuple[Callable[[Any, Any], None], ...]) -> Callable[..., T]:
    """`made`, written out for `kind` as dataclasses writes an `__init__`: the tuple unpacked
    at once and each slot set by its own descriptor, bound as a default. A loop over the
    setters (`zip`) cost 1.6 us an event of eleven fields, this 0.8: every event read from the
    log, every delivery's event, outcome and link frame is made so."""
    values = ", ".join(f"v{n}" for n in range(len(setters)))
    bound = ", ".join(f"s{n}=setters[{n}]" for n in range(len(setters)))
    lines = [
        f"def made(values, new=new, kind=kind, {bound}):",
        f"    ({values},) = values",
        "    value = new(kind)",
        *(f"    s{n}(value, v{n})" for n in range(len(setters))),
        "    return value",
    ]
    namespace: dict[str, Any] = {"new": object.__new__, "kind": kind, "setters": setters}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own text, of names we made
    made: Callable[..., T] = namespace["made"]
    return made
