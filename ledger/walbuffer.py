"""The SQLite writer's VFS: each transaction's WAL frames written in one system call.

SQLite writes a WAL frame with two `pwrite`s, its 24-byte header and then its page: ~110 calls a
commit of 28 deliveries, at ~4 us each on this project's machines (bench/README.md, session 16).
`ledger/_walbuffer.c`, built with the package where a C compiler is at hand, wraps SQLite's
default VFS and gathers a WAL's contiguous writes until they must reach the file: before the
WAL is synced (every commit, with synchronous=FULL), read, truncated, sized or closed, before
a commit is published to other connections, and before the WAL's write lock is released (what a
rolled-back transaction spilled must not land later on the next writer's commit). The bytes,
their offsets and the fsync that makes them durable are the same; only the number of calls
changes. It gathers only while a connection's commits are known to sync the WAL before they
are published (it said `PRAGMA synchronous=FULL` or EXTRA, and its last commit was seen to
sync), so a write that fails is always the commit's own error.

Only the plain connections that write (`ledger/store.py` `plain_sqlite_engine`: the appender's
and a rebuild's) open their file through it; every other connection, in this process or another,
reads and locks the same file through SQLite's own VFS, which is what this one calls for
everything but those writes. Without the compiled module (no compiler where it was installed),
`name()` is None and the writer opens its file as every other connection does.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import urllib.parse
from typing import Any

logger = logging.getLogger(__name__)

NAME = "hookledger-wal"


@functools.cache
def _module() -> Any:
    """The compiled module, its VFS registered in this process's SQLite once; None where it is
    not built, or not in the SQLite library the stdlib's module loaded."""
    try:
        from ledger import _walbuffer  # type: ignore[attr-defined]
    except ImportError:
        logger.info("evt=walbuffer_missing detail=the_writer_uses_sqlites_own_vfs")
        return None
    _walbuffer.register(NAME)
    # Registered in the SQLite library the stdlib's module loaded (the same shared library),
    # or opening a file through it says "no such vfs": then not used at all.
    try:
        sqlite3.connect(f"file:hookledger-vfs-check?mode=memory&vfs={NAME}", uri=True).close()
    except sqlite3.OperationalError:
        logger.warning("evt=walbuffer_unavailable detail=another_sqlite_library")
        return None
    return _walbuffer


def name() -> str | None:
    """The VFS's name; None where it is not built."""
    return NAME if _module() is not None else None


def uri(path: str, vfs: str) -> str:
    """An SQLite URI opening the file `path` through `vfs`."""
    return f"file:{urllib.parse.quote(path, safe='/')}?vfs={vfs}"


def counts() -> tuple[int, int]:
    """(WAL writes gathered, writes that carried them to the file) in this process so far."""
    module = _module()
    if module is None:
        return 0, 0
    gathered, written = module.counts()
    return int(gathered), int(written)
