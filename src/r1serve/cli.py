"""`r1serve pull | generate | chat | serve | keys | usage | info | bench | hw`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Only flag definitions at import: building the parser must not load torch, FastAPI or the
# load generator (each command imports what it runs).
from r1serve.bench.arguments import (add_offline_args, add_random_model_args, add_serve_args, add_speculative_args,
                                     add_vs_llama_server_args)
from r1serve.planner.cli import add_args as add_hw_args
from r1serve.errors import R1ServeError
from r1serve.tool_calls import PARSERS as TOOL_PARSERS


def cache_dir_from(args) -> Path:
    from r1serve.models.catalog import default_cache_dir

    # The one place the environment is read: flags win, then R1SERVE_CACHE_DIR.
    return Path(args.cache_dir or os.environ.get("R1SERVE_CACHE_DIR") or default_cache_dir())


def add_engine_args(parser: argparse.ArgumentParser, many: bool = False, only_with: str | None = None) -> None:
    """The model argument and the engine's flags; `only_with`: the flag without which they are
    refused (listed under their own heading in --help)."""
    parser.add_argument("model", nargs="+" if many else None,
                        help="catalog name (see `r1serve pull --list`), a .gguf file or an HF model directory")
    p = parser.add_argument_group(f"engine flags (with {only_with} only)") if only_with else parser
    first = len(parser._actions)
    _engine_flags(p)
    if only_with:
        parser.set_defaults(engine_flags={a.dest: (a.option_strings[0], a.default) for a in parser._actions[first:]})


def unused_engine_flags(args) -> list[str]:
    """The engine flags given a value other than their default."""
    return [flag for dest, (flag, default) in getattr(args, "engine_flags", {}).items()
            if getattr(args, dest) != default]


def _engine_flags(p) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and float weights (auto: the checkpoint's; a 16-bit one in the device's preferred "
                        "half precision)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or an installed platform plugin's name")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output per request (default: the model's context, within the KV cache)")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, dest="kv_cache_memory_gib", help="GiB for the KV cache")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (one batch)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="tokens one step computes: long prompts are prefilled in chunks of this")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of prompt prefixes seen before")
    p.add_argument("--kernel", default="auto", choices=["auto", "reference"],
                   help="'reference' runs the plain-torch twins of every kernel")
    p.add_argument("--quantization", "-q", default="auto", choices=["auto", "int4", "int8", "none"],
                   help="how weights are held on the CPU. auto: a GGUF's quantized matrices in their own block "
                        "form (Q4_K, Q6_K, Q8_0, ...), float ones in the model's dtype; int4/int8: float matrices "
                        "quantized once at load; none: every weight dense (dequantized), the exact path")
    p.add_argument("--cpu-isa", default="auto", choices=["auto", "avx512", "avx2", "neon", "scalar"],
                   help="vector ISA of the CPU kernels (auto: the CPU's best; a lower one measures what such CPUs run)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the KV cache's dtype (auto: the activations', bf16 under float32 ones that the "
                        "quantized linears already round, on a CPU without native bf16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode steps eagerly, no CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks one model is split across (heads, MLP columns, vocabulary)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="DeepSeekMoE: split the routed experts whole across the tensor-parallel ranks")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas, each of --tensor-parallel-size ranks, with requests balanced across them")
    p.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"],
                   help="mp: ranks are processes of this node; ray: actors of the Ray cluster that "
                        "`ray start` made (RAY_ADDRESS), across its nodes")
    p.add_argument("--speculative", default=None, choices=["ngram", "mtp"],
                   help="speculative decoding: ngram drafts from the prompt and output so far; mtp from the "
                        "checkpoint's multi-token-prediction layer (DeepSeek-V3/R1). Lossless either way")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step (mtp: 1 or 2 suit R1)")
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="ngram: longest n-gram matched")
    p.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram: shortest n-gram matched")
    p.add_argument("--speculative-max-rows", type=int, default=16,
                   help="most rows a decode step holds, drafts included (within it drafts follow measured step costs)")


def add_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, help="key and usage database: sqlite:///FILE (default: r1serve.db in the "
                                             "data directory) or postgresql+psycopg://USER:PASS@HOST/DB")
    p.add_argument("--prices", default=None, metavar="FILE.toml",
                   help="price table per million tokens (default: r1serve's, DeepSeek's published prices; "
                        "see server/prices.toml)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.6, help="DeepSeek's advice for R1: 0.5-0.7")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the likeliest")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def engine_options(args) -> dict:
    return dict(device=args.device, max_model_len=args.max_model_len, kv_cache_memory_gib=args.kv_cache_memory_gib,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching, kernel=args.kernel, num_threads=args.threads,
                quantization=args.quantization, enforce_eager=args.enforce_eager,
                cpu_isa=args.cpu_isa, kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel,
                data_parallel_size=args.data_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend,
                speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
                speculative_max_rows=args.speculative_max_rows)


def build_llm(args):
    from r1serve.llm import LLM

    return LLM(args.model, dtype=args.dtype, cache_dir=cache_dir_from(args), **engine_options(args))


def sampling_from(args):
    from r1serve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop))


def stream_text(llm, prompt, params, out=None) -> str:
    """Print a request's text as it is produced; returns the whole text."""
    # Looked up per call, not bound at import: redirect_stdout and test capture replace it.
    out = out or sys.stdout
    shown = ""
    for o in llm.stream(prompt, params):
        text = o.outputs[0].text
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    return shown


