"""Helpers for the platform tests: the CLI and `r1serve serve` as real processes on a tiny
model, and the databases they share (a SQLite file; PostgreSQL when one can be had)."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx

from server_process import ServerProcess

PROMPT = {"prompt": [5, 17, 42, 99, 3, 250, 7], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
WORST = len(PROMPT["prompt"]) + PROMPT["max_tokens"]  # what one request holds against a quota


def cli(*args: str, db: str) -> str:
    done = subprocess.run([sys.executable, "-m", "r1serve.cli", *args, "--db", db], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def new_key(db: str, name: str, *flags: str) -> dict:
    return json.loads(cli("keys", "create", "--name", name, "--json", *flags, db=db))


def complete(server, key: str | None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base + "/v1/completions", json={"model": "tiny", **PROMPT, **kw}, headers=headers,
                      timeout=120)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def serve_tiny(tiny, tmp_path, db: str, name: str = "server", extra: tuple[str, ...] = ()) -> ServerProcess:
    log = tmp_path / name / "server.log"
    log.parent.mkdir(exist_ok=True)
    return ServerProcess([str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1",
                          "--max-num-seqs", "8", *extra], log, db=db)
