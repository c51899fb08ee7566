"""Run the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C.

On the first signal the server stops accepting connections and answers 503 to new requests
on open ones; running requests finish (up to `grace_s`), then the engines stop.
"""
from __future__ import annotations

import json
import logging
import resource

import uvicorn

from r1serve.server.app import ServerConfig, ServerState, build_app
from r1serve.server.connection_limits import ConnectionLimits

log = logging.getLogger("r1serve.server")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.app_state = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.app_state is not None and not self.app_state.draining:
            log.info("draining: no new requests; running ones get up to %ss to finish",
                     self.config.timeout_graceful_shutdown)
            self.app_state.draining = True
        super().handle_exit(sig, frame)


def serve(config: ServerConfig, host: str, port: int, grace_s: float = 30.0, log_level: str = "info",
          cores: dict | None = None, limits: ConnectionLimits = ConnectionLimits()) -> int:
    """Blocks until the server stops; returns the process exit code. `cores`: engine
    processes already spawned, by model name."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin list at every start says nothing to users
    _raise_open_files_limit()
    holder: dict = {}
    app = build_app(config, on_fatal=lambda: holder["server"].handle_exit(0, None), cores=cores,
                    on_ready=lambda state: log.info("%s", ready_banner(host, port, state)))
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                        access_log=False, http=limits.protocol(), timeout_keep_alive=limits.keep_alive_s)
    server = _DrainingServer(uv)
    server.app_state = app.state.r1serve
    holder["server"] = server
    names = ", ".join(m.name for m in config.models)
    log.info("r1serve on http://%s:%d/v1 (models: %s; loading in the background, see /health)", host, port, names)
    server.run()
    return 1 if app.state.r1serve.load_error else 0


def _raise_open_files_limit() -> None:
    # Each client is a socket: a soft limit of 1024 (common) would refuse clients long before
    # the machine runs out of anything. The hard limit is the operator's to set.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)


def ready_banner(host: str, port: int, state: ServerState) -> str:
    """Where to go once the models are loaded: the playground, the API, a request to copy."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    body = json.dumps({"model": state.config.models[0].name, "messages": [{"role": "user", "content": "Hello!"}]})
    key = "" if state.accounts.is_open else " -H \"Authorization: Bearer $OPENAI_API_KEY\""
    return (f"ready. Playground: {base}/ui/  API: {base}/v1  Try:\n"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{key} -d '{body}'")
