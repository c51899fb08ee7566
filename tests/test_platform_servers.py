"""Several processes on one key database, on SQLite and on PostgreSQL: what the CLI or a
second server changes takes effect on a running server, a killed server's quota holds come
back to the key, and per-minute limits hold across servers together."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from r1serve.accounts.admission import held_tokens
from r1serve.accounts.database import db_now

from platform_processes import PROMPT, WORST, bearer, cli, complete, new_key, serve_tiny

LEASE_S = 3.0  # the servers' --quota-lease here: holds of a killed one come back this long after


def test_cli_changes_reach_a_running_server_at_once(tiny, tmp_path, any_db):
    """Revoke, lower a quota, create a key, each from another process: the running server
    acts on it at its next request (every request reads the key's row)."""
    alice, bob = new_key(any_db, "alice"), new_key(any_db, "bob", "--quota-tokens", "100000")
    server = serve_tiny(tiny, tmp_path, any_db)
    try:
        assert complete(server, alice["key"]).status_code == 200
        cli("keys", "revoke", alice["id"], db=any_db)
        assert complete(server, alice["key"]).status_code == 401
        assert complete(server, bob["key"]).status_code == 200
        cli("keys", "update", bob["id"], "--quota-tokens", str(WORST - 1), db=any_db)
        r = complete(server, bob["key"])
        assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_quota"
        carol = new_key(any_db, "carol")
        assert complete(server, carol["key"]).status_code == 200
    finally:
        server.stop()


def test_revoking_every_key_locks_the_server(tiny, tmp_path, any_db):
    only = new_key(any_db, "only")
    server = serve_tiny(tiny, tmp_path, any_db)
    try:
        assert complete(server, only["key"]).status_code == 200
        cli("keys", "revoke", only["id"], db=any_db)
        time.sleep(1.2)  # past any recheck of whether the server is open
        for key in (only["key"], None, "sk-anything"):
            r = complete(server, key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    finally:
        server.stop()


def test_a_key_made_by_a_second_server_works_on_the_first(tiny, tmp_path, any_db):
    admin = new_key(any_db, "admin", "--admin")
    first, second = (serve_tiny(tiny, tmp_path, any_db, name=n, extra=("--quota-lease", str(LEASE_S)))
                     for n in ("first", "second"))
    try:
        r = httpx.post(second.base + "/v1/admin/keys", json={"name": "dave", "quota_tokens": WORST},
                       headers=bearer(admin["key"]), timeout=30)
        assert r.status_code == 201
        dave = r.json()
        assert complete(first, dave["key"]).status_code == 200
        r = complete(second, dave["key"])  # the quota spent on the first server is spent on the second
        assert r.status_code == 402
        httpx.delete(first.base + f"/v1/admin/keys/{dave['id']}", headers=bearer(admin["key"]), timeout=30)
        assert complete(second, dave["key"]).status_code == 401
    finally:
        first.stop()
        second.stop()


def held(db: str, key_id: str) -> int:
    """The key's live holds, read straight from the database."""
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        tokens = held_tokens(conn, key_id, db_now(conn))
    engine.dispose()
    return tokens


def engine_process(server) -> int:
    """The pid of the server's engine process (a multiprocessing child of the API process)."""
    # Children are listed under the thread that started them.
    children = [c for task in Path(f"/proc/{server.proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    (engine,) = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return int(engine)


def hold_in_flight(server, db: str, key: dict, max_tokens: int) -> tuple[cf.Future, int]:
    """A request admitted (its worst case held in the database) that cannot finish: the
    server's engine process is stopped (SIGSTOP) before it is sent, while the API process
    lives on and renews its lease. Returns the pending response and the engine's pid.
    (Stopping the API process instead could freeze it inside a SQLite write, and every other
    process would wait for the lock.)"""
    engine = engine_process(server)
    os.kill(engine, signal.SIGSTOP)
    pending = cf.ThreadPoolExecutor(1).submit(complete, server, key["key"], max_tokens=max_tokens)
    worst = len(PROMPT["prompt"]) + max_tokens
    deadline = time.monotonic() + 30
    while held(db, key["id"]) != worst:
        assert time.monotonic() < deadline and not pending.done(), "the request was never admitted"
        time.sleep(0.1)
    return pending, engine


def test_a_killed_servers_holds_come_back_to_the_key(tiny, tmp_path, any_db):
    long = 400  # a worst case that takes most of the quota while it runs
    quota = len(PROMPT["prompt"]) * 2 + long  # while it runs: less left than a prompt and one token
    key = new_key(any_db, "holder", "--quota-tokens", str(quota))
    doomed = serve_tiny(tiny, tmp_path, any_db, name="doomed", extra=("--quota-lease", str(LEASE_S)))
    survivor = serve_tiny(tiny, tmp_path, any_db, name="survivor", extra=("--quota-lease", str(LEASE_S)))
    try:
        _, engine = hold_in_flight(doomed, any_db, key, long)
        r = complete(survivor, key["key"])  # the running request holds its worst case
        assert r.status_code == 402 and "held by requests running now" in r.json()["error"]["message"]
        for pid in (doomed.proc.pid, engine):  # the whole server, as a crash of its host would
            os.kill(pid, signal.SIGKILL)
        doomed.proc.wait(30)
        killed_at = time.monotonic()
        while complete(survivor, key["key"]).status_code == 402:
            assert time.monotonic() - killed_at < LEASE_S + 5, "the dead server's hold never expired"
            time.sleep(0.3)
        # Not before the lease could have expired: the hold was the dead server's, not lost.
        assert time.monotonic() - killed_at >= 2 * LEASE_S / 3 - 0.5  # renewed at most a third before
        info = httpx.get(survivor.base + "/v1/usage", headers=bearer(key["key"]), timeout=30).json()
        assert info["key"]["used_tokens"] == WORST  # the killed request charged nothing (no row), the next did
    finally:
        doomed.stop()
        survivor.stop()


def test_holds_are_not_cleared_by_the_cli(tiny, tmp_path, any_db):
    """Opening the database elsewhere (the CLI) leaves a live server's holds alone."""
    long = 400
    key = new_key(any_db, "busy", "--quota-tokens", "100000")
    server = serve_tiny(tiny, tmp_path, any_db)
    try:
        pending, engine = hold_in_flight(server, any_db, key, long)
        json.loads(cli("keys", "list", "--json", db=any_db))
        assert held(any_db, key["id"]) == len(PROMPT["prompt"]) + long
        os.kill(engine, signal.SIGCONT)
        assert pending.result(timeout=120).status_code == 200
        assert held(any_db, key["id"]) == 0
    finally:
        server.stop()


def test_requests_per_minute_hold_across_two_servers(tiny, tmp_path, any_db):
    rpm = 4
    key = new_key(any_db, "limited", "--rpm", str(rpm), "--tpm", str(1000 * WORST))
    servers = [serve_tiny(tiny, tmp_path, any_db, name=f"s{i}") for i in range(2)]
    try:
        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: complete(servers[i % 2], key["key"], max_tokens=2), range(12)))
        codes = [r.status_code for r in results]
        assert codes.count(200) == rpm and codes.count(429) == 12 - rpm, codes
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 60
                   for r in results if r.status_code == 429)
    finally:
        for s in servers:
            s.stop()
