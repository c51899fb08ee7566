"""Admission of a keyed request: its quota hold and its per-minute limits, in the database
that every server sharing the keys reads, so they hold together, not per process.

Each admitted request of a key with a quota or a limit writes one `admissions` row, in one
transaction that first locks the key's row (PostgreSQL `FOR UPDATE`; SQLite's writers are
serialised by `BEGIN IMMEDIATE`), so concurrent requests on any number of servers are
admitted one at a time against what the rows say:

- quota: tokens used + worst cases held by running requests + this worst case <= quota;
  a request whose worst case does not fit is let in with its output capped at what is left
  (it ends with finish_reason "length", as a DeepSeek balance running out does), and
  refused only when not even its prompt and one token each fit. A hold counts only while
  the lease of the server running it is alive (see ServerLease), so the holds of a server
  that was killed come back to the key when its lease expires;
- rpm / tpm: admissions (and their tokens) of the last 60 s, a sliding window: at most
  `rpm` requests in any minute, on all servers together. A request whose worst case alone
  exceeds `tpm` is let in when the window is empty rather than never.

A key with neither a quota nor a limit is admitted without touching the database.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa

from r1serve.accounts.database import admissions, api_keys, db_now, server_leases
from r1serve.accounts.api_keys import KeyInfo

WINDOW = dt.timedelta(seconds=60)
log = logging.getLogger("r1serve.server")


@dataclass(frozen=True)
class Admitted:
    admission_id: int | None  # None: nothing held or counted (the key has no quota and no limit)
    max_tokens: int  # per output: what was asked, or less where the quota has less left


@dataclass(frozen=True)
class Ask:
    """What a request may use: `outputs` completions of up to `max_tokens` after
    `prompt_tokens` (a completions request's prompts and choices all together)."""

    prompt_tokens: int
    outputs: int
    max_tokens: int

    def worst_case(self, max_tokens: int | None = None) -> int:
        return self.prompt_tokens + self.outputs * (self.max_tokens if max_tokens is None else max_tokens)


@dataclass(frozen=True)
class Refused:
    status: int  # 402 (quota) or 429 (rate)
    code: str
    message: str
    retry_after_s: float | None = None  # for 429: when the window will have room


class ServerLease:
    """This server's claim to be alive, renewed on a thread of its own every `ttl_s / 3`.

    Holds are written under the lease; a server that dies (SIGKILL, power, OOM) stops
    renewing, and `ttl_s` later its holds stop counting against anyone's quota. A server
    that stops cleanly ends its lease at once."""

    def __init__(self, db: sa.Engine, ttl_s: float, on_renewed: Callable[[], None] = lambda: None) -> None:
        if not ttl_s > 0:
            raise ValueError(f"a lease needs ttl_s > 0 (got {ttl_s})")
        self.db, self.ttl = db, dt.timedelta(seconds=ttl_s)
        self.on_renewed = on_renewed  # the database answered: what waited for it may go (the journal)
        self.id = "srv_" + secrets.token_hex(6)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="r1serve-lease", daemon=True)

    def start(self) -> None:
        self.renew()
        self.on_renewed()
        self._thread.start()

    def renew(self) -> None:
        """Push the expiry forward (re-create the lease if a long pause let it be pruned),
        and prune what no window or hold needs any more."""
        with self.db.begin() as conn:
            now = db_now(conn)
            done = conn.execute(server_leases.update().where(server_leases.c.id == self.id)
                                .values(expires_at=now + self.ttl))
            if done.rowcount == 0:
                conn.execute(server_leases.insert().values(id=self.id, host=socket.gethostname()[:255],
                                                           pid=os.getpid(), started_at=now,
                                                           expires_at=now + self.ttl))
            _prune(conn, now)

    def end(self) -> None:
        """A clean stop, after every request settled: drop the lease and any hold left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.on_renewed()  # what the journal holds is settled before the holds go
        with self.db.begin() as conn:
            conn.execute(admissions.update().where(admissions.c.lease_id == self.id, admissions.c.held_tokens != 0)
                         .values(held_tokens=0))
            conn.execute(server_leases.delete().where(server_leases.c.id == self.id))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl.total_seconds() / 3):
            try:
                self.renew()
            except sa.exc.SQLAlchemyError:  # the database is away for a moment: try again next time
                continue
            try:
                self.on_renewed()
            except Exception:  # noqa: BLE001 - the lease must outlive whatever waited on it
                log.exception("after renewing the lease")


def _prune(conn: sa.Connection, now: dt.datetime) -> None:
    a, lease = admissions.c, server_leases.c
    live = sa.select(lease.id).where(lease.expires_at > now)
    conn.execute(admissions.delete().where(a.admitted_at < now - WINDOW,
                                           sa.or_(a.held_tokens == 0, a.lease_id.not_in(live))))
    conn.execute(server_leases.delete().where(lease.expires_at < now - WINDOW,
                                              lease.id.not_in(sa.select(a.lease_id))))


def counted(key: KeyInfo) -> bool:
    """Whether the key's requests are held or counted at all (a quota or a limit)."""
    return key.quota_tokens is not None or key.rpm is not None or key.tpm is not None