def cmd_pull(args) -> None:
    from r1serve.models.catalog import CATALOG, pull

    if args.list or not args.name:
        cache_dir = cache_dir_from(args)
        for name, entry in CATALOG.items():
            print(f"{name:34s} {'pulled' if entry.is_pulled(cache_dir) else '-':6s} {entry.description}")
        return
    path = pull(args.name, cache_dir_from(args))
    print(f"{args.name} is ready at {path}")


def cmd_list(args) -> None:
    from r1serve.models.catalog import pulled

    here = pulled(cache_dir_from(args))
    if not here:
        print("no model pulled yet: `r1serve pull --list` shows the catalog")
    for entry, size in here:
        print(f"{entry.name:34s} {size / 2**30:7.2f} GiB  {entry.local_path(cache_dir_from(args))}")


def cmd_rm(args) -> None:
    from r1serve.models.catalog import remove

    freed = remove(args.name, cache_dir_from(args))
    print(f"removed {args.name} ({freed / 2**30:.2f} GiB freed)")


def cmd_generate(args) -> None:
    params = sampling_from(args)  # bad flags fail before the model loads
    llm = build_llm(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    stream_text(llm, prompt, params)


def cmd_chat(args) -> None:
    from r1serve.terminal_chat import run_chat

    params = sampling_from(args)  # bad flags fail before the model loads
    run_chat(build_llm(args), params, args.model, args.system, args.max_reasoning_tokens)


def cmd_info(args) -> None:
    if not args.load and unused_engine_flags(args):
        raise R1ServeError(f"{', '.join(unused_engine_flags(args))}: engine flags change how a model is loaded, "
                           "not what its files hold; give them with --load")
    if not args.load:  # the files' headers only: a moment, whatever the model's size
        from r1serve.model_card import describe, model_card

        card = model_card(args.model, cache_dir_from(args))
        print(json.dumps(card.as_dict(), indent=2) if args.json else describe(card))
        return
    path = Path(args.model).expanduser()
    if path.suffix == ".json" and path.is_file():
        print(json.dumps(_config_only_info(path, args), indent=2))
        return
    e = build_llm(args).engine
    info = e.numbers().as_dict() | {"kv_blocks": e.num_kv_blocks, "max_model_len": e.max_model_len,
                                    "platform": e.platform.name, "dtype": str(e.loaded.dtype).removeprefix("torch."),
                                    "kv_cache_dtype": str(e.kv_dtype).removeprefix("torch."),
                                    "device": e.platform.describe,
                                    "kernels": [{"op": b.op, "kernel": b.kernel, "modules": b.modules}
                                                for b in e.kernels],
                                    "linears": linear_report(e.loaded.model)}
    print(json.dumps(info, indent=2))


def linear_report(model) -> list[dict]:
    """How the model's linears compute, grouped by the form of their weight (platforms/cpu/linear.py)."""
    from collections import Counter

    kinds: Counter = Counter()
    for m in model.modules():
        if type(m).__name__ == "CpuLinear":
            kinds[m.extra_repr().split(", ", 2)[2]] += 1
        elif type(m).__name__ in ("Linear", "Fp8BlockLinear"):
            kinds[type(m).__name__] += 1
    return [{"linear": kind, "count": n} for kind, n in sorted(kinds.items())]


def _config_only_info(path: Path, args) -> dict:
    """Planning numbers from a config.json alone, no weights needed (R1 before downloading it)."""
    import torch

    from r1serve.models.planning import numbers_from_config

    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise R1ServeError(f"{path} is not valid JSON: {e}") from None
    dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
    return numbers_from_config(config, dtype, int(args.kv_cache_memory_gib * 2**30)).as_dict()


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
    from r1serve.server.prices import load_prices

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
    from r1serve.server.settle_journal import journal_path

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


def _access(args):
    from r1serve.server.access import Access

    from r1serve.server.prices import load_prices

    return Access(db_url_from(args), load_prices(getattr(args, "prices", None)))


def cmd_keys(args) -> None:
    from r1serve.server.keys_cli import run_keys

    run_keys(args, _access(args))


def cmd_usage(args) -> None:
    from r1serve.server.keys_cli import run_usage

    run_usage(args, _access(args))


def cmd_bench(args) -> None:
    if args.bench_command == "serve":
        from r1serve.bench.serve import main as bench_serve

        bench_serve(args, cache_dir_from(args))
        return
    if args.bench_command == "speculative":
        from r1serve.bench.speculative import main as bench_speculative

        bench_speculative(args, cache_dir_from(args))
        return
    if args.bench_command == "vs-llama-server":
        from r1serve.bench.vs_llama_server import main as bench_vs_llama_server

        bench_vs_llama_server(args)
        return
    if args.bench_command == "random-model":
        from r1serve.bench.random_checkpoint import main as random_model

        random_model(args)
        return
    from r1serve.bench.offline import main as bench_offline

    bench_offline(args, cache_dir_from(args))


def cmd_hw(args) -> None:
    from r1serve.planner.cli import run

    run(args, cache_dir_from(args))


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none or its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)".strip()


