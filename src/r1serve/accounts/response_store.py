"""Responses kept with `store: true`: in the platform database, each readable by the key that
made it (any client on an open server), for previous_response_id and GET/DELETE. As OpenAI
keeps them, a stored response lasts 30 days; older ones are gone (404) and their rows are
removed, at most once an hour, when a new one is saved."""
from __future__ import annotations

import datetime as dt
import json
import time

import sqlalchemy as sa

from r1serve.accounts.database import reading, stored_responses, utcnow


KEPT = dt.timedelta(days=30)
PRUNE_EVERY_S = 3600.0


class ResponseStore:
    def __init__(self, db: sa.Engine, kept: dt.timedelta = KEPT) -> None:
        self.db, self.kept = db, kept
        self.pruned_at = -PRUNE_EVERY_S  # monotonic seconds of the last sweep of expired rows

    def save(self, response: dict, conversation: list[dict], key_id: str | None) -> None:
        with self.db.begin() as conn:
            if time.monotonic() - self.pruned_at >= PRUNE_EVERY_S:
                conn.execute(stored_responses.delete().where(stored_responses.c.created_at < self._cutoff()))
                self.pruned_at = time.monotonic()
            conn.execute(stored_responses.insert().values(
                id=response["id"], key_id=key_id, response=json.dumps(response, ensure_ascii=False),
                conversation=json.dumps(conversation, ensure_ascii=False), created_at=utcnow()))

    def load(self, response_id: str, key_id: str | None) -> tuple[dict, list[dict]] | None:
        """(the response, the conversation it ends), if it is there and this key's."""
        r = stored_responses.c
        with reading(self.db) as conn:
            row = conn.execute(sa.select(r.response, r.conversation).where(
                r.id == response_id, self._owned(key_id), r.created_at >= self._cutoff())).first()
        return None if row is None else (json.loads(row.response), json.loads(row.conversation))

    def delete(self, response_id: str, key_id: str | None) -> bool:
        r = stored_responses.c
        with self.db.begin() as conn:
            return conn.execute(stored_responses.delete().where(r.id == response_id, self._owned(key_id))).rowcount > 0

    def _cutoff(self) -> dt.datetime:
        return utcnow() - self.kept

    @staticmethod
    def _owned(key_id: str | None):
        r = stored_responses.c
        return r.key_id.is_(None) if key_id is None else r.key_id == key_id
