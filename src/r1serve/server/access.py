"""Who is calling and what they may spend: API-key auth, rate limits, quota, usage records.

Until the first key is created the server is open (local use; said loudly at start):
requests need no key and usage is still recorded, without a key. Once a key has been
created every request needs a live one, as `Authorization: Bearer sk-…` (what OpenAI
clients send), for good: revoking every key locks the server, it does not open it again.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Request

from r1serve.server.admission import AdmissionControl, Refused, ServerLease, counted
from r1serve.server.db import open_database
from r1serve.server.errors import APIError
from r1serve.server.keys import KeyInfo, KeyStore
from r1serve.server.ledger import Ledger, UsageRecord

# While no key exists the server is open; asked per request that was a database round trip
# per request. A key created elsewhere (the CLI, another server) closes it within this.
# Once closed it stays closed, so closed servers never ask again.
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
    """The platform's state: keys and ledger (the CLI's too), and for a server its lease and
    admission control (`start_lease`)."""

    def __init__(self, db_url: str, cached_weight: float = 0.25) -> None:
        self.engine: sa.Engine = open_database(db_url)
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(self.engine, cached_weight)
        self.admission: AdmissionControl | None = None
        self._pending: set[asyncio.Task] = set()

    def start_lease(self, ttl_s: float) -> None:
        """Serve requests: hold quota under a lease that dies with this process."""
        lease = ServerLease(self.engine, ttl_s)
        lease.start()
        self.admission = AdmissionControl(self.engine, lease)

    def end_lease(self) -> None:
        if self.admission is not None:
            self.admission.lease.end()
            self.admission = None

    @property
    def is_open(self) -> bool:
        return not self.keys.has_keys()

    async def principal(self, request: Request) -> Principal:
        closed = self.keys.recent_has_keys(KEYS_RECHECK_S)
        if closed is None:
            closed = await asyncio.to_thread(self.keys.has_keys)
        if not closed:
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
        self.admission_id: int | None = None
        self.started = time.monotonic()

    async def admit(self, worst_case_tokens: int) -> None:
        key = self.principal.key
        if key is None or not counted(key):  # nothing to hold or count: no thread hop, no database
            return
        if self.access.admission is None:
            raise RuntimeError("admission needs the server's lease (Access.start_lease)")
        verdict = await asyncio.to_thread(self.access.admission.admit, key, worst_case_tokens)
        if isinstance(verdict, Refused):
            raise _refusal_error(verdict)
        self.admission_id = verdict.admission_id

    async def release(self) -> None:
        """The request never ran (rejected after admission): drop the hold, write no row."""
        if self.admission_id is not None:
            await asyncio.to_thread(self.access.ledger.release, self.admission_id)
            self.admission_id = None

    async def settle(self, prompt: int, cached: int, completion: int, reasoning: int, status: str) -> None:
        record = UsageRecord(self.request_id, self.principal.key_id, self.model, prompt, cached, completion,
                             reasoning, int((time.monotonic() - self.started) * 1000), status)
        await asyncio.to_thread(self.access.ledger.settle, record, self.admission_id)
        self.admission_id = None


def _refusal_error(refused: Refused) -> APIError:
    if refused.retry_after_s is None:
        return APIError(refused.status, refused.message, code=refused.code)
    # An rpm of 0 never has room: "1" keeps clients that honour Retry-After from spinning.
    retry = "1" if math.isinf(refused.retry_after_s) else str(math.ceil(refused.retry_after_s))
    return APIError(refused.status, refused.message, code=refused.code, headers={"Retry-After": retry})
