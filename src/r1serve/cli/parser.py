"""The commands, their flags and help; main()."""
from __future__ import annotations

import argparse
import sys

from r1serve.bench.arguments import (add_offline_args, add_random_model_args, add_serve_args, add_speculative_args,
                                     add_vs_llama_server_args)
from r1serve.cli.commands import (cmd_bench, cmd_chat, cmd_generate, cmd_hw, cmd_info, cmd_list, cmd_pull,
                                  cmd_rm)
from r1serve.cli.engine_flags import add_db_arg, add_engine_args, add_sampling_args
from r1serve.cli.serve_command import cmd_keys, cmd_serve, cmd_usage
from r1serve.errors import R1ServeError
from r1serve.planner.cli import add_args as add_hw_args
from r1serve.tool_calls import PARSERS as TOOL_PARSERS


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
