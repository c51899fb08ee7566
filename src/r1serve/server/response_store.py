"""Responses kept with `store: true`: in the platform database, each readable by the key that
made it (any client on an open server), for previous_response_id and GET/DELETE."""
from __future__ import annotations

import json

import sqlalchemy as sa

from r1serve.server.db import reading, stored_responses, utcnow


class ResponseStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def save(self, response: dict, conversation: list[dict], key_id: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(stored_responses.insert().values(
                id=response["id"], key_id=key_id, response=json.dumps(response, ensure_ascii=False),
                conversation=json.dumps(conversation, ensure_ascii=False), created_at=utcnow()))

    def load(self, response_id: str, key_id: str | None) -> tuple[dict, list[dict]] | None:
        """(the response, the conversation it ends), if it is there and this key's."""
        r = stored_responses.c
        with reading(self.engine) as conn:
            row = conn.execute(sa.select(r.response, r.conversation).where(r.id == response_id, self._owned(key_id))
                               ).first()
        return None if row is None else (json.loads(row.response), json.loads(row.conversation))

    def delete(self, response_id: str, key_id: str | None) -> bool:
        r = stored_responses.c
        with self.engine.begin() as conn:
            return conn.execute(stored_responses.delete().where(r.id == response_id, self._owned(key_id))).rowcount > 0

    @staticmethod
    def _owned(key_id: str | None):
        r = stored_responses.c
        return r.key_id.is_(None) if key_id is None else r.key_id == key_id
