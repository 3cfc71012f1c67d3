"""Settings of one hookledger process, from the environment and the command line."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ledger.store import normalise_url
from ledger.vault import load_or_create_key, publish_once

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./hookledger.db"
MAX_BODY_BYTES = 1024 * 1024
TOKEN_FILE = "hookledger.token"  # noqa: S105 - a file name, not a secret


LOG_FORMATS = ("auto", "text", "json")
DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


class InvalidSetting(ValueError):
    """A HOOKLEDGER_* variable whose value cannot be used; `hookledger` says it in one line."""


def _flag(name: str) -> bool:
    value = os.environ[name].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    # A typo ("ture") must not quietly mean off: it is refused as other bad values are.
    if value in ("", "0", "false", "no", "off"):
        return False
    raise InvalidSetting(f"{name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def _number(name: str, default: float, *, minimum: float = 0.0, above: bool = False) -> float:
    """`name` as a finite number at least `minimum` (more than it when `above`): NaN, an
    infinity or a negative time would otherwise start a server that misbehaves quietly."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        bound = f"{'>' if above else '>='} {minimum:g}"
        raise InvalidSetting(f"{name}={text!r}: expected a number {bound}")
    return value


def _count(name: str, default: int, *, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise InvalidSetting(f"{name}={text!r}: expected a whole number >= {minimum}")
    return value


def _database_url(given: str) -> str:
    """`given` with its asyncio driver, when it names a backend hookledger runs on: another (or
    no URL at all) would fail at its first connection with a traceback from deep inside."""
    url = normalise_url(given)
    try:
        driver = make_url(url).drivername
    except ArgumentError:
        driver = ""
    if driver not in DRIVERS:
        # Not shown: a URL may carry a password, and this one may not parse to hide it.
        raise InvalidSetting(
            "the database URL (HOOKLEDGER_DATABASE_URL or --database-url) is neither "
            "sqlite:///FILE nor postgresql://USER@HOST/DATABASE"
        )
    return url


def _log_format(name: str) -> str:
    text = os.environ.get(name, "auto")
    if text not in LOG_FORMATS:
        raise InvalidSetting(f"{name}={text!r}: expected one of {', '.join(LOG_FORMATS)}")
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None
    secret_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    allow_private_destinations: bool | None = None  # None: implied by a loopback-only listener
    replay_interval_s: float = 60.0
    dispatch: bool = True
    lease_s: float = 30.0  # a claim outlives its attempt's timeout by this much
    dispatch_poll_s: float = 1.0  # longest sleep between looks for due executions
    dispatch_concurrency: int = 64  # attempts in flight in this process, all destinations
    destination_concurrency: int = 8  # attempts in flight in this process to one destination
    projector: bool = True
    log_format: str = "auto"
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # a webhook's body must arrive within this of its head; 0: none
    # A delivery not committed within this is answered 503 + Retry-After (it may still commit:
    # the sender's retry is then its duplicate); 0: no limit. Senders give up after ~10-30 s.
    append_timeout_s: float = 10.0
    admin_rate_per_s: float = 50.0  # per client address; 0 turns the admin API limit off
    admin_rate_burst: float = 200.0
    ready_max_lag_s: float = 60.0  # /readyz fails when a projection is further behind
    workers: int = 0  # serve: ingest worker processes beside the main one (server/ingest.py)
    data_dir: Path = field(default_factory=lambda: Path("."))

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        settings = cls(
            database_url=env.get("HOOKLEDGER_DATABASE_URL", DEFAULT_DATABASE_URL),
            admin_token=env.get("HOOKLEDGER_ADMIN_TOKEN") or None,
            secret_key=env.get("HOOKLEDGER_SECRET_KEY") or None,
            max_body_bytes=_count("HOOKLEDGER_MAX_BODY_BYTES", MAX_BODY_BYTES, minimum=1),
            allow_private_destinations=(
                _flag("HOOKLEDGER_ALLOW_PRIVATE_DESTINATIONS")
                if "HOOKLEDGER_ALLOW_PRIVATE_DESTINATIONS" in env
                else None
            ),
            replay_interval_s=_number("HOOKLEDGER_REPLAY_INTERVAL_S", 60),
            lease_s=_number("HOOKLEDGER_LEASE_S", 30),
            # 0 would have the dispatcher query the database in a busy loop.
            dispatch_poll_s=_number("HOOKLEDGER_DISPATCH_POLL_S", 1, above=True),
            # 0 would start no attempt ever, without a word.
            dispatch_concurrency=_count("HOOKLEDGER_DISPATCH_CONCURRENCY", 64, minimum=1),
            destination_concurrency=_count("HOOKLEDGER_DESTINATION_CONCURRENCY", 8, minimum=1),
            log_format=_log_format("HOOKLEDGER_LOG_FORMAT"),
            ready_max_lag_s=_number("HOOKLEDGER_READY_MAX_LAG_S", 60),
            header_timeout_s=_number("HOOKLEDGER_HEADER_TIMEOUT_S", 10),
            body_timeout_s=_number("HOOKLEDGER_BODY_TIMEOUT_S", 30),
            append_timeout_s=_number("HOOKLEDGER_APPEND_TIMEOUT_S", 10),
            admin_rate_per_s=_number("HOOKLEDGER_ADMIN_RATE_PER_S", 50),
            # A bucket that holds less than one token never lets a request through.
            admin_rate_burst=_number("HOOKLEDGER_ADMIN_RATE_BURST", 200, minimum=1),
            workers=_count("HOOKLEDGER_WORKERS", default_workers(), minimum=0),
        )
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
        return replace(settings, database_url=_database_url(settings.database_url)).with_data_dir()

    def with_data_dir(self) -> Settings:
        """State files (key, token) live beside the SQLite file, or in ./.hookledger otherwise."""
        if self.is_sqlite:
            path = self.database_url.split("///", 1)[-1]
            return replace(self, data_dir=Path(path).resolve().parent)
        return replace(self, data_dir=Path(".hookledger").resolve())

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def private_destinations_allowed(self) -> bool:
        if self.allow_private_destinations is not None:
            return self.allow_private_destinations
        return self.is_loopback_only

    def resolved_secret_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        key = load_or_create_key(self.key_file)
        if not key:
            # Left by an older version's start racing another (the file made, then written):
            # taken as the key "", anyone could derive it and open every secret sealed with it.
            raise InvalidSetting(
                f"the key file {self.key_file} is empty: put the key back (from a backup or "
                "another host), or delete the file if no secret was ever sealed with it"
            )
        return key

    @property
    def key_file(self) -> Path:
        return self.data_dir / "hookledger.key"

    @property
    def secret_key_source(self) -> str:
        """Where the key that seals secrets comes from, for an error that names it."""
        return "HOOKLEDGER_SECRET_KEY" if self.secret_key else f"the key file {self.key_file}"

    @property
    def token_path(self) -> Path:
        return self.data_dir / TOKEN_FILE

    def resolved_admin_token(self) -> str:
        """The admin token: the configured one, else the one kept in the data directory,
        generated by whichever command needs it first."""
        if self.admin_token:
            return self.admin_token
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError:
            return _generate_token(self.token_path)

    def claim_token_showing(self) -> bool:
        """Whether this process is the one to show the generated token (`serve`, once it
        listens): true once per generated token, whichever process generated it; never for a
        configured one."""
        if self.admin_token:
            return False
        try:
            _unshown(self.token_path).unlink()
        except FileNotFoundError:
            return False
        return True


def _unshown(token_path: Path) -> Path:
    """A generated token's mark, until a `serve` has shown it (`claim_token_showing`)."""
    return token_path.with_name(token_path.name + ".unshown")


def _generate_token(path: Path) -> str:
    """A new token in `path`, or the one another process put there first. The file appears
    whole (a hard link to a complete draft), so no reader sees it empty; and marked unshown, so
    the first `serve` shows it even when another command generated it (SPEC: shown once)."""
    token = secrets.token_urlsafe(32)
    if not publish_once(path, token):
        return path.read_text().strip()
    # After the link: a serve that reads the token before this mark exists only leaves the
    # showing to the next one; a mark made before could outlive the token another process won.
    _unshown(path).touch(mode=0o600)
    return token


def default_workers() -> int:
    """`serve`'s ingest workers when HOOKLEDGER_WORKERS is unset: one where there is a second
    core (HTTP in the worker, the one writer in the main process: each on a core of its own),
    none on a single core. One worker keeps a single process answering HTTP, so per-process state
    (rate-limit buckets, the trigger cache) stays exact (docs/decisions.md)."""
    return 1 if (os.cpu_count() or 1) >= 2 else 0
