"""Who is calling and what they may spend: API-key auth, rate limits, quota, usage records.

Until the first key is created the server is open (local use; said loudly at start):
requests need no key and usage is still recorded, without a key. Once a key has been
created every request needs a live one, as `Authorization: Bearer sk-…` (what OpenAI
clients send), for good: revoking every key locks the server, it does not open it again.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from fastapi import Request

from r1serve.server.admission import AdmissionControl, Ask, Refused, ServerLease, counted
from r1serve.server.db import UNREACHABLE, open_database
from r1serve.server.db_health import DatabaseHealth, describe
from r1serve.server.errors import APIError
from r1serve.server.keys import KeyInfo, KeyStore
from r1serve.server.ledger import Ledger, UsageRecord
from r1serve.server.response_store import ResponseStore
from r1serve.server.prices import PriceTable
from r1serve.server.request_log import KEY
from r1serve.server.settle_journal import SettleJournal

log = logging.getLogger("r1serve.server")

# While no key exists the server is open; asked per request that was a database round trip
# per request. A key created elsewhere (the CLI, another server) closes it within this.
# Once closed it stays closed, so closed servers never ask again.
KEYS_RECHECK_S = 1.0
RETRY_DATABASE_S = 5


@dataclass(frozen=True)
class Principal:
    key: KeyInfo | None  # None: the server is open

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def is_admin(self) -> bool:
        return self.key is not None and self.key.is_admin


def presented_key(request: Request) -> str:
    """The key a client sent: OpenAI's clients as a bearer token, Anthropic's as x-api-key."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret.strip()
    return request.headers.get("x-api-key", "").strip()


class Access:
    """The platform's state: keys and ledger (the CLI's too), and for a server its lease and
    admission control (`start_lease`)."""

    def __init__(self, db_url: str, prices: PriceTable | None = None, cached_weight: float | None = None) -> None:
        self.engine: sa.Engine = open_database(db_url)
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(self.engine, prices, cached_weight)
        self.responses = ResponseStore(self.engine)
        self.health = DatabaseHealth(self.engine)
        self.admission: AdmissionControl | None = None
        self.journal: SettleJournal | None = None  # a server's: settlements the database could not take
        self._pending: set[asyncio.Task] = set()

    def start_lease(self, ttl_s: float, journal: Path | None = None) -> None:
        """Serve requests: hold quota under a lease that dies with this process; settlements
        that find the database away wait in `journal`, replayed after each renewal."""
        self.journal = SettleJournal(journal) if journal is not None else None
        lease = ServerLease(self.engine, ttl_s, on_renewed=self.replay_journal)
        lease.start()
        self.admission = AdmissionControl(self.engine, lease)

    def end_lease(self) -> None:
        if self.admission is not None:
            try:
                self.admission.lease.end()  # replays the journal first
            except UNREACHABLE as exc:  # its holds go when the lease expires; the journal waits for the next start
                log.warning("could not end the lease (%s): its holds expire with it", describe(exc))
            self.admission = None

    def replay_journal(self) -> None:
        if self.journal is None:
            return
        try:
            self.journal.replay(self.ledger.settle_once)
        except UNREACHABLE as exc:  # away again: the next renewal retries
            self.health.failed(exc)

    def database_state(self) -> tuple[str | None, int]:
        """(why the database is unreachable or None, settlements waiting in the journal)."""
        return self.health.check(), self.journal.pending() if self.journal else 0

    def settle(self, record: UsageRecord | None, admission_id: int | None) -> None:
        """Settle a request (record None: release its hold) in the database, or in the
        journal while the database is away."""
        try:
            if record is None:
                self.ledger.release(admission_id)
            else:
                self.ledger.settle(record, admission_id)
        except UNREACHABLE as exc:
            self.health.failed(exc)
            if self.journal is None:
                raise
            request_id = record.request_id if record else f"release-{admission_id}"
            self.journal.write(request_id, record, admission_id)
            log.warning("the database is away (%s): %s is settled from the journal when it returns",
                        describe(exc), request_id)

    @property
    def is_open(self) -> bool:
        return not self.keys.has_keys()

    async def principal(self, request: Request) -> Principal:
        closed = self.keys.recent_has_keys(KEYS_RECHECK_S)
        if closed is None:
            closed = await asyncio.to_thread(self.keys.has_keys)
        if not closed:
            return Principal(None)  # whatever key a client sends (SDKs insist on one) is ignored
        secret = presented_key(request)
        if not secret:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…' "
                                "(or 'x-api-key: sk-…', as Anthropic's clients do).", code="invalid_api_key")
        key = await asyncio.to_thread(self.keys.authenticate, secret)
        if key is None:
            raise APIError(401, "Incorrect API key provided (unknown or revoked).", code="invalid_api_key")
        setattr(request.state, KEY, key.id)  # for the request's log line
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

    async def admit(self, prompt_tokens: int, outputs: int, max_tokens: int) -> int:
        """Hold the request's worst case against the key; returns the max_tokens per output
        the key's quota leaves it (`max_tokens`, or less)."""
        key = self.principal.key
        if key is None or not counted(key):  # nothing to hold or count: no thread hop, no database
            return max_tokens
        if self.access.admission is None:
            raise RuntimeError("admission needs the server's lease (Access.start_lease)")
        ask = Ask(prompt_tokens, outputs, max_tokens)
        verdict = await asyncio.to_thread(self.access.admission.admit, key, ask)
        if isinstance(verdict, Refused):
            raise _refusal_error(verdict)
        self.admission_id = verdict.admission_id
        return verdict.max_tokens

    async def release(self) -> None:
        """The request never ran (rejected after admission): drop the hold, write no row."""
        if self.admission_id is not None:
            await asyncio.to_thread(self.access.settle, None, self.admission_id)
            self.admission_id = None

    async def settle(self, prompt: int, cached: int, completion: int, reasoning: int, status: str) -> None:
        record = UsageRecord(self.request_id, self.principal.key_id, self.model, prompt, cached, completion,
                             reasoning, int((time.monotonic() - self.started) * 1000), status)
        await asyncio.to_thread(self.access.settle, record, self.admission_id)
        self.admission_id = None


def database_unavailable(exc: BaseException) -> APIError:
    """What a client hears while the key and usage database is away: its request could be
    neither admitted nor charged, so it was not run."""
    return APIError(503, f"The key and usage database is unreachable ({describe(exc)}); the request was not run. "
                         "Retry shortly.", code="database_unavailable", headers={"Retry-After": str(RETRY_DATABASE_S)})


def _refusal_error(refused: Refused) -> APIError:
    if refused.retry_after_s is None:
        return APIError(refused.status, refused.message, code=refused.code)
    # An rpm of 0 never has room: "1" keeps clients that honour Retry-After from spinning.
    retry = "1" if math.isinf(refused.retry_after_s) else str(math.ceil(refused.retry_after_s))
    return APIError(refused.status, refused.message, code=refused.code, headers={"Retry-After": retry})
