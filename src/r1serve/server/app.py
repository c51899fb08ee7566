"""The HTTP app: routes translate requests to engine calls; nothing here touches tensors.

The server listens at once; models load in the background. Until every model is loaded
/health answers 503 ("loading") and generation routes 503 with Retry-After, so a load
balancer or a script can wait on /health.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from r1serve.engine.async_engine import EngineDeadError, load_engine
from r1serve.errors import InvalidRequestError
from r1serve.accounts.accounts import Accounts, Principal
from r1serve.server.anthropic_messages import MessageJob, chat_request, count_tokens
from r1serve.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from r1serve.server.thinking_signer import ThinkingSigner
from r1serve.server.api_docs import add_api_docs
from r1serve.accounts.database import UNREACHABLE
from r1serve.accounts.prices import PriceTable
from r1serve.server.caller import (RETRY_DATABASE_S, database_unavailable, install_refusal_handlers,
                                   principal_dependency)
from r1serve.server.errors import APIError, BodyLimit, error_response, install_error_handlers
from r1serve.server.platform_routes import add_platform_routes
from r1serve.server.request_log import RequestLog
from r1serve.server.metrics import ServerMetrics
from r1serve.server.openapi import API_KEY, publish_stream_models, responses
from r1serve.server.openapi_formats import (AnthropicError, AnthropicEvent, AnthropicReply, DeletedResponse,
                                            InputTokens, ResponsesEvent, ResponsesReply)
from r1serve.server.openapi_replies import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Health,
                                            ModelCard, ModelList, Text, Tokens)
from r1serve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest, now)
from r1serve.server.responses_api import ResponsesJob, earlier_conversation
from r1serve.server.responses_api import chat_request as responses_chat_request
from r1serve.server.responses_protocol import ResponsesRequest
from r1serve.server.served_model import ModelSpec, ServedModel, tool_format, uses_reasoning
from r1serve.server.serving_chat import chat_prompt, create_chat_completion, translated_request
from r1serve.server.serving_completion import create_completion

log = logging.getLogger("r1serve.server")


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelSpec, ...]
    db_url: str  # the key and usage database (sqlite:///FILE or postgresql+psycopg://…)
    prices: PriceTable | None = None  # None: r1serve's own table (accounts/prices.toml)
    cached_token_weight: float | None = None  # what a prefix-cache hit counts against a quota (None: as priced)
    max_waiting: int = 256  # requests queued beyond the running batch before 429
    max_body_bytes: int = 16 * 2**20
    retry_after_s: int = 1
    engine_process: bool = True  # each engine in a process of its own (else a thread of the server's)
    # Quota holds live under a lease renewed every third of this: a server killed mid-request
    # gives its holds back to the keys this long after its last renewal.
    quota_lease_s: float = 30.0
    # Where settlements wait while the database is away (settle_journal.journal_path); None:
    # nowhere, such a request fails instead.
    journal_path: Path | None = None
    # What signs the thinking blocks of Anthropic-format replies (anthropic_messages.signing_key);
    # None: a key for this process only.
    signing_key: bytes | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if not names or len(set(names)) != len(names):
            raise InvalidRequestError(f"serve at least one model, each under its own name (got {names})")
        if not self.quota_lease_s > 0:
            raise InvalidRequestError(f"--quota-lease {self.quota_lease_s} must be > 0 seconds (default 30)")


@dataclass
class ServerState:
    config: ServerConfig
    metrics: ServerMetrics
    accounts: Accounts
    principal: Callable  # the FastAPI dependency that resolves a request's caller (caller.py)
    on_fatal: Callable[[], None]
    on_ready: Callable[[ServerState], None]
    cores: dict = field(default_factory=dict)  # model name -> its engine process, already spawned
    models: dict[str, ServedModel] = field(default_factory=dict)
    load_error: str | None = None
    draining: bool = False

    @property
    def ready(self) -> bool:
        return len(self.models) == len(self.config.models) and self.load_error is None

    async def load_all(self) -> None:
        for spec in self.config.models:
            try:
                engine = await load_engine(spec.engine, spec.path, own_process=self.config.engine_process,
                                           core=self.cores.get(spec.name))
            except Exception as exc:
                log.error("could not load %s: %s", spec.name, exc)
                self.load_error = f"{spec.name}: {exc}"
                self.on_fatal()
                return
            served = ServedModel(spec.name, engine, uses_reasoning(spec, engine), self.metrics, now(), str(spec.path),
                                 tool_format(spec, engine))
            self.models[spec.name] = served
            log.info("serving %s (reasoning parser: %s, tool-call parser: %s)", spec.name,
                     "deepseek_r1" if served.reasoning else "none", served.tool_format.name if served.tool_format else "none")
        self.on_ready(self)

    async def shutdown(self) -> None:
        await asyncio.gather(*(m.engine.shutdown() for m in self.models.values()))
        await self.accounts.drain()

    def model(self, name: str | None) -> ServedModel:
        """The model a request names, ready to take it (or the APIError saying why not)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", headers=self._retry())
        known = [m.name for m in self.config.models]
        name = name or known[0]
        if name not in known:
            raise APIError(404, f"The model `{name}` does not exist. Served models: {', '.join(known)}",
                           param="model", code="model_not_found")
        served = self.models.get(name)
        if served is None:
            raise APIError(503, f"the model `{name}` is still loading", headers=self._retry())
        if not served.engine.is_alive:
            raise APIError(503, f"the engine for `{name}` has stopped; restart the server")
        return served

    def refuse_if_queue_full(self, served: ServedModel) -> None:
        if served.engine.num_waiting >= self.config.max_waiting:
            raise APIError(429, f"the server is busy ({served.engine.num_waiting} requests waiting); retry shortly",
                           code="queue_full", headers=self._retry())

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    def engine_stats(self) -> dict:
        return {name: m.engine.stats for name, m in self.models.items()}


