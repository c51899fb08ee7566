"""`r1serve serve`: an engine process per model, then the HTTP server over them; and the
key and usage commands, which open the same database."""
from __future__ import annotations

from r1serve.cli.engine_flags import cache_dir_from, engine_options
from r1serve.errors import R1ServeError


def cmd_serve(args) -> None:
    import logging

    from r1serve.config import EngineConfig
    from r1serve.models.catalog import resolve_model

    if args.served_model_name and len(args.served_model_name) != len(args.model):
        raise R1ServeError(f"--served-model-name was given {len(args.served_model_name)} time(s) for "
                           f"{len(args.model)} model(s); give one name per model or none")
    names = args.served_model_name or args.model
    cache_dir = cache_dir_from(args)
    engines = {name: (resolve_model(model, cache_dir),
                      EngineConfig(model=model, cache_dir=cache_dir, dtype=args.dtype, **engine_options(args)))
               for name, model in zip(names, args.model)}
    _check_port_free(args.host, args.port)
    from r1serve.accounts.prices import load_prices

    prices = load_prices(args.prices)  # a bad table fails now, before any model loads
    # The engine processes start first (each loads its model at once, importing torch itself),
    # so that the server's own start-up below runs beside them instead of before them.
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin list at every start says nothing to a user
    cores = _spawn_engines(engines) if not args.engine_on_thread else {}

    from r1serve.server.thinking_signer import signing_key
    from r1serve.server.app import ServerConfig
    from r1serve.server.connection_limits import ConnectionLimits
    from r1serve.server.launch import serve
    from r1serve.server.served_model import ModelSpec
    from r1serve.accounts.settle_journal import journal_path

    specs = tuple(ModelSpec(name, path, engine, args.reasoning_parser, args.tool_call_parser)
                  for name, (path, engine) in engines.items())
    config = ServerConfig(specs, db_url_from(args), prices,
                          cached_token_weight=args.cached_token_weight,
                          max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                          engine_process=not args.engine_on_thread, quota_lease_s=args.quota_lease,
                          journal_path=journal_path(db_url_from(args), cache_dir),
                          signing_key=signing_key(cache_dir / "thinking-signing.key"))
    limits = ConnectionLimits(args.max_header_bytes, args.max_headers, args.header_timeout, args.timeout_keep_alive)
    code = serve(config, args.host, args.port, grace_s=args.shutdown_grace, log_level=args.log_level, cores=cores,
                 limits=limits)
    if code:
        raise SystemExit(code)


def _check_port_free(host: str, port: int) -> None:
    """Fail at once on a port another process holds, before anything loads."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise R1ServeError(f"cannot listen on {host}:{port}: {e.strerror}; is another server running there? "
                               "Pick another --port") from None


def _spawn_engines(engines: dict) -> dict:
    """An engine process per model served by one (data parallelism starts its replicas later)."""
    from r1serve.engine.engine_core import ProcessCore

    cores = {}
    for name, (path, engine) in engines.items():
        if engine.data_parallel_size == 1:
            cores[name] = ProcessCore(engine, path)
            cores[name].spawn()
    return cores


def db_url_from(args) -> str:
    """--db, or a SQLite file in the data directory."""
    if args.db:
        return args.db
    path = cache_dir_from(args) / "r1serve.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _accounts(args):
    from r1serve.accounts.accounts import Accounts

    from r1serve.accounts.prices import load_prices

    return Accounts(db_url_from(args), load_prices(getattr(args, "prices", None)))


def cmd_keys(args) -> None:
    from r1serve.cli.account_commands import run_keys

    run_keys(args, _accounts(args))


def cmd_usage(args) -> None:
    from r1serve.cli.account_commands import run_usage

    run_usage(args, _accounts(args))
