"""Key management (admin keys only) and usage views.

    GET    /v1/usage                  the caller's own usage (everything, on an open server)
    POST   /v1/admin/keys             create a key; the secret is in this response only
    GET    /v1/admin/keys             list keys
    PATCH  /v1/admin/keys/{id}        change quota_tokens / rpm / tpm (null removes a limit)
    DELETE /v1/admin/keys/{id}        revoke
    GET    /v1/admin/usage            everyone's usage, by day / model / key
"""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import Depends, FastAPI, Query
from pydantic import ConfigDict, Field

from r1serve.errors import InvalidRequestError
from r1serve.accounts.accounts import Accounts, Principal
from r1serve.server.errors import APIError
from r1serve.server.openapi import API_KEY, responses
from r1serve.server.openapi_replies import AllUsage, KeyInfo, KeyList, NewKeyInfo, OwnUsage
from r1serve.server.valid_text import ValidText

# The key database stores 64-bit integers; past 2**53 JSON readers that use doubles (JavaScript,
# and Schemathesis's own bounds) lose the exact value, so the limit is the last exact one.
Limit = Annotated[int, Field(ge=0, le=2**53 - 1)]
GROUPS = "day|model|key"
BY = Query("day,model", pattern=rf"^ *({GROUPS}) *(, *({GROUPS}) *)*$",
           description="comma-separated, any of day, model, key")


class NewKey(ValidText):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    quota_tokens: Limit | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    admin: bool = False


class KeyLimits(ValidText):
    model_config = ConfigDict(extra="forbid")
    quota_tokens: Limit | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None


def _day():
    # A Query per parameter: FastAPI binds a shared one to the first parameter's name, so
    # `until` would read `since`.
    return Query(None, description="YYYY-MM-DD (UTC)", json_schema_extra={"format": "date"})


def _date(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise APIError(400, f"{name}={value!r} is not a date; use YYYY-MM-DD", param=name) from None


def _grouping(by: str) -> tuple[str, ...]:
    groups = tuple(dict.fromkeys(g.strip() for g in by.split(",") if g.strip()))  # "day,day" is "day"
    if not groups or any(g not in ("day", "model", "key") for g in groups):
        raise APIError(400, f"by={by!r}: group by any of day, model, key (comma-separated)", param="by")
    return groups


def add_platform_routes(app: FastAPI, accounts: Accounts, principal) -> None:
    """principal: the dependency that resolves a request's caller (caller.principal_dependency)."""
    async def admin(principal: Principal = Depends(principal)) -> Principal:
        if principal.key is None:
            raise APIError(403, "key management needs an admin key; this server has none yet: create one on the "
                                "host with `r1serve keys create --name admin --admin`", code="admin_required")
        if not principal.is_admin:
            raise APIError(403, "this endpoint needs an admin key", code="admin_required")
        return principal

    @app.get("/v1/usage", dependencies=[API_KEY], responses=responses(OwnUsage, 400, 401))
    async def own_usage(since: str | None = _day(), until: str | None = _day(),
                        principal: Principal = Depends(principal)):
        start, end = _date(since, "since"), _date(until, "until")
        key = await asyncio.to_thread(accounts.keys.get, principal.key_id) if principal.key else None
        rows = await asyncio.to_thread(accounts.ledger.summary, principal.key_id, start, end, ("day", "model"))
        return {"object": "usage", "key": None if key is None else key.public(), "data": rows}

    @app.post("/v1/admin/keys", status_code=201, dependencies=[Depends(admin), API_KEY],
              responses=responses(NewKeyInfo, 400, 401, 403, ok_status=201))
    async def create_key(body: NewKey):
        info, secret = await asyncio.to_thread(accounts.keys.create, body.name, body.quota_tokens, body.rpm,
                                               body.tpm, body.admin)
        return info.public() | {"key": secret}

    @app.get("/v1/admin/keys", dependencies=[Depends(admin), API_KEY], responses=responses(KeyList, 400, 401, 403))
    async def list_keys(include_revoked: bool = False):
        keys = await asyncio.to_thread(accounts.keys.list, include_revoked)
        last = await asyncio.to_thread(accounts.ledger.last_used)
        return {"object": "list", "data": [k.public() | {"last_used_at": last.get(k.id)} for k in keys]}

    @app.patch("/v1/admin/keys/{key_id}", dependencies=[Depends(admin), API_KEY],
               responses=responses(KeyInfo, 400, 401, 403, 404))
    async def update_key(key_id: str, body: KeyLimits):
        return (await _key_call(accounts.keys.update, key_id, **body.model_dump(exclude_unset=True))).public()

    @app.delete("/v1/admin/keys/{key_id}", dependencies=[Depends(admin), API_KEY],
                responses=responses(KeyInfo, 401, 403, 404))
    async def revoke_key(key_id: str):
        return (await _key_call(accounts.keys.revoke, key_id)).public()

    @app.get("/v1/admin/usage", dependencies=[Depends(admin), API_KEY], responses=responses(AllUsage, 400, 401, 403))
    async def all_usage(key_id: str | None = None, since: str | None = _day(), until: str | None = _day(),
                        by: str = BY):
        rows = await asyncio.to_thread(accounts.ledger.summary, key_id, _date(since, "since"), _date(until, "until"),
                                       _grouping(by))
        return {"object": "usage", "data": rows}


async def _key_call(fn, key_id: str, **kw):
    try:
        return await asyncio.to_thread(fn, key_id, **kw)
    except InvalidRequestError as e:
        raise APIError(404, str(e), param="key_id", code="key_not_found") from None