class AdmissionControl:
    def __init__(self, db: sa.Engine, lease: ServerLease) -> None:
        self.db, self.lease = db, lease

    def admit(self, key: KeyInfo, ask: Ask) -> Admitted | Refused:
        """Let a request in, with the max_tokens the quota leaves it, or say why not."""
        if not counted(key):
            return Admitted(None, ask.max_tokens)
        with self.db.begin() as conn:
            now = db_now(conn)
            # The key as it is now, locked: a limit lowered a moment ago applies to this request.
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key.id).with_for_update()).one()
            granted = _quota_grant(conn, row, ask, now)
            if isinstance(granted, Refused):
                return granted
            tokens = ask.worst_case(granted)
            refusal = _rate_refusal(conn, row, tokens, now)
            if refusal is not None:
                return refusal
            done = conn.execute(admissions.insert().values(key_id=key.id, lease_id=self.lease.id,
                                                           held_tokens=tokens, rate_tokens=tokens, admitted_at=now))
            return Admitted(done.inserted_primary_key[0], granted)


def _rate_refusal(conn: sa.Connection, row, tokens: int, now: dt.datetime) -> Refused | None:
    if row.rpm is None and row.tpm is None:
        return None
    a = admissions.c
    recent = conn.execute(sa.select(a.admitted_at, a.rate_tokens).where(a.key_id == row.id,
                                                                         a.admitted_at > now - WINDOW)
                          .order_by(a.admitted_at)).all()
    waits = [_requests_wait(recent, row.rpm, now), _tokens_wait(recent, row.tpm, tokens, now)]
    wait = max((w for w in waits if w is not None), default=None)
    if wait is None:
        return None
    retry = "later" if math.isinf(wait) else f"after {math.ceil(wait)} s"
    return Refused(429, "rate_limit_exceeded", f"Rate limit reached for key {row.id} (rpm {row.rpm}, tpm {row.tpm}, "
                                               f"over the last 60 s on every server); retry {retry}", wait)


def _requests_wait(recent: list, rpm: int | None, now: dt.datetime) -> float | None:
    """Seconds until one more request fits in the window, or None if it fits now."""
    if rpm is None or len(recent) < rpm:
        return None
    if rpm == 0:
        return math.inf
    # The window must lose len - rpm + 1 admissions: the oldest of those that remain decides.
    return _until_out(recent[len(recent) - rpm].admitted_at, now)


def _tokens_wait(recent: list, tpm: int | None, tokens: int, now: dt.datetime) -> float | None:
    if tpm is None:
        return None
    if tpm == 0:
        return math.inf
    need, used = min(tokens, tpm), sum(r.rate_tokens for r in recent)
    if used + need <= tpm:
        return None
    for r in recent:  # oldest first: how many must leave before this fits
        used -= r.rate_tokens
        if used + need <= tpm:
            return _until_out(r.admitted_at, now)
    return None  # unreachable: an empty window fits `need`


def _until_out(admitted_at: dt.datetime, now: dt.datetime) -> float:
    when = admitted_at if admitted_at.tzinfo else admitted_at.replace(tzinfo=dt.timezone.utc)
    return max(0.001, (when + WINDOW - now).total_seconds())


def _quota_grant(conn: sa.Connection, row, ask: Ask, now: dt.datetime) -> int | Refused:
    """The max_tokens the key's quota leaves this request: all it asked, what is left, or a refusal."""
    if row.quota_tokens is None:
        return ask.max_tokens
    held = held_tokens(conn, row.id, now)
    left = max(0, row.quota_tokens - row.used_tokens - held)
    if ask.worst_case() <= left:
        return ask.max_tokens
    if ask.worst_case(1) <= left:
        return (left - ask.prompt_tokens) // ask.outputs
    running = f" ({held} held by requests running now)" if held else ""
    return Refused(402, "insufficient_quota", f"Insufficient quota: key {row.id} has {left} tokens left of "
                                              f"{row.quota_tokens}{running}, and this request needs "
                                              f"{ask.worst_case(1)} to answer at all ({ask.prompt_tokens} of prompt). "
                                              "Ask for a larger quota.")


def held_tokens(conn: sa.Connection, key_id: str, now: dt.datetime) -> int:
    """The worst cases of the key's running requests, on servers whose lease is alive."""
    a, lease = admissions.c, server_leases.c
    query = (sa.select(sa.func.coalesce(sa.func.sum(a.held_tokens), 0))
             .select_from(admissions.join(server_leases, a.lease_id == lease.id))
             .where(a.key_id == key_id, a.held_tokens > 0, lease.expires_at > now))
    return int(conn.execute(query).scalar_one())
