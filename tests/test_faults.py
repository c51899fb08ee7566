"""Faults and hostile clients: a database that goes away and comes back under keyed traffic,
a non-streamed client that leaves, memory under steady traffic, text that is not Unicode,
oversized headers, idle and slow connections. Each against a real server process."""
from __future__ import annotations

import concurrent.futures as cf
import json
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from r1serve.accounts.database import admissions, api_keys, open_database, usage_ledger
from r1serve.accounts.usage_ledger import Ledger, UsageRecord

from platform_processes import bearer, complete, new_key, serve_tiny
from server_process import ServerProcess


def post_raw(server, path: str, body: dict, key: str | None = None) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a client's JSON encoder does (httpx's
    # own encoder would refuse to send it).
    headers = {"content-type": "application/json"} | (bearer(key) if key else {})
    return httpx.post(server.base + path, content=json.dumps(body).encode(), headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- the database goes away under keyed traffic ----------------------------------------------------


class LocalCluster:
    """The PostgreSQL cluster scripts/start_postgres.sh started, stopped and started again."""

    def __init__(self, url: str) -> None:
        port = sa.engine.make_url(url).port
        if shutil.which("pg_lsclusters") is None or sa.engine.make_url(url).host not in ("127.0.0.1", "localhost"):
            pytest.skip("needs the local Debian PostgreSQL cluster to stop and start it")
        rows = [line.split() for line in subprocess.run(["pg_lsclusters", "-h"], capture_output=True,
                                                        text=True).stdout.splitlines()]
        match = [r for r in rows if len(r) > 2 and r[2] == str(port)]
        if not match:
            pytest.skip(f"no local cluster on port {port}")
        self.version, self.name = match[0][0], match[0][1]

    def _ctl(self, action: str) -> None:
        fast = ["-m", "fast"] if action == "stop" else []
        subprocess.run(["pg_ctlcluster", self.version, self.name, action, *fast], check=True, capture_output=True)

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def health(server) -> httpx.Response:
    return httpx.get(server.base + "/health", timeout=30)


def long_request(server, key: str, stream: bool) -> int:
    """A request admitted before the outage and still running in it: answered in full."""
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=bearer(key), timeout=120) as r:
        text = r.read().decode()
    assert r.status_code == 200 and '"error"' not in text, text[-500:]
    return r.status_code


def test_database_outage_under_keyed_traffic(tiny, tmp_path, pg_url):
    cluster = LocalCluster(pg_url)
    key = new_key(pg_url, "outage", "--quota-tokens", "1000000")
    server = serve_tiny(tiny, tmp_path, pg_url, extra=("--quota-lease", "3", "--max-num-seqs", "4"))
    try:
        assert complete(server, key["key"]).status_code == 200
        assert health(server).json() == {"status": "ok", "database": "ok", "unsettled": 0}
        with cf.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(long_request, server, key["key"], stream) for stream in (True, False, True, False)]
            wait_for(lambda: server.metric("r1serve:num_requests_running") == 4, 30, "four requests running")
            cluster.stop()
            try:
                # Keyed requests: 503 naming the database, with Retry-After; nothing is run.
                r = complete(server, key["key"])
                err = assert_error(r, 503, "database_unavailable")
                assert "database" in err["message"] and int(r.headers["retry-after"]) > 0
                down = wait_for(lambda: (h := health(server)).status_code == 503 and h, 10, "/health reports it")
                assert down.json()["database"] == "unreachable" and "database" in down.json()["error"]
                # What was running when it went finishes, answered in full.
                assert [f.result() for f in running] == [200] * 4
                assert health(server).json()["unsettled"] == 4
            finally:
                cluster.start()
        # Back without a restart: healthy, the journal replayed, keyed requests run again.
        wait_for(lambda: health(server).status_code == 200, 60, "/health ok again")
        wait_for(lambda: health(server).json()["unsettled"] == 0, 30, "the journal settled")
        assert complete(server, key["key"]).status_code == 200
    finally:
        server.stop()
    engine = open_database(pg_url)
    with engine.begin() as conn:
        rows = conn.execute(sa.select(usage_ledger.c.request_id, usage_ledger.c.charged_tokens)
                            .where(usage_ledger.c.key_id == key["id"])).all()
        held = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(admissions.c.held_tokens), 0))
                            .where(admissions.c.key_id == key["id"])).scalar_one()
        used = conn.execute(sa.select(api_keys.c.used_tokens).where(api_keys.c.id == key["id"])).scalar_one()
    engine.dispose()
    # Six requests ran (the 503 did not): six rows, each once, charged once; no hold is left.
    assert len(rows) == 6 and len({r.request_id for r in rows}) == 6
    assert used == sum(r.charged_tokens for r in rows) and held == 0


