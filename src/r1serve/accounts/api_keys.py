"""API keys: `sk-` secrets shown once, stored only as a SHA-256 hash.

The secrets are 32 random bytes (not passwords), so a fast hash is enough: nobody can
search the space, and the hash lets a request's key be found by index. The found hash is
still compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from r1serve.errors import InvalidRequestError
from r1serve.accounts.database import api_keys, as_utc, reading, utcnow


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    is_admin: bool
    quota_tokens: int | None
    rpm: int | None
    tpm: int | None
    used_tokens: int
    created_at: str
    revoked: bool

    @property
    def remaining_tokens(self) -> int | None:
        return None if self.quota_tokens is None else max(0, self.quota_tokens - self.used_tokens)

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "prefix": self.prefix, "is_admin": self.is_admin,
                "quota_tokens": self.quota_tokens, "used_tokens": self.used_tokens,
                "remaining_tokens": self.remaining_tokens, "rpm": self.rpm, "tpm": self.tpm,
                "created_at": self.created_at, "revoked": self.revoked}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_limits(quota_tokens: int | None, rpm: int | None, tpm: int | None) -> None:
    for name, value in (("quota_tokens", quota_tokens), ("rpm", rpm), ("tpm", tpm)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidRequestError(f"{name}={value!r} must be an integer >= 0 (or unset for no limit)")


class KeyStore:
    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        self._has_keys: tuple[bool, float] = (False, -math.inf)  # has_keys()'s last answer, and when

    def create(self, name: str, quota_tokens: int | None = None, rpm: int | None = None, tpm: int | None = None,
               is_admin: bool = False) -> tuple[KeyInfo, str]:
        """A new key and its secret; the secret is not stored and cannot be shown again."""
        if not name or len(name) > 200:
            raise InvalidRequestError("a key needs a name of 1 to 200 characters")
        _check_limits(quota_tokens, rpm, tpm)
        secret = "sk-" + secrets.token_hex(32)
        key_id = "key_" + secrets.token_hex(6)
        with self.db.begin() as conn:
            conn.execute(api_keys.insert().values(
                id=key_id, name=name, key_hash=hash_secret(secret), prefix=secret[:7] + "…", is_admin=is_admin,
                quota_tokens=quota_tokens, rpm=rpm, tpm=tpm, used_tokens=0, created_at=utcnow()))
        self._has_keys = (True, math.inf)  # after the commit; and keys are never deleted: closed for good
        return self.get(key_id), secret

    def get(self, key_id: str) -> KeyInfo:
        with reading(self.db) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise InvalidRequestError(f"no API key with id {key_id!r}; `r1serve keys list` shows them")
        return _info(row)

    def list(self, include_revoked: bool = False) -> list[KeyInfo]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with reading(self.db) as conn:
            return [_info(r) for r in conn.execute(query)]

    def has_keys(self) -> bool:
        """Whether a key was ever created, revoked or not: that, not whether one is live,
        closes a server. (Asking for a live one let revoking the last key open the server to
        everyone, the revoked key included.)"""
        with reading(self.db) as conn:
            found = conn.execute(sa.select(api_keys.c.id).limit(1)).first() is not None
        # Keys are never deleted, so a yes is final and needs no asking again.
        self._has_keys = (True, math.inf) if found else (False, time.monotonic())
        return found

    def recent_has_keys(self, max_age_s: float) -> bool | None:
        """has_keys()'s last answer if it is final or younger than max_age_s, else None (ask
        again). A key created through this store closes it at once; through another process
        (the CLI, a second server) within max_age_s."""
        found, at = self._has_keys
        return found if found or time.monotonic() - at < max_age_s else None

    def revoke(self, key_id: str) -> KeyInfo:
        with self.db.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
        return self.get(key_id)

    def update(self, key_id: str, **limits) -> KeyInfo:
        """Set quota_tokens / rpm / tpm; a value of None removes that limit."""
        unknown = set(limits) - {"quota_tokens", "rpm", "tpm"}
        if unknown:
            raise InvalidRequestError(f"cannot update {sorted(unknown)}; updatable: quota_tokens, rpm, tpm")
        _check_limits(limits.get("quota_tokens"), limits.get("rpm"), limits.get("tpm"))
        self.get(key_id)  # a clear error for unknown ids
        if limits:
            with self.db.begin() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**limits))
        return self.get(key_id)

    def authenticate(self, secret: str) -> KeyInfo | None:
        """The live key a secret belongs to, or None (unknown or revoked)."""
        digest = hash_secret(secret)
        with reading(self.db) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return _info(row)


def _info(row) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.prefix, bool(row.is_admin), row.quota_tokens, row.rpm, row.tpm,
                   int(row.used_tokens), as_utc(row.created_at).isoformat(),
                   row.revoked_at is not None)
