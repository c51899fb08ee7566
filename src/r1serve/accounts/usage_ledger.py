"""The usage ledger: one row per request, and the per-key quota counters beside it.

A request holds its worst case (prompt + n x max_tokens) before it runs (admission.py), so
concurrent requests on a key, on one server or several sharing a database, can never
together be admitted past the quota. When it ends, one transaction writes its ledger row,
charges what it really used and ends the hold; the response is sent only after that commit.

Charged tokens = uncached prompt tokens + cached prompt tokens x the cache-hit weight +
completion tokens (reasoning included), rounded up. A prefix-cache hit costs the server far
less, and DeepSeek prices it at a tenth of a miss: the weight is the price table's hit price
over its miss price (prices.py), or `--cached-token-weight`. Each row also records the
request's cost at the table's prices when it settled.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass

import sqlalchemy as sa

from r1serve.accounts.database import admissions, api_keys, as_utc, usage_ledger, utcnow
from r1serve.accounts.prices import PriceTable, load_prices


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency_ms: int
    status: str  # "ok" | "aborted" | "error"


USAGE_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
                 "total_tokens", "charged_tokens")


class Ledger:
    def __init__(self, db: sa.Engine, prices: PriceTable | None = None, cached_weight: float | None = None) -> None:
        """`cached_weight`: what a cache-hit token counts against a quota (None: as priced)."""
        self.db = db
        self.prices = prices or load_prices()
        self.cached_weight = cached_weight

    def charge(self, r: UsageRecord) -> int:
        weight = self.cached_weight
        if weight is None:
            weight = self.prices.price(r.model).cached_weight
        return math.ceil(r.prompt_tokens - r.cached_tokens + r.cached_tokens * weight + r.completion_tokens)

    def cost(self, r: UsageRecord) -> float:
        return self.prices.price(r.model).cost(r.prompt_tokens, r.cached_tokens, r.completion_tokens)

    def release(self, admission_id: int) -> None:
        """A request admitted but never run: its hold goes, and its tokens leave the tpm
        window (it still counts as a request)."""
        with self.db.begin() as conn:
            conn.execute(admissions.update().where(admissions.c.id == admission_id)
                         .values(held_tokens=0, rate_tokens=0))

    def settle(self, record: UsageRecord, admission_id: int | None) -> int:
        """Write the row, charge the key, end its hold (the tpm window keeps what was really
        charged): one transaction. Returns the charge."""
        with self.db.begin() as conn:
            return self._settle(conn, record, admission_id)

    def settle_once(self, record: UsageRecord | None, admission_id: int | None) -> None:
        """A settlement replayed from a journal (record None: a release): applied unless its
        ledger row is already there, so a replay never charges twice."""
        if record is None:
            return self.release(admission_id) if admission_id is not None else None
        with self.db.begin() as conn:
            written = conn.execute(sa.select(usage_ledger.c.id).where(usage_ledger.c.request_id == record.request_id)
                                   .limit(1)).first()
            if written is None:
                self._settle(conn, record, admission_id)

    def _settle(self, conn: sa.Connection, record: UsageRecord, admission_id: int | None) -> int:
        charged = self.charge(record)
        conn.execute(usage_ledger.insert().values(**asdict(record), charged_tokens=charged, cost=self.cost(record),
                                                  created_at=utcnow()))
        if record.key_id is not None:
            k = api_keys.c
            conn.execute(api_keys.update().where(k.id == record.key_id).values(used_tokens=k.used_tokens + charged))
        if admission_id is not None:
            conn.execute(admissions.update().where(admissions.c.id == admission_id)
                         .values(held_tokens=0, rate_tokens=charged))
        return charged

    def last_used(self) -> dict[str, str]:
        """When each key's latest request was recorded (ISO 8601, UTC), for keys with any."""
        u = usage_ledger.c
        query = sa.select(u.key_id, sa.func.max(u.created_at)).where(u.key_id.is_not(None)).group_by(u.key_id)
        with self.db.begin() as conn:
            return {key: as_utc(at).isoformat(timespec="seconds") for key, at in conn.execute(query)}

    def summary(self, key_id: str | None = None, since: dt.date | None = None, until: dt.date | None = None,
                by: tuple[str, ...] = ("day", "model")) -> list[dict]:
        """Usage summed per group (any of day, model, key), oldest first."""
        u = usage_ledger.c
        groups = {"day": self._day(u.created_at).label("day"), "model": u.model.label("model"),
                  "key": u.key_id.label("key")}
        cols = [groups[g] for g in by]
        sums = [sa.func.count().label("requests")] + [sa.func.coalesce(sa.func.sum(getattr(u, c)), 0).label(c) for c in
                                                      ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                       "reasoning_tokens", "charged_tokens", "cost")]
        query = sa.select(*cols, *sums).group_by(*cols).order_by(*cols)
        if key_id is not None:
            query = query.where(u.key_id == key_id)
        if since is not None:
            query = query.where(u.created_at >= dt.datetime.combine(since, dt.time(), dt.timezone.utc))
        if until is not None and until < dt.date.max:  # the range ends the day after; the last day has none
            query = query.where(u.created_at < dt.datetime.combine(until + dt.timedelta(days=1), dt.time(),
                                                                   dt.timezone.utc))
        with self.db.begin() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for r in rows:
            r["day"] = str(r["day"]) if "day" in r else None
            r["total_tokens"] = r["prompt_tokens"] + r["completion_tokens"]
            for c in USAGE_COLUMNS:
                r[c] = int(r[c])
            r["cost"] = round(float(r["cost"]), 6)
            r["currency"] = self.prices.currency
        return rows

    def _day(self, column):
        if self.db.dialect.name == "postgresql":
            return sa.func.date(sa.func.timezone("UTC", column))
        return sa.func.date(column)  # SQLite stores the UTC time as text: date() takes its day