CACHE_DIR_HELP = "models and data (default: $R1SERVE_CACHE_DIR or ~/.cache/r1serve)"


def _everywhere(parser: argparse.ArgumentParser) -> None:
    """Every subcommand takes the global options too (`r1serve keys list --cache-dir D`), and
    shows its defaults."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"  # argparse shows nothing for an option without help
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                # SUPPRESS: unset unless given here, so a value before the subcommand stands.
                child.add_argument("--cache-dir", default=argparse.SUPPRESS, help=CACHE_DIR_HELP)
                _everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    from r1serve import __version__

    parser = argparse.ArgumentParser(prog="r1serve", description="Serve DeepSeek-R1 and its family.")
    parser.add_argument("--version", action="version", version=f"r1serve {__version__}")
    parser.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a catalog model")
    p.add_argument("name", nargs="?")
    p.add_argument("--list", action="store_true", help="list the catalog, marking what is pulled")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the models pulled here, with their size on disk")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a pulled model's files")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=64)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-reasoning-tokens", type=int, default=None,
                   help="a reasoning model thinks at most this long, then answers")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI- and DeepSeek-compatible HTTP server")
    add_engine_args(p, many=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", action="append", default=None,
                   help="the name clients send as `model` (default: the model argument); once per model")
    p.add_argument("--reasoning-parser", default="auto", choices=["auto", "deepseek_r1", "none"],
                   help="split <think>...</think> into reasoning_content (auto: on for models with a </think> token)")
    p.add_argument("--tool-call-parser", default="auto", choices=list(TOOL_PARSERS),
                   help="the format the model writes tool calls in (auto: the one its chat template writes)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 429")
    p.add_argument("--engine-on-thread", action="store_true",
                   help="step each engine on a thread of the server process rather than in a process of its own "
                        "(the engine and the HTTP layer then share one GIL: slower under load)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20)
    p.add_argument("--max-header-bytes", type=int, default=64 * 2**10,
                   help="request line and headers together, beyond which 431")
    p.add_argument("--max-headers", type=int, default=100, help="header fields per request, beyond which 431")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a connection gets to send its request's headers (else 408 and closed)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle connection is kept open between requests")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_db_arg(p)
    p.add_argument("--cached-token-weight", type=float, default=None,
                   help="what one prefix-cache-hit prompt token counts against a quota (default: the price "
                        "table's hit price over its miss price, 0.1 at DeepSeek's prices)")
    p.add_argument("--quota-lease", type=float, default=30.0,
                   help="seconds after which the quota holds of a server that died (renewed every third of this "
                        "while it lives) go back to their keys")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys: create, list, revoke, update")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="a new key; its secret is printed once")
    k.add_argument("--name", required=True)
    k.add_argument("--quota-tokens", default=None, help="token allowance (default: unlimited)")
    k.add_argument("--rpm", default=None, help="requests per minute (default: unlimited)")
    k.add_argument("--tpm", default=None, help="tokens per minute (default: unlimited)")
    k.add_argument("--admin", action="store_true", help="may manage keys and see everyone's usage over HTTP")
    k.add_argument("--json", action="store_true", help='print {"id": ..., "key": "sk-..."} for scripts')
    k = keys.add_parser("list")
    k.add_argument("--all", action="store_true", help="include revoked keys")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", help="refuse a key from now on, on every server sharing the database")
    k.add_argument("key_id")
    k.add_argument("--json", action="store_true", help="print the key as JSON")
    k = keys.add_parser("update", help="change limits; 'none' removes one")
    k.add_argument("key_id")
    k.add_argument("--quota-tokens", default=None)
    k.add_argument("--rpm", default=None)
    k.add_argument("--tpm", default=None)
    k.add_argument("--json", action="store_true", help="print the key as JSON")
    for k in keys.choices.values():
        add_db_arg(k)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("usage", help="the usage ledger, summed by day, model or key")
    p.add_argument("--key", default=None, help="one key's usage: its id or its name")
    p.add_argument("--since", default=None, help="YYYY-MM-DD")
    p.add_argument("--by", default="day", choices=["day", "model", "key"])
    p.add_argument("--json", action="store_true")
    add_db_arg(p)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("info", help="what a model is, from its files' headers at once: architecture, parameters, "
                                    "weights' storage, size on disk, context, KV bytes per token (deepseek-r1: "
                                    "from the built-in config, nothing downloaded)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--load", action="store_true",
                   help="load the model as the engine would and report its kernels, linears and KV budget "
                        "(the engine flags below apply)")
    add_engine_args(p, only_with="--load")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    add_offline_args(bench.add_parser("offline", help="r1serve vs transformers generate(), same prompts, same run"))
    add_serve_args(bench.add_parser("serve", help="load an OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, "
                                                   "goodput"))
    add_random_model_args(bench.add_parser("random-model", help="write a random-weight checkpoint for benchmarks"))
    add_vs_llama_server_args(bench.add_parser("vs-llama-server", help="r1serve against llama.cpp's llama-server on "
                                              "one GGUF file: start-up, memory, decode, prefill"))
    add_speculative_args(bench.add_parser("speculative", help="speculative decoding against plain decoding, "
                                                               "same model, same run"))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("hw", help="accelerators: catalog, serving planner (%% of an H100), local measurement")
    add_hw_args(p)
    p.set_defaults(func=cmd_hw)
    _everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `r1serve` alone: what it can do
        parser.print_help()
        return 0
    try:
        args.func(args)
    except R1ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
