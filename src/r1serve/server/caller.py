"""Who is calling, as HTTP sees it: the key a request presents (`Authorization: Bearer sk-…`
as OpenAI's clients send it, `x-api-key` as Anthropic's), resolved by the accounts to a
Principal (a FastAPI dependency), and the accounts' refusals as HTTP errors."""
from __future__ import annotations

import math

from fastapi import FastAPI, Request

from r1serve.accounts.accounts import Accounts, Principal, QuotaRefused, Unauthenticated
from r1serve.accounts.admission import Refused
from r1serve.accounts.database_health import describe
from r1serve.server.errors import APIError, error_response
from r1serve.server.request_log import KEY

RETRY_DATABASE_S = 5


def presented_key(request: Request) -> str:
    """The key a client sent: OpenAI's clients as a bearer token, Anthropic's as x-api-key."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret.strip()
    return request.headers.get("x-api-key", "").strip()


def principal_dependency(accounts: Accounts):
    """The FastAPI dependency that resolves a request's caller (401 for a bad or missing key)."""

    async def principal(request: Request) -> Principal:
        caller = await accounts.principal(presented_key(request))
        if caller.key is not None:
            setattr(request.state, KEY, caller.key.id)  # for the request's log line
        return caller

    return principal


def install_refusal_handlers(app: FastAPI) -> None:
    @app.exception_handler(Unauthenticated)
    async def _unauthenticated(request: Request, exc: Unauthenticated):
        error = APIError(401, str(exc), code="invalid_api_key")
        return error_response(request, error.status, error.body(), error.headers)

    @app.exception_handler(QuotaRefused)
    async def _refused(request: Request, exc: QuotaRefused):
        error = refusal_error(exc.refused)
        return error_response(request, error.status, error.body(), error.headers)


def database_unavailable(exc: BaseException) -> APIError:
    """What a client hears while the key and usage database is away: its request could be
    neither admitted nor charged, so it was not run."""
    return APIError(503, f"The key and usage database is unreachable ({describe(exc)}); the request was not run. "
                         "Retry shortly.", code="database_unavailable", headers={"Retry-After": str(RETRY_DATABASE_S)})


def refusal_error(refused: Refused) -> APIError:
    if refused.retry_after_s is None:
        return APIError(refused.status, refused.message, code=refused.code)
    # An rpm of 0 never has room: "1" keeps clients that honour Retry-After from spinning.
    retry = "1" if math.isinf(refused.retry_after_s) else str(math.ceil(refused.retry_after_s))
    return APIError(refused.status, refused.message, code=refused.code, headers={"Retry-After": retry})
