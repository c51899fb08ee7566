"""Whether the key and usage database answers, as this server last saw it.

Every call that finds it away marks it down (with why), every one that gets through marks it
up, and /health asks `check()`, which probes it itself when nothing has for a second: so a
load balancer sees the outage, and the recovery, without any request having to fail first.
"""
from __future__ import annotations

import time

import sqlalchemy as sa

from r1serve.accounts.database import UNREACHABLE

RECHECK_S = 1.0


def describe(exc: BaseException) -> str:
    # The driver's own first line ("connection refused", "database is locked"), not SQLAlchemy's
    # paragraph with the SQL and a link.
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".strip(": ")


class DatabaseHealth:
    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        self._state: tuple[str | None, float] = (None, -RECHECK_S)  # (why it is down or None, when seen)

    @property
    def error(self) -> str | None:
        return self._state[0]

    def failed(self, exc: BaseException) -> None:
        self._state = (describe(exc), time.monotonic())

    def succeeded(self) -> None:
        self._state = (None, time.monotonic())

    def check(self) -> str | None:
        """None if the database answers, else why not (blocks up to the connect timeout)."""
        if time.monotonic() - self._state[1] < RECHECK_S:
            return self._state[0]
        try:
            with self.db.connect() as conn:
                conn.execute(sa.select(1))
        except UNREACHABLE as exc:
            self.failed(exc)
        else:
            self.succeeded()
        return self._state[0]
