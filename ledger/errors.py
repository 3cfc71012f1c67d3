"""The ledger's error tree. Every error the ledger raises is one of these.

LedgerError
├── StreamVersionConflict     an append expected another stream version
├── UnknownEventType          a stored type name no class is registered for
├── DuplicateTrigger          trigger.registered for an id that exists
├── InvalidIdempotencyKey     a key too long or with control characters
├── InvalidBody               a body that does not parse as its content type says
├── InvalidSignature          a signature missing, malformed, stale or wrong
├── SecretUnavailable         an encrypted secret that the key in use cannot open
├── SecretKeyMismatch         the database's secrets were sealed with another key than ours
└── StorageUnavailable        the database cannot be reached or is full
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises."""


class StreamVersionConflict(LedgerError):
    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(stream, expected, actual)
        self.stream = stream
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return f"stream {self.stream!r} is at version {self.actual}, expected {self.expected}"


class UnknownEventType(LedgerError):
    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name

    def __str__(self) -> str:
        return f"no event class is registered for type {self.type_name!r}"


class DuplicateTrigger(LedgerError):
    def __init__(self, trigger_id: str) -> None:
        super().__init__(trigger_id)
        self.trigger_id = trigger_id

    def __str__(self) -> str:
        return f"trigger {self.trigger_id!r} already exists"


class InvalidIdempotencyKey(LedgerError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid idempotency key: {self.reason}"


class InvalidBody(LedgerError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class InvalidSignature(LedgerError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid signature: {self.reason}"


class SecretUnavailable(LedgerError):
    def __str__(self) -> str:
        return "a stored secret cannot be decrypted with the configured key"


class SecretKeyMismatch(LedgerError):
    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.source = source

    def __str__(self) -> str:
        return (
            f"this database's secrets are sealed with another key than this process's "
            f"({self.source}): every signed delivery would be refused. Give every process that "
            "shares the database the same key: HOOKLEDGER_SECRET_KEY, or a copy of the key file "
            "of the first one (hookledger.key beside its SQLite file, or in .hookledger/ in its "
            "working directory)"
        )


class StorageUnavailable(LedgerError):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause

    def __str__(self) -> str:
        return f"storage unavailable: {type(self.cause).__name__}: {self.cause}"