def build_app(config: ServerConfig, on_fatal: Callable[[], None] = lambda: None, cores: dict | None = None,
              on_ready: Callable[[ServerState], None] = lambda _: None) -> FastAPI:
    """`cores`: engine processes already spawned, by model name (the rest start here);
    `on_ready`: called once every model is loaded."""
    accounts = Accounts(config.db_url, config.prices, config.cached_token_weight)
    if accounts.is_open:
        # The command names this server's database: a key made in another one protects nothing.
        db = sa.engine.make_url(config.db_url).render_as_string(hide_password=True)
        log.warning("NO API KEYS: the server is OPEN to anyone who can reach it. Create one with "
                    "`r1serve keys create --name NAME --db '%s'` to require keys.", db)
    state = ServerState(config, None, accounts, principal_dependency(accounts), on_fatal, on_ready,  # type: ignore[arg-type]
                        dict(cores or {}))
    state.metrics = ServerMetrics(state.engine_stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await asyncio.to_thread(accounts.start_lease, config.quota_lease_s, config.journal_path)
        loading = asyncio.create_task(state.load_all())
        yield
        loading.cancel()
        await state.shutdown()
        await asyncio.to_thread(accounts.end_lease)

    app = FastAPI(title="r1serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.r1serve = state
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestLog)
    install_error_handlers(app)
    install_refusal_handlers(app)
    _add_database_handler(app, accounts)
    _add_routes(app, state)
    _add_anthropic_routes(app, state, ThinkingSigner(config.signing_key or os.urandom(32)))
    _add_responses_routes(app, state)
    add_platform_routes(app, state.accounts, state.principal)
    publish_stream_models(app)
    add_api_docs(app)
    # The playground and usage dashboard: plain files, no build step.
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "static", html=True), name="ui")
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/")

    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health, "description": "loading, "
                                                                 "draining, or failed (with the error)"}})
    async def health():
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        dead = [f"{m.name}" + (f" ({m.engine.error})" if m.engine.error else "")
                for m in state.models.values() if not m.engine.is_alive]
        if dead:  # an engine process or a rank died (OOM killer, a crash): a supervisor should restart us
            return JSONResponse({"status": "failed", "error": f"the engine stopped for: {'; '.join(dead)}"},
                                status_code=503)
        down, unsettled = await asyncio.to_thread(state.accounts.database_state)
        if down:  # no keyed request can be admitted or charged: out of rotation until it returns
            return JSONResponse({"status": "unavailable", "database": "unreachable", "unsettled": unsettled,
                                 "error": f"the key and usage database is unreachable ({down})"},
                                status_code=503, headers={"Retry-After": str(RETRY_DATABASE_S)})
        return {"status": "ok", "database": "ok", "unsettled": unsettled}

    @app.get("/v1/models", dependencies=[Depends(state.principal), API_KEY], responses=responses(ModelList, 401))
    async def list_models():
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "r1serve", "root": m.root,
                 "max_model_len": m.engine.max_model_len} for m in state.models.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(state.principal), API_KEY],
             responses=responses(ModelCard, 401, 404, 503))
    async def get_model(name: str):
        known = [m.name for m in state.config.models]
        if name not in state.models:
            status = 503 if name in known else 404
            raise APIError(status, f"The model `{name}` does not exist" if status == 404 else "still loading",
                           param="model", code="model_not_found" if status == 404 else None)
        m = state.models[name]
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "r1serve", "root": m.root,
                "max_model_len": m.engine.max_model_len}

    caller = Depends(state.principal)

    generating = (400, 401, 402, 404, 429, 503)

    @app.post("/v1/chat/completions", dependencies=[API_KEY],
              responses=responses(ChatCompletion, *generating, stream=ChatCompletionChunk))
    async def chat_completions(req: ChatCompletionRequest, raw: Request, principal: Principal = caller):
        served = state.model(req.model)
        state.refuse_if_queue_full(served)
        return await _engine_call(create_chat_completion(served, req, raw, state.accounts, principal))

    @app.post("/v1/completions", dependencies=[API_KEY],
              responses=responses(Completion, *generating, stream=CompletionChunk))
    async def completions(req: CompletionRequest, raw: Request, principal: Principal = caller):
        served = state.model(req.model)
        state.refuse_if_queue_full(served)
        return await _engine_call(create_completion(served, req, raw, state.accounts, principal))

    # DeepSeek's base URL has no /v1, and its beta features (FIM, chat prefix completion) live
    # under /beta: the same routes there, unpublished (the schema names each once).
    for base in ("", "/beta"):
        app.post(f"{base}/chat/completions", dependencies=[API_KEY], include_in_schema=False)(chat_completions)
        app.post(f"{base}/completions", dependencies=[API_KEY], include_in_schema=False)(completions)
    app.get("/models", dependencies=[Depends(state.principal), API_KEY], include_in_schema=False)(list_models)
    app.get("/models/{name:path}", dependencies=[Depends(state.principal), API_KEY],
            include_in_schema=False)(get_model)

    @app.post("/tokenize", dependencies=[Depends(state.principal), API_KEY],
              responses=responses(Tokens, 400, 401, 404, 503))
    async def tokenize(req: TokenizeRequest):
        served = state.model(req.model)
        tok = served.engine.tokenizer
        if req.messages is not None:  # the prompt a chat request with these fields would have
            chat = translated_request(req.model_dump(
                exclude_none=True, include={"messages", "add_generation_prompt", "tools", "chat_template_kwargs",
                                            "thinking"}))
            ids = chat_prompt(served, chat).token_ids
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": served.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(state.principal), API_KEY],
              responses=responses(Text, 400, 401, 404, 503))
    async def detokenize(req: DetokenizeRequest):
        served = state.model(req.model)
        vocab = served.engine.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": served.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_responses_routes(app: FastAPI, state: ServerState) -> None:
    """OpenAI's Responses API, and the responses it keeps (per key)."""
    caller, store = Depends(state.principal), state.accounts.responses

    @app.post("/v1/responses", dependencies=[API_KEY],
              responses=responses(ResponsesReply, 400, 401, 402, 404, 429, 503, stream=ResponsesEvent))
    async def create_response(req: ResponsesRequest, raw: Request, principal: Principal = caller):
        served = state.model(req.model)
        state.refuse_if_queue_full(served)
        earlier = await asyncio.to_thread(earlier_conversation, store, req, principal.key_id)
        chat = responses_chat_request(req, earlier)
        return await _engine_call(create_chat_completion(served, chat, raw, state.accounts, principal, ResponsesJob,
                                                         responses=req, earlier=earlier, store=store,
                                                         key_id=principal.key_id))

    @app.get("/v1/responses/{response_id}", dependencies=[API_KEY], responses=responses(ResponsesReply, 401, 404))
    async def get_response(response_id: str, principal: Principal = caller):
        found = await asyncio.to_thread(store.load, response_id, principal.key_id)
        if found is None:
            raise _no_response(response_id)
        return found[0]

    @app.delete("/v1/responses/{response_id}", dependencies=[API_KEY],
                responses=responses(DeletedResponse, 401, 404))
    async def delete_response(response_id: str, principal: Principal = caller):
        if not await asyncio.to_thread(store.delete, response_id, principal.key_id):
            raise _no_response(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def _no_response(response_id: str) -> APIError:
    return APIError(404, f"no stored response {response_id!r} for this key", param="response_id",
                    code="response_not_found")


def _add_anthropic_routes(app: FastAPI, state: ServerState, signer: ThinkingSigner) -> None:
    """Anthropic's Messages API, at /v1/messages and under the /anthropic base URL DeepSeek uses."""
    caller = Depends(state.principal)

    async def messages(req: MessagesRequest, raw: Request, principal: Principal = caller):
        served = state.model(req.model)
        state.refuse_if_queue_full(served)
        chat = chat_request(req, served, signer, stream=bool(req.stream))
        return await _engine_call(create_chat_completion(served, chat, raw, state.accounts, principal, MessageJob,
                                                         signer=signer))

    async def tokens(req: CountTokensRequest, principal: Principal = caller):
        return await count_tokens(state.model(req.model), req, signer)

    for base in ("", "/anthropic"):
        app.post(f"{base}/v1/messages", dependencies=[API_KEY], include_in_schema=not base,
                 responses=responses(AnthropicReply, 400, 401, 402, 404, 429, 503, stream=AnthropicEvent,
                                     error=AnthropicError))(messages)
        app.post(f"{base}/v1/messages/count_tokens", dependencies=[API_KEY], include_in_schema=not base,
                 responses=responses(InputTokens, 400, 401, 404, 503, error=AnthropicError))(tokens)


def _add_database_handler(app: FastAPI, accounts: Accounts) -> None:
    async def database_down(request: Request, exc: Exception):
        accounts.health.failed(exc)
        down = database_unavailable(exc)
        return error_response(request, down.status, down.body(), down.headers)

    for error in UNREACHABLE:
        app.add_exception_handler(error, database_down)


async def _engine_call(work):
    try:
        return await work
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from exc
