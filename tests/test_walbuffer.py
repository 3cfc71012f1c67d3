"""The SQLite writer's VFS (ledger/walbuffer.py, ledger/_walbuffer.c): a WAL's frames gathered and
written a transaction at a time, never later than SQLite's own writes could be relied on. Real
files; readers on SQLite's own VFS; a process killed right after its commits; a file that can
grow no more."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from factories import delivery as make_delivery

from ledger import walbuffer
from ledger.append import append_batch
from ledger.migrate import upgrade
from ledger.store import create_engine, read_events
from ledger.writers import SqliteWriter

REQUIRE = os.environ.get("HOOKLEDGER_REQUIRE_WALBUFFER") == "1"
ROW = "x" * 1500  # a commit of 28 rows: ~12 pages, ~24 of SQLite's writes gathered


@pytest.fixture(autouse=True)
def _built() -> None:
    if walbuffer.name() is None:
        reason = "ledger/_walbuffer.c is not built here (no C compiler when it was installed)"
        if REQUIRE:
            pytest.fail(reason + " (HOOKLEDGER_REQUIRE_WALBUFFER=1)")
        pytest.skip(reason)


def _writer(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    conn = sqlite3.connect(walbuffer.uri(str(path), walbuffer.NAME), uri=True, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as the appender's: only readers checkpoint
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    return conn


def _commit(conn: sqlite3.Connection, start: int, rows: int = 28, body: str = ROW) -> int:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO t (n, body) VALUES (?, ?)", [(start + i, body) for i in range(rows)]
    )
    conn.execute("COMMIT")
    return start + rows


def _reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)  # SQLite's own VFS


def _count(reader: sqlite3.Connection) -> tuple[int, int]:
    count, top = reader.execute("SELECT count(*), coalesce(max(n), -1) FROM t").fetchone()
    return int(count), int(top)


def _commits_seen(
    conn: sqlite3.Connection, reader: sqlite3.Connection, done: int, times: int, rows: int = 28
) -> tuple[int, int, int]:
    """`times` commits of `rows` rows, each seen whole by `reader` right after it: the rows
    committed by then, and how many writes the VFS gathered meanwhile, and wrote out."""
    gathered, written = walbuffer.counts()
    for _ in range(times):
        done = _commit(conn, done, rows)
        assert _count(reader) == (done, done - 1)
    more_gathered, more_written = walbuffer.counts()
    return done, more_gathered - gathered, more_written - written


def _intact(path: Path) -> None:
    with contextlib.closing(_reader(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_every_commit_is_in_the_file_when_another_connection_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    writer, reader = _writer(path), _reader(path)
    gathered, written = walbuffer.counts()
    done = 0
    for i in range(300):
        done = _commit(writer, done)
        # Read from the file through another connection: every row, every byte of each.
        assert _count(reader) == (done, done - 1)
        if i % 50 == 49:  # the WAL copied and started over under the writer
            assert reader.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
    lengths = reader.execute("SELECT count(*) FROM t WHERE body = ?", (ROW,)).fetchone()[0]
    assert lengths == done
    more_gathered, more_written = walbuffer.counts()
    # SQLite's two writes a frame went out a commit at a time (and each commit's WAL in one).
    assert more_gathered - gathered >= 300 * 2 * 10
    assert more_written - written <= 300 * 2
    writer.close()
    reader.close()
    _intact(path)


def test_a_transaction_past_what_it_gathers_is_written_whole(tmp_path: Path) -> None:
    # 24 MiB in one transaction: gathered bytes go out at each MiB, in pieces under the 128 KiB
    # the wrapped VFS writes a call; a rolled-back one leaves nothing, and its frames are
    # written over by the next.
    path = tmp_path / "w.db"
    writer, reader = _writer(path), _reader(path)
    bodies = [os.urandom(60_000).hex() for _ in range(200)]
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany("INSERT INTO t (n, body) VALUES (?, ?)", list(enumerate(bodies)))
    writer.execute("ROLLBACK")
    assert _count(reader) == (0, -1)
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany("INSERT INTO t (n, body) VALUES (?, ?)", list(enumerate(bodies)))
    writer.execute("COMMIT")
    stored = [body for (body,) in reader.execute("SELECT body FROM t ORDER BY n")]
    assert stored == bodies
    _commit(writer, len(bodies))
    assert _count(reader) == (len(bodies) + 28, len(bodies) + 27)
    writer.close()
    reader.close()
    _intact(path)


@pytest.mark.parametrize("synchronous", ["NORMAL", "1", "OFF", "on", "7"])
def test_a_connection_whose_commits_do_not_sync_has_its_writes_made_at_once(
    tmp_path: Path, synchronous: str
) -> None:
    # Only a commit that syncs its WAL reports a failed write as its own error before it is
    # published: the others' writes are SQLite's own, one by one, as without this VFS.
    path = tmp_path / "w.db"
    writer, reader = _writer(path, synchronous), _reader(path)
    done, gathered, _ = _commits_seen(writer, reader, 0, 20)
    assert gathered == 0
    writer.execute("PRAGMA synchronous=FULL")
    # Seen to sync its WAL: from the next commit on, gathered.
    done, gathered, _ = _commits_seen(writer, reader, done, 1)
    assert gathered == 0
    done, gathered, _ = _commits_seen(writer, reader, done, 1)
    assert gathered > 0
    writer.execute("PRAGMA synchronous=NORMAL")
    done, gathered, _ = _commits_seen(writer, reader, done, 1)
    assert gathered == 0
    writer.close()
    reader.close()
    _intact(path)


def test_a_pragma_that_sqlite_refused_does_not_turn_gathering_on(tmp_path: Path) -> None:
    # Inside a transaction SQLite refuses to change the safety level, after the VFS was told
    # of the PRAGMA: the commits still do not sync, and are seen not to.
    path = tmp_path / "w.db"
    writer, reader = _writer(path, "NORMAL"), _reader(path)
    done = _commit(writer, 0)
    writer.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="transaction"):
        writer.execute("PRAGMA synchronous=FULL")
    writer.execute("COMMIT")
    assert writer.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    _, gathered, _ = _commits_seen(writer, reader, done, 10)
    assert gathered == 0
    writer.close()
    reader.close()
    _intact(path)


def test_a_file_without_power_safe_overwrite_has_its_writes_made_at_once(tmp_path: Path) -> None:
    # There SQLite pads a commit to a sector and writes part of it after the sync.
    path = tmp_path / "w.db"
    conn = sqlite3.connect(
        walbuffer.uri(str(path), walbuffer.NAME) + "&psow=0", uri=True, isolation_level=None
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    reader = _reader(path)
    _, gathered, _ = _commits_seen(conn, reader, 0, 10, rows=5)
    assert gathered == 0
    conn.close()
    reader.close()
    _intact(path)


@pytest.mark.parametrize("synchronous", ["FULL", "full", "2", "EXTRA", "3"])
def test_a_connection_whose_commits_sync_has_its_wal_gathered(
    tmp_path: Path, synchronous: str
) -> None:
    path = tmp_path / "w.db"
    writer, reader = _writer(path, synchronous), _reader(path)
    _, gathered, written = _commits_seen(writer, reader, 0, 10)
    assert gathered >= 10 * 2 * 10
    assert written <= 10 * 2
    writer.close()
    reader.close()


def test_a_rolled_back_transactions_frames_never_overwrite_a_later_commit(tmp_path: Path) -> None:
    # A transaction larger than its connection's cache writes frames before its COMMIT (a
    # spill); rolled back, they are past the WAL's last commit and the write lock is released.
    # Another connection (here SQLite's own VFS, the async engine's) then writes its commit at
    # those very offsets and syncs it: the rolled-back frames must not reach the file after it.
    path = tmp_path / "w.db"
    writer, other = _writer(path), _reader(path)
    writer.execute("PRAGMA cache_size=10")
    _commit(writer, 0)
    # The WAL copied and started over: the next frames are written from its first.
    assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany(
        "INSERT INTO t (n, body) VALUES (?, ?)", [(1000 + i, "r" * 1500) for i in range(200)]
    )
    writer.execute("ROLLBACK")
    other.execute("PRAGMA synchronous=FULL")
    other.execute("BEGIN IMMEDIATE")
    other.executemany(
        "INSERT INTO t (n, body) VALUES (?, ?)", [(28 + i, "o" * 1500) for i in range(28)]
    )
    other.execute("COMMIT")
    # The writer reads the other's commit from the WAL, then goes on and closes.
    assert _count(writer) == (56, 55)
    writer.close()
    assert _count(other) == (56, 55)
    other.close()
    _intact(path)
    with contextlib.closing(_reader(path)) as reader:
        assert _count(reader) == (56, 55)


def _child(
    script: str, *args: str, preexec: Callable[[], None] | None = None
) -> subprocess.Popen[str]:
    program = textwrap.dedent(
        """
        import json, os, resource, signal, sqlite3, sys
        from ledger import walbuffer
        NAME = walbuffer.name()
        assert NAME is not None
        def writer(path):
            conn = sqlite3.connect(walbuffer.uri(path, NAME), uri=True, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            return conn
        def commit(conn, start, rows=28):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO t VALUES (?, ?)", [(start + i, "x" * 1500) for i in range(rows)]
            )
            conn.execute("COMMIT")
            return start + rows
        """
    ) + textwrap.dedent(script)
    return subprocess.Popen(  # noqa: S603 - this interpreter, a script of these tests
        [sys.executable, "-c", program, *args],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # noqa: PLW1509 - limits set before the child starts
    )


def test_what_was_committed_is_in_the_file_when_the_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    child = _child(
        """
        conn, done = writer(sys.argv[1]), 0
        while True:
            done = commit(conn, done)
            print(done, flush=True)
        """,
        str(path),
    )
    assert child.stdout is not None
    acknowledged = 0
    while acknowledged < 2000:
        acknowledged = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    with contextlib.closing(_reader(path)) as reader:
        count, top = _count(reader)
    # Every commit it said was made is there (and at most the one it was making when killed).
    assert acknowledged <= count <= acknowledged + 28 * 2
    assert top == count - 1
    _intact(path)


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_write_the_disk_refuses_fails_its_commit_and_spoils_nothing(tmp_path: Path) -> None:
    # The gathered frames are written in the WAL's sync: a write that fails there (EFBIG here, a
    # full disk elsewhere) is the COMMIT's error, the commits before stay whole, and once the
    # file may grow again the same connection commits as before.
    path = tmp_path / "w.db"
    child = _child(
        """
        conn, done, failed = writer(sys.argv[1]), 0, None
        while failed is None and done < 100_000:
            try:
                done = commit(conn, done)
            except sqlite3.OperationalError as exc:
                failed = str(exc)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        committed = done
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        done = commit(conn, done + 1000)
        print(json.dumps({"failed": failed, "committed": committed, "after": done}))
        """,
        str(path),
        preexec=_limit_file_size,
    )
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    result = json.loads(out)
    assert result["failed"] is not None, "the file never reached its limit"
    assert "disk" in result["failed"] or "full" in result["failed"], result
    with contextlib.closing(_reader(path)) as reader:
        rows = [n for (n,) in reader.execute("SELECT n FROM t ORDER BY n")]
    committed, after = result["committed"], result["after"]
    assert rows == [*range(committed), *range(committed + 1000, after)]
    _intact(path)


async def test_the_appenders_writer_gathers_its_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    await upgrade(engine)
    writer = SqliteWriter(engine)
    gathered, written = walbuffer.counts()

    def append(keys: list[str]) -> Callable[[sa.Connection], object]:
        return lambda conn: append_batch(conn, [make_delivery(key) for key in keys])

    try:
        for batch in range(20):
            await writer.run(append([f"k{batch}-{i}" for i in range(16)]))
    finally:
        writer.close()
    more_gathered, more_written = walbuffer.counts()
    assert more_gathered - gathered >= 20 * 2 * 8  # the events' and their indexes' pages
    assert more_written - written <= 20 * 2
    async with engine.connect() as conn:
        stored = await read_events(conn, limit=1000, types=["webhook.received"])
    await engine.dispose()
    assert len(stored) == 20 * 16
