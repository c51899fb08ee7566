"""What each command but `serve` does (serve_command.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from r1serve.cli.engine_flags import build_llm, cache_dir_from, sampling_from, unused_engine_flags
from r1serve.errors import R1ServeError


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
