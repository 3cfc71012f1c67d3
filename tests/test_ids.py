"""Event and execution ids: version-7 UUIDs, each after the last one this process made."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from ledger import events
from ledger.events import uuid7


def test_ids_made_one_after_another_sort_in_that_order_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(20_000)]  # hundreds a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert len({i[:13] for i in ids}) < len(ids)  # some shared their millisecond


def test_a_clock_stepped_back_still_gives_a_later_id(monkeypatch: pytest.MonkeyPatch) -> None:
    future = int(uuid.UUID("7fffffff-ffff-7abc-bfff-fffffffffff0"))
    monkeypatch.setattr(events, "_last_uuid7", future)
    made = uuid.UUID(uuid7())
    assert made.int == future + 1
    assert (made.version, made.variant) == (7, uuid.RFC_4122)


@pytest.mark.parametrize(
    ("last", "after"),
    [
        # rand_b full: carried into rand_a, past the variant bits
        ("01890000-0000-7abc-bfff-ffffffffffff", "01890000-0000-7abd-8000-000000000000"),
        # rand_a full too: into the milliseconds, past the version bits
        ("01890000-0000-7fff-bfff-ffffffffffff", "01890000-0001-7000-8000-000000000000"),
    ],
)
def test_the_next_id_carries_past_the_version_and_variant_bits(last: str, after: str) -> None:
    assert uuid.UUID(int=events._after(int(uuid.UUID(last)))) == uuid.UUID(after)


def test_threads_never_make_the_same_id() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(uuid7() for _ in range(20_000))

    threads = [threading.Thread(target=make, args=(m,)) for m in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for m in made for i in m}) == 80_000
    assert all(m == sorted(m) for m in made)


def test_a_forked_child_does_not_go_on_from_its_parents_last_id() -> None:
    uuid7()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id is not its parent's last one's successor
        os.write(write, str(events._last_uuid7).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "0"
    os.waitpid(pid, 0)
