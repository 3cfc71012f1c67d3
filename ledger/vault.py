"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) from `cryptography`, one key per install."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from ledger.errors import SecretUnavailable


class Vault:
    """Encrypts trigger and destination secrets before they reach the log."""

    def __init__(self, key_material: str) -> None:
        # Any string serves as key material: a Fernet key is derived from it, so an operator
        # can set HOOKLEDGER_SECRET_KEY to a passphrase as well as to a generated key.
        digest = hashlib.sha256(key_material.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))
        # Names the key without giving it away (an HMAC of a constant under it): processes that
        # share a database compare it before they seal or open a secret (server/secretkey.py).
        self.fingerprint = hmac.new(digest, b"hookledger secret key check", "sha256").hexdigest()

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except (InvalidToken, ValueError) as exc:
            raise SecretUnavailable() from exc

    def opens(self, ciphertext: str) -> bool:
        try:
            self.decrypt(ciphertext)
        except SecretUnavailable:
            return False
        return True


def load_or_create_key(path: Path) -> str:
    """The key kept in `path`, created (mode 0600) on first use, or the one another process put
    there first. The file appears whole (`publish_once`): a process starting meanwhile never
    reads it empty, which would seal its secrets under the key "" and record a fingerprint that
    no later start, reading the whole key, could match."""
    if path.exists():
        return path.read_text().strip()
    key = Fernet.generate_key().decode()
    return key if publish_once(path, key) else path.read_text().strip()


def publish_once(path: Path, text: str) -> bool:
    """Put `text` and a newline in `path` (mode 0600) unless the file exists; True when this call
    made it. The file appears whole, a hard link to a complete draft: no reader ever sees it
    empty or half written, and of processes racing to make it exactly one wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    return True
