"""The model argument and the engine's flags (one per EngineConfig field made with
config.option), the sampling flags, and the data directory."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


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
    # One flag per EngineConfig field made with config.option, named and typed by it.
    from r1serve.config import flag_fields

    for f in flag_fields():
        names = f.metadata["names"] or ("--" + f.name.replace("_", "-"),)
        if f.type == "bool":
            p.add_argument(*names, dest=f.name, action="store_false" if f.default else "store_true",
                           help=f.metadata["help"])
        else:
            p.add_argument(*names, dest=f.name, type=_FLAG_TYPES[f.type], default=f.default,
                           choices=f.metadata["choices"], help=f.metadata["help"],
                           metavar=None if f.metadata["choices"] else names[0].lstrip("-").replace("-", "_").upper())


_FLAG_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str}


def add_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, help="key and usage database: sqlite:///FILE (default: r1serve.db in the "
                                             "data directory) or postgresql+psycopg://USER:PASS@HOST/DB")
    p.add_argument("--prices", default=None, metavar="FILE.toml",
                   help="price table per million tokens (default: r1serve's, DeepSeek's published prices; "
                        "see accounts/prices.toml)")


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
    """The EngineConfig fields the engine flags set (dtype aside: LLM takes it by name)."""
    from r1serve.config import flag_fields

    return {f.name: getattr(args, f.name) for f in flag_fields() if f.name != "dtype"}


def build_llm(args):
    from r1serve.llm import LLM

    return LLM(args.model, dtype=args.dtype, cache_dir=cache_dir_from(args), **engine_options(args))


def sampling_from(args):
    from r1serve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop))
