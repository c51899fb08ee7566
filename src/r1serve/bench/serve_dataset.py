"""Prompts for the serving benchmark: random text of a set token length, chat questions, or a
JSONL file ({"prompt": ...} or {"messages": [...]}, optionally "max_tokens" per line)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from r1serve.bench.serve_client import RequestSpec
from r1serve.errors import InvalidRequestError

CHAT_QUESTIONS = [
    "Explain how a paged KV cache works, step by step.", "Write a short poem about the sea at night.",
    "What are the trade-offs between tensor and expert parallelism?", "Summarise the plot of Hamlet.",
    "How do I reverse a linked list in Python? Show code.", "Why is the sky blue?",
    "Give me three ideas for a weekend trip near mountains.", "What is 17 times 23? Think it through.",
    "Describe the water cycle to a ten-year-old.", "Compare SQLite and PostgreSQL for a small web app.",
]
WORDS = ("time people way year work day life world school state family student group country problem hand "
         "part place case week company system program question government number night point home water "
         "room mother area money story fact month lot right study book eye job word business issue side").split()


def random_prompts(n: int, input_len: int, tokenizer, seed: int) -> list[str]:
    """Text of about `input_len` tokens each: exact with a tokenizer, estimated without one."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(max(1, input_len))]
        text = " ".join(words)
        if tokenizer is not None:  # trim to the token budget
            ids = tokenizer.encode(text, add_special_tokens=False)[:input_len]
            text = tokenizer.decode(ids)
        prompts.append(text)
    return prompts


def load_requests(dataset: str, n: int, input_len: int, output_len: int, tokenizer, seed: int = 0) -> list[RequestSpec]:
    if dataset == "random":
        # Plain completions: a chat template would add its own tokens to --input-len's.
        return [RequestSpec(None, p, output_len) for p in random_prompts(n, input_len, tokenizer, seed)]
    if dataset == "chat":
        return [RequestSpec([{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}], None, output_len)
                for i in range(n)]
    return _from_jsonl(Path(dataset), n, output_len)


def _from_jsonl(path: Path, n: int, output_len: int) -> list[RequestSpec]:
    if not path.is_file():
        raise InvalidRequestError(f"--dataset {str(path)!r}: use random, chat, or an existing .jsonl file")
    specs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{i + 1} is not JSON: {e}") from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise InvalidRequestError(f"{path}:{i + 1} needs a 'prompt' or 'messages' field")
        specs.append(RequestSpec(row.get("messages"), row.get("prompt"), int(row.get("max_tokens", output_len))))
    if not specs:
        raise InvalidRequestError(f"{path} holds no requests")
    return [specs[i % len(specs)] for i in range(n)]  # cycled to --num-prompts
