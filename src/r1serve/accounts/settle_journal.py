"""Settlements the database could not take, kept on local disk until it can.

A request that ran while the key and usage database went away still has to be charged and
its quota hold ended, or the key loses that hold for as long as the server lives. Its
settlement goes to this journal instead (a SQLite file, committed to disk before the
response is sent), and is replayed once the database answers again: the lease thread
replays after every renewal, and a server replays what an earlier one left at start.

Replay is idempotent by request id: a settlement whose ledger row is already there (its
commit reached the database although the connection broke before the answer came back) is
dropped, not charged twice. Replays on one host are serialised by the journal's own write
lock, so servers sharing a data directory never apply one entry twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Callable

from r1serve.accounts.usage_ledger import UsageRecord

log = logging.getLogger("r1serve.server")

_SCHEMA = """CREATE TABLE IF NOT EXISTS pending (
    request_id TEXT PRIMARY KEY,
    admission_id INTEGER,           -- the quota hold to end (NULL: none)
    record TEXT                     -- the UsageRecord as JSON; NULL: a release (the request never ran)
)"""


def journal_path(db_url: str, data_dir: Path) -> Path:
    """Beside a SQLite database's file; for a database elsewhere, in the data directory,
    named after the database so that two databases never share a journal."""
    if db_url.startswith("sqlite:///") and db_url != "sqlite:///:memory:":
        return Path(db_url.removeprefix("sqlite:///") + ".settle-journal")
    digest = hashlib.sha256(db_url.encode()).hexdigest()[:16]
    return data_dir / f"settle-journal-{digest}.sqlite"


# Applies one settlement to the database, idempotently; raises if the database is away.
Apply = Callable[[UsageRecord | None, int | None], None]


class SettleJournal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, request_id: str, record: UsageRecord | None, admission_id: int | None) -> None:
        """Keep a settlement (record None: a release) until `replay`; on disk when this returns."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = None if record is None else json.dumps(dataclasses.asdict(record))
        with closing(self._connect()) as conn:  # autocommit: the insert is its own transaction
            conn.execute("INSERT OR REPLACE INTO pending VALUES (?, ?, ?)", (request_id, admission_id, text))

    def pending(self) -> int:
        if not self.path.exists():
            return 0
        with closing(self._connect()) as conn:
            return conn.execute("SELECT count(*) FROM pending").fetchone()[0]

    def replay(self, apply: Apply) -> int:
        """Apply what is pending, oldest first, each entry dropped once applied; stops at the
        first failure (the database is still away) and leaves the rest. Returns how many went."""
        if not self.path.exists():
            return 0
        done = 0
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")  # one replayer at a time, across processes
            try:
                for request_id, admission_id, text in conn.execute("SELECT * FROM pending ORDER BY rowid").fetchall():
                    record = None if text is None else UsageRecord(**json.loads(text))
                    apply(record, admission_id)
                    conn.execute("DELETE FROM pending WHERE request_id = ?", (request_id,))
                    conn.commit()  # this entry is applied: never again, whatever follows
                    conn.execute("BEGIN IMMEDIATE")
                    done += 1
            finally:
                conn.commit()
        if done:
            log.info("settled %d request(s) from the journal %s", done, self.path)
        return done

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")  # written means on disk
        conn.execute(_SCHEMA)
        return conn