def test_a_journaled_settlement_is_charged_exactly_once(tmp_path):
    from r1serve.accounts.settle_journal import SettleJournal

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(open_database(url))
    with ledger.db.begin() as conn:
        conn.execute(api_keys.insert().values(id="key_a", name="a", key_hash="0" * 64, prefix="sk-a…", is_admin=False,
                                              used_tokens=0, created_at=dt_now()))
        held = conn.execute(admissions.insert().values(key_id="key_a", lease_id="srv_x", held_tokens=50,
                                                       rate_tokens=50, admitted_at=dt_now())).inserted_primary_key[0]
    journal = SettleJournal(tmp_path / "journal.sqlite")
    record = UsageRecord("cmpl-1", "key_a", "m", 10, 0, 20, 0, 5, "ok")
    journal.write(record.request_id, record, held)
    journal.write("cmpl-1", record, held)  # written twice (a retried write): kept once
    ledger.settle(UsageRecord("cmpl-2", "key_a", "m", 1, 0, 1, 0, 5, "ok"), None)
    journal.write("cmpl-2", UsageRecord("cmpl-2", "key_a", "m", 1, 0, 1, 0, 5, "ok"), None)  # its commit got through
    assert journal.pending() == 2

    def away(*_):
        raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(sa.exc.OperationalError):  # the database is still away: nothing is lost
        journal.replay(away)
    assert journal.pending() == 2
    assert journal.replay(ledger.settle_once) == 2 and journal.pending() == 0
    assert journal.replay(ledger.settle_once) == 0
    with ledger.db.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage_ledger)).scalar_one() == 2
        assert conn.execute(sa.select(api_keys.c.used_tokens)).scalar_one() == 30 + 2
        assert conn.execute(sa.select(admissions.c.held_tokens)).scalar_one() == 0


def dt_now():
    from r1serve.accounts.database import utcnow

    return utcnow()


# ---- a server for hostile clients: short header and keep-alive timeouts --------------------------


@pytest.fixture(scope="module")
def guarded(smollm2_gguf, tmp_path_factory):
    server = ServerProcess([str(smollm2_gguf), "--served-model-name", "m", "--threads", "2", "--header-timeout", "1",
                            "--timeout-keep-alive", "1", "--max-header-bytes", "16384", "--max-headers", "50"],
                           tmp_path_factory.mktemp("guarded") / "server.log")
    yield server
    server.stop()


def test_a_non_streamed_client_that_leaves_is_aborted(guarded):
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(guarded.base + "/v1/completions", json=body, timeout=1.5)  # gives up and closes
    # Aborted within a step or so, not run to its 1000 tokens (tens of seconds here).
    guarded.wait_idle(timeout=5)
    assert httpx.post(guarded.base + "/v1/completions", json=body | {"max_tokens": 2}, timeout=60).status_code == 200


SURROGATE = "a\ud800b"
SURROGATE_CASES = {
    "chat content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    "chat text part": ("/v1/chat/completions",
                       {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages"),
    "tool arguments": ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": '{"city": "\\ud800"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}, "messages"),
    "chat stop": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [SURROGATE]},
                  "stop"),
    "completion prompt": ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    "completion prompts": ("/v1/completions", {"prompt": ["fine", SURROGATE]}, "prompt"),
    "tokenize prompt": ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    "tokenize messages": ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_text_that_is_not_unicode_is_a_400_naming_the_field(guarded, case):
    path, body, param = SURROGATE_CASES[case]
    err = assert_error(post_raw(guarded, path, {"model": "m", "max_tokens": 2} | body), 400)
    assert err["param"] == param and "Unicode" in err["message"] and err["type"] == "invalid_request_error"


def test_whole_surrogate_pairs_are_fine(guarded):
    r = post_raw(guarded, "/tokenize", {"model": "m", "prompt": "smile \ud83d\ude00"})
    assert r.status_code == 200 and r.json()["count"] > 0


def raw_request(server, data: bytes, wait: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; what comes back until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_oversized_headers_are_431(guarded):
    big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, err = status_and_error(raw_request(guarded, big))
    assert status == 431 and "16384 bytes" in err["message"]
    many = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n"
    status, err = status_and_error(raw_request(guarded, many))
    assert status == 431 and "50 fields" in err["message"]
    # Headers within the bounds are served.
    assert httpx.get(guarded.base + "/v1/models", headers={"X-Fine": "a" * 8000}, timeout=30).status_code == 200


def test_idle_and_slow_connections_are_closed(guarded):
    started = time.monotonic()
    assert raw_request(guarded, b"") == b""  # never sent a request: closed, without an answer
    assert time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:  # slowloris: a byte at a time
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started, reply = time.monotonic(), b""
        while time.monotonic() - started < 8 and not reply:
            if select.select([s], [], [], 0.2)[0]:
                reply = s.recv(65536)
            else:
                s.sendall(b"X")
        assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:  # keep-alive: closed once idle
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(65536)
        while not reply.endswith(b"}"):  # the whole JSON answer
            reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert s.recv(65536) == b""
        assert time.monotonic() - started < 5


# ---- memory under steady traffic ---------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def engine_pid(server: ServerProcess) -> int:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    return max((int(c) for c in children), key=rss_mib)  # the engine process: the model's weights


PROMPTS = ["Hello", "What is the capital of France?", "Write a haiku about the sea. " * 6,
           "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 12, "1 2 3 4 5", "Why is the sky blue?"]


def steady_traffic(server, rounds: int) -> None:
    def one(i: int) -> None:
        body = {"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1 + i % 3, "stream": i % 4 == 0}
        r = httpx.post(server.base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(rounds)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_engine_memory_settles_under_steady_traffic(guarded):
    pid = engine_pid(guarded)
    steady_traffic(guarded, 40)  # warm: every shape and cached prefix seen once
    before = rss_mib(pid)
    steady_traffic(guarded, 160)
    grown = rss_mib(pid) - before
    # Before the block pool reused warm blocks first, each request touched a fresh KV block:
    # ~0.37 MiB a request here, ~60 MiB over these.
    assert grown < 12, f"the engine grew {grown:.1f} MiB over 160 requests"
