"""Who is calling and what they may spend: API-key auth, rate limits, quota, usage records.

With no live key in the database the server is open (local use; said loudly at start):
requests need no key and usage is still recorded, without a key. Once a key exists every
request needs one, as `Authorization: Bearer sk-…` (what OpenAI clients send).
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Request

from r1serve.server.db import open_database
from r1serve.server.errors import APIError
from r1serve.server.keys import KeyInfo, KeyStore
from r1serve.server.ledger import Ledger, UsageRecord
from r1serve.server.rate_limit import RateLimiter


# Whether any key exists decides if the server is open; asked per request it was a database
# round trip per request. A key created by the CLI while the server runs closes it within this.
KEYS_RECHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    key: KeyInfo | None  # None: the server is open

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def is_admin(self) -> bool:
        return self.key is not None and self.key.is_admin


class Access:
    """The platform's state for one server: keys, ledger, rate limiter."""

    def __init__(self, db_url: str, cached_weight: float = 0.25) -> None:
        self.engine: sa.Engine = open_database(db_url)
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(self.engine, cached_weight)
        self.limits = RateLimiter()
        self._pending: set[asyncio.Task] = set()
        if self.engine.dialect.name == "sqlite":  # one server owns the file: old holds are a crash's
            self.ledger.clear_reservations()

    @property
    def is_open(self) -> bool:
        return not self.keys.any_active()

    async def principal(self, request: Request) -> Principal:
        active = self.keys.recent_any_active(KEYS_RECHECK_S)
        if active is None:
            active = await asyncio.to_thread(self.keys.any_active)
        if not active:
            return Principal(None)  # whatever key a client sends (SDKs insist on one) is ignored
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…'.",
                           code="invalid_api_key")
        key = await asyncio.to_thread(self.keys.authenticate, secret.strip())
        if key is None:
            raise APIError(401, "Incorrect API key provided (unknown or revoked).", code="invalid_api_key")
        return Principal(key)

    def meter(self, principal: Principal, model: str, request_id: str) -> Meter:
        return Meter(self, principal, model, request_id)

    def in_background(self, work) -> None:
        """Settle the usage of a request whose client left (nobody awaits it)."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


class Meter:
    """One request's admission (rate limits, quota hold) and its settlement in the ledger."""

    def __init__(self, access: Access, principal: Principal, model: str, request_id: str) -> None:
        self.access, self.principal, self.model, self.request_id = access, principal, model, request_id
        self.reserved = 0
        self.started = time.monotonic()

    async def admit(self, worst_case_tokens: int) -> None:
        key = self.principal.key
        if key is None:
            return
        wait = self.access.limits.acquire(key.id, key.rpm, key.tpm, worst_case_tokens)
        if wait > 0:
            retry = "1" if math.isinf(wait) else str(math.ceil(wait))
            raise APIError(429, f"Rate limit reached for key {key.id} (rpm {key.rpm}, tpm {key.tpm}); "
                                f"retry after {retry} s", code="rate_limit_exceeded", headers={"Retry-After": retry})
        if not await asyncio.to_thread(self.access.ledger.reserve, key.id, worst_case_tokens):
            self.access.limits.give_back(key.id, worst_case_tokens)
            fresh = await asyncio.to_thread(self.access.keys.get, key.id)
            raise APIError(402, f"Insufficient quota: this request may use up to {worst_case_tokens} tokens and key "
                                f"{key.id} has {max(0, fresh.remaining_tokens - fresh.reserved_tokens)} left of "
                                f"{fresh.quota_tokens}. Lower max_tokens or ask for a larger quota.",
                           code="insufficient_quota")
        self.reserved = worst_case_tokens

    async def release(self) -> None:
        """The request never ran (rejected after admission): drop the hold, write no row."""
        if self.reserved:
            await asyncio.to_thread(self.access.ledger.release, self.principal.key_id, self.reserved)
            self.access.limits.give_back(self.principal.key_id, self.reserved)
            self.reserved = 0

    async def settle(self, prompt: int, cached: int, completion: int, reasoning: int, status: str) -> None:
        record = UsageRecord(self.request_id, self.principal.key_id, self.model, prompt, cached, completion,
                             reasoning, int((time.monotonic() - self.started) * 1000), status)
        charged = await asyncio.to_thread(self.access.ledger.settle, record, self.reserved)
        if self.principal.key is not None:
            self.access.limits.give_back(self.principal.key_id, self.reserved - charged)
        self.reserved = 0
