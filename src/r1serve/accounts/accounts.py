"""Who is calling and what they may spend: API-key auth, rate limits, quota, usage records.

Until the first key is created the server is open (local use; said loudly at start):
requests need no key and usage is still recorded, without a key. Once a key has been
created every request needs a live one, for good: revoking every key locks the server, it
does not open it again. How a request presents its key, and what a refusal becomes in
HTTP, is the server's (server/caller.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from r1serve.accounts.admission import AdmissionControl, Ask, Refused, ServerLease, counted
from r1serve.accounts.database import UNREACHABLE, open_database
from r1serve.accounts.database_health import DatabaseHealth, describe
from r1serve.accounts.api_keys import KeyInfo, KeyStore
from r1serve.accounts.usage_ledger import Ledger, UsageRecord
from r1serve.accounts.response_store import ResponseStore
from r1serve.accounts.prices import PriceTable
from r1serve.accounts.settle_journal import SettleJournal
from r1serve.errors import R1ServeError

log = logging.getLogger("r1serve.server")

# While no key exists the server is open; asked per request that was a database round trip
# per request. A key created elsewhere (the CLI, another server) closes it within this.
# Once closed it stays closed, so closed servers never ask again.
KEYS_RECHECK_S = 1.0


class Unauthenticated(R1ServeError):
    """No key was presented to a closed server, or one that is unknown or revoked."""


class QuotaRefused(R1ServeError):
    """A key's rate limits or quota cannot take a request now (admission.Refused says why)."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message)
        self.refused = refused


@dataclass(frozen=True)
class Principal:
    key: KeyInfo | None  # None: the server is open

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def is_admin(self) -> bool:
        return self.key is not None and self.key.is_admin


class Accounts:
    """The platform's state: keys and ledger (the CLI's too), and for a server its lease and
    admission control (`start_lease`)."""

    def __init__(self, db_url: str, prices: PriceTable | None = None, cached_weight: float | None = None) -> None:
        self.db: sa.Engine = open_database(db_url)
        self.keys = KeyStore(self.db)
        self.ledger = Ledger(self.db, prices, cached_weight)
        self.responses = ResponseStore(self.db)
        self.health = DatabaseHealth(self.db)
        self.admission: AdmissionControl | None = None
        self.journal: SettleJournal | None = None  # a server's: settlements the database could not take
        self._pending: set[asyncio.Task] = set()

    def start_lease(self, ttl_s: float, journal: Path | None = None) -> None:
        """Serve requests: hold quota under a lease that dies with this process; settlements
        that find the database away wait in `journal`, replayed after each renewal."""
        self.journal = SettleJournal(journal) if journal is not None else None
        lease = ServerLease(self.db, ttl_s, on_renewed=self.replay_journal)
        lease.start()
        self.admission = AdmissionControl(self.db, lease)

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

    async def principal(self, secret: str) -> Principal:
        """Who presents `secret` (any, while the server is open); raises Unauthenticated."""
        closed = self.keys.recent_has_keys(KEYS_RECHECK_S)
        if closed is None:
            closed = await asyncio.to_thread(self.keys.has_keys)
        if not closed:
            return Principal(None)  # whatever key a client sends (SDKs insist on one) is ignored
        if not secret:
            raise Unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer sk-…' "
                                  "(or 'x-api-key: sk-…', as Anthropic's clients do).")
        key = await asyncio.to_thread(self.keys.authenticate, secret)
        if key is None:
            raise Unauthenticated("Incorrect API key provided (unknown or revoked).")
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

    def __init__(self, accounts: Accounts, principal: Principal, model: str, request_id: str) -> None:
        self.accounts, self.principal, self.model, self.request_id = accounts, principal, model, request_id
        self.admission_id: int | None = None
        self.started = time.monotonic()

    async def hold(self, prompt_tokens: int, outputs: int, max_tokens: int) -> int:
        """Hold the request's worst case against the key; returns the max_tokens per output
        the key's quota leaves it (`max_tokens`, or less)."""
        key = self.principal.key
        if key is None or not counted(key):  # nothing to hold or count: no thread hop, no database
            return max_tokens
        if self.accounts.admission is None:
            raise RuntimeError("admission needs the server's lease (Accounts.start_lease)")
        ask = Ask(prompt_tokens, outputs, max_tokens)
        verdict = await asyncio.to_thread(self.accounts.admission.admit, key, ask)
        if isinstance(verdict, Refused):
            raise QuotaRefused(verdict)
        self.admission_id = verdict.admission_id
        return verdict.max_tokens

    async def release(self) -> None:
        """The request never ran (rejected after admission): drop the hold, write no row."""
        if self.admission_id is not None:
            await asyncio.to_thread(self.accounts.settle, None, self.admission_id)
            self.admission_id = None

    async def settle(self, prompt: int, cached: int, completion: int, reasoning: int, status: str) -> None:
        record = UsageRecord(self.request_id, self.principal.key_id, self.model, prompt, cached, completion,
                             reasoning, int((time.monotonic() - self.started) * 1000), status)
        await asyncio.to_thread(self.accounts.settle, record, self.admission_id)
        self.admission_id = None


