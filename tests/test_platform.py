"""The platform layer against real server processes: keys, quotas, rate limits, the ledger
(SQLite, and PostgreSQL when one is available), driven through the CLI and the HTTP API."""
from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import signal
import time

import httpx
import pytest
import sqlalchemy as sa

from r1serve.accounts.accounts import KEYS_RECHECK_S, Accounts
from r1serve.accounts.database import MIGRATIONS, admissions, migrate

from platform_processes import PROMPT, WORST, bearer, cli, complete, new_key, serve_tiny
from server_process import ServerProcess


def test_key_lifecycle(tiny, tmp_path, db):
    admin = new_key(db, "admin", "--admin")
    alice = new_key(db, "alice", "--quota-tokens", "100000")
    assert alice["key"].startswith("sk-") and len(alice["key"]) > 40 and alice["quota_tokens"] == 100000
    server = serve_tiny(tiny, tmp_path, db)
    try:
        assert complete(server, alice["key"]).status_code == 200
        for bad in (None, "sk-wrong", alice["key"] + "x"):
            r = complete(server, bad)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Admin endpoints refuse user keys.
        r = httpx.get(server.base + "/v1/admin/keys", headers=bearer(alice["key"]), timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        # The admin key manages keys over HTTP.
        r = httpx.post(server.base + "/v1/admin/keys", json={"name": "bob", "rpm": 100}, headers=bearer(admin["key"]),
                       timeout=30)
        assert r.status_code == 201
        bob = r.json()
        assert complete(server, bob["key"]).status_code == 200
        listed = httpx.get(server.base + "/v1/admin/keys", headers=bearer(admin["key"]), timeout=30).json()["data"]
        assert {k["name"] for k in listed} == {"admin", "alice", "bob"} and all("key" not in k for k in listed)
        last = {k["name"]: k["last_used_at"] for k in listed}  # alice ran a request; admin only managed keys
        assert last["admin"] is None and last["alice"].endswith("+00:00")
        r = httpx.patch(server.base + f"/v1/admin/keys/{bob['id']}", json={"quota_tokens": 5},
                        headers=bearer(admin["key"]), timeout=30)
        assert r.json()["quota_tokens"] == 5
        assert httpx.delete(server.base + f"/v1/admin/keys/{bob['id']}", headers=bearer(admin["key"]),
                            timeout=30).json()["revoked"]
        assert complete(server, bob["key"]).status_code == 401
        # Revoked from the CLI on the host: refused at the next request.
        cli("keys", "revoke", alice["id"], db=db)
        assert complete(server, alice["key"]).status_code == 401
        usage = httpx.get(server.base + "/v1/admin/usage?by=key", headers=bearer(admin["key"]), timeout=30).json()
        assert {r["key"]: r["requests"] for r in usage["data"]} == {alice["id"]: 1, bob["id"]: 1}
    finally:
        server.stop()
    listed = cli("keys", "list", "--all", db=db)
    assert "alice" in listed and alice["key"] not in listed
    # Nothing on disk holds a secret, only hashes.
    files = list(tmp_path.glob("platform.db*"))
    raw = b"".join(f.read_bytes() for f in files)
    for secret in (admin["key"], alice["key"], bob["key"]):
        assert secret.encode() not in raw and secret[3:].encode() not in raw


def test_open_server_needs_no_key_and_admin_routes_stay_closed(tiny, tmp_path, db):
    server = serve_tiny(tiny, tmp_path, db)
    try:
        assert complete(server, None).status_code == 200
        assert complete(server, "sk-anything").status_code == 200  # SDKs always send some key
        assert httpx.get(server.base + "/v1/admin/keys", timeout=30).status_code == 403
        usage = httpx.get(server.base + "/v1/usage", timeout=30).json()
        assert usage["key"] is None and usage["data"][0]["requests"] == 2
        assert "OPEN" in server.log_text() and f"keys create --name NAME --db '{db}'" in server.log_text()
        # A key made from the CLI while the server runs closes it (the server rechecks each second).
        alice = new_key(db, "alice")
        time.sleep(KEYS_RECHECK_S + 0.2)
        assert complete(server, None).status_code == 401
        assert complete(server, alice["key"]).status_code == 200
        # Revoking the only key locks the server; it does not open it again to everyone.
        cli("keys", "revoke", alice["id"], db=db)
        time.sleep(KEYS_RECHECK_S + 0.2)
        for key in (alice["key"], None, "sk-anything"):
            assert complete(server, key).status_code == 401
    finally:
        server.stop()


def test_key_lookups_do_not_wait_for_a_ledger_write(tmp_path):
    """Key reads are deferred SQLite transactions: they read the last commit while a writer
    holds the lock, instead of queueing behind it (up to the busy timeout)."""
    accounts = Accounts(f"sqlite:///{tmp_path / 'keys.db'}")
    info, secret = accounts.keys.create("alice")
    with accounts.db.begin() as writing:  # BEGIN IMMEDIATE: the write lock, held
        writing.execute(sa.text("UPDATE api_keys SET rpm = 5"))
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(1) as pool:
            found = pool.submit(accounts.keys.authenticate, secret).result(timeout=5)
            active = pool.submit(accounts.keys.has_keys).result(timeout=5)
        assert time.monotonic() - t0 < 1.0
    assert found.id == info.id and found.rpm is None and active  # the state before the uncommitted write
    assert accounts.keys.get(info.id).rpm == 5


def test_quota_holds_under_concurrency(tiny, tmp_path, db):
    quota = 5 * WORST + WORST // 2  # room for about five requests
    key = new_key(db, "q", "--quota-tokens", str(quota))
    server = serve_tiny(tiny, tmp_path, db)
    try:
        with cf.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: complete(server, key["key"]), range(20)))
        ok = [r for r in results if r.status_code == 200]
        refused = [r for r in results if r.status_code != 200]
        assert 1 <= len(ok) <= 5 + 1 and len(ok) + len(refused) == 20
        for r in refused:
            assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_quota"
        info = httpx.get(server.base + "/v1/usage", headers=bearer(key["key"]), timeout=30).json()
        assert info["key"]["used_tokens"] <= quota
        assert sum(row["requests"] for row in info["data"]) == len(ok)
        # A request whose worst case is over what is left is refused before it runs.
        r = complete(server, key["key"], max_tokens=quota)
        assert r.status_code in (400, 402)
    finally:
        server.stop()


def test_what_is_left_of_a_quota_caps_the_output(tiny, tmp_path, db):
    """As a DeepSeek balance: a request is let in while the key has anything left, its output
    capped at what remains (finish_reason "length"); the quota is never overdrawn."""
    prompt = len(PROMPT["prompt"])
    key = new_key(db, "small", "--quota-tokens", "100")
    server = serve_tiny(tiny, tmp_path, db)
    try:
        r = complete(server, key["key"], max_tokens=None)  # no max_tokens: the whole context asked
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 100 - prompt
        r = complete(server, key["key"], max_tokens=5)
        err = r.json()["error"]
        assert r.status_code == 402 and err["code"] == err["type"] == "insufficient_quota"
        assert "0 tokens left of 100" in err["message"]
        two = new_key(db, "two", "--quota-tokens", str(prompt + 2 * 10 + 1))
        r = complete(server, two["key"], max_tokens=50, n=2)  # each of n outputs gets an equal share
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
        usage = httpx.get(server.base + "/v1/usage", headers=bearer(key["key"]), timeout=30).json()
        assert usage["key"]["used_tokens"] == 100
    finally:
        server.stop()


def age_admissions(db: str, key_id: str, seconds: float) -> None:
    """Move a key's admissions `seconds` into the past: a minute passes without waiting it."""
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        for row in conn.execute(sa.select(admissions.c.id, admissions.c.admitted_at)
                                .where(admissions.c.key_id == key_id)).all():
            conn.execute(admissions.update().where(admissions.c.id == row.id)
                         .values(admitted_at=row.admitted_at - dt.timedelta(seconds=seconds)))
    engine.dispose()


def test_rate_limits_answer_429_and_recover(tiny, tmp_path, db):
    key = new_key(db, "r", "--rpm", "2")
    tpm_key = new_key(db, "t", "--tpm", str(2 * WORST))
    server = serve_tiny(tiny, tmp_path, db)
    try:
        codes = [complete(server, key["key"], max_tokens=2).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        r = complete(server, key["key"], max_tokens=2)
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # At most 2 in any 60 s: room again when the first of the two leaves the window.
        assert 50 <= int(r.headers["retry-after"]) <= 60
        age_admissions(db, key["id"], 30)
        assert 20 <= int(complete(server, key["key"], max_tokens=2).headers["retry-after"]) <= 30
        age_admissions(db, key["id"], 31)
        assert complete(server, key["key"], max_tokens=2).status_code == 200
        # Tokens per minute: two worst cases fit, a third waits.
        assert [complete(server, tpm_key["key"]).status_code for _ in range(3)] == [200, 200, 429]
        # A minute later the window is empty: a small request and one full one fit, then no more.
        age_admissions(db, tpm_key["id"], 61)
        assert complete(server, tpm_key["key"], max_tokens=2).status_code == 200
        assert [complete(server, tpm_key["key"]).status_code for _ in range(2)] == [200, 429]
    finally:
        server.stop()


def test_ledger_survives_sigkill(tiny, tmp_path, any_db):
    db = any_db
    key = new_key(db, "durable")
    server = serve_tiny(tiny, tmp_path, db)
    ids = []
    try:
        for i in range(4):
            r = complete(server, key["key"], stream=(i % 2 == 1))
            assert r.status_code == 200
            ids.append(r.text)
    finally:
        server.proc.send_signal(signal.SIGKILL)  # no shutdown hooks, no flush
        server.proc.wait(30)
        server.log.close()
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT status, completion_tokens FROM usage_ledger WHERE key_id = :k"),
                            {"k": key["id"]}).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("ok", 20)] * 4
    out = json.loads(cli("usage", "--key", key["id"], "--json", db=db))
    assert out[0]["requests"] == 4 and out[0]["completion_tokens"] == 80


def test_usage_cli_groupings_at_the_servers_prices(tiny, tmp_path, db):
    key = new_key(db, "u")
    prices = tmp_path / "prices.toml"  # a hit at a quarter of a miss, output at three misses
    prices.write_text('currency = "CNY"\n[default]\ninput_cache_hit = 9\ninput_cache_miss = 9\noutput = 9\n'
                      '[models.tiny]\ninput_cache_hit = 0.5\ninput_cache_miss = 2\noutput = 6\n')
    server = serve_tiny(tiny, tmp_path, db, extra=("--prices", str(prices)))
    try:
        for _ in range(2):  # the second reuses the first's cached prompt blocks
            assert complete(server, key["key"], prompt=list(range(40, 80))).status_code == 200
        served = httpx.get(server.base + "/v1/usage", headers=bearer(key["key"]), timeout=30).json()["data"]
    finally:
        server.stop()
    by_model = json.loads(cli("usage", "--by", "model", "--json", "--prices", str(prices), db=db))
    row = by_model[0]
    assert row["model"] == "tiny" and row["requests"] == 2 and 0 < row["cached_tokens"] < row["prompt_tokens"]
    fresh = row["prompt_tokens"] - row["cached_tokens"]
    assert row["charged_tokens"] == fresh + -(-row["cached_tokens"] // 4) + row["completion_tokens"]
    expected = (row["cached_tokens"] * 0.5 + fresh * 2 + row["completion_tokens"] * 6) / 1e6
    assert row["cost"] == pytest.approx(expected) and row["currency"] == "CNY"
    assert served[0]["cost"] == pytest.approx(expected)
    text = cli("usage", "--by", "model", "--prices", str(prices), db=db)
    assert "tiny" in text and "CNY" in text and "cost" in text


# ---- PostgreSQL: several servers, one ledger ------------------------------------------------------


def test_two_servers_share_one_postgres_ledger(tiny, tmp_path, pg_url):
    quota = 6 * WORST
    key = new_key(pg_url, "shared", "--quota-tokens", str(quota))
    servers = [serve_tiny(tiny, tmp_path, pg_url, name=f"s{i}") for i in range(2)]
    try:
        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: complete(servers[i % 2], key["key"]), range(16)))
        ok = sum(r.status_code == 200 for r in results)
        assert 1 <= ok <= 6 and all(r.status_code in (200, 402) for r in results)
        usage = httpx.get(servers[1].base + "/v1/usage", headers=bearer(key["key"]), timeout=30).json()
        assert usage["key"]["used_tokens"] <= quota
        assert sum(row["requests"] for row in usage["data"]) == ok
    finally:
        for s in servers:
            s.stop()


def test_several_models_in_one_server(tiny, tmp_path, db):
    server = ServerProcess([str(tiny), str(tiny), "--served-model-name", "tiny", "--served-model-name", "tiny-b",
                            "--dtype", "float32", "--threads", "1"], tmp_path / "server.log", db=db)
    try:
        assert [m["id"] for m in httpx.get(server.base + "/v1/models", timeout=30).json()["data"]] == ["tiny", "tiny-b"]
        assert complete(server, None).status_code == 200
        assert complete(server, None, model="tiny-b").status_code == 200
        assert complete(server, None, model="tiny-c").status_code == 404
        rows = httpx.get(server.base + "/v1/usage", timeout=30).json()["data"]
        assert sorted(r["model"] for r in rows) == ["tiny", "tiny-b"]
    finally:
        server.stop()


def test_a_version_1_database_migrates_with_its_keys_and_ledger(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    old = sa.create_engine(url)
    assert migrate(old, upto=1) == 1
    with old.begin() as conn:
        conn.execute(sa.text("INSERT INTO api_keys VALUES ('key_old', 'old', :h, 'sk-old…', 0, 1000, NULL, NULL, 40, 7, "
                             "'2026-11-01 00:00:00', NULL)"), {"h": "0" * 64})
        conn.execute(sa.text("INSERT INTO usage_ledger (request_id, key_id, model, prompt_tokens, cached_tokens, "
                             "completion_tokens, reasoning_tokens, charged_tokens, latency_ms, status, created_at) "
                             "VALUES ('r1', 'key_old', 'm', 10, 0, 30, 0, 40, 5, 'ok', '2026-11-01 00:00:01')"))
    old.dispose()
    accounts = Accounts(url)  # migrates to the latest version
    key = accounts.keys.get("key_old")
    assert (key.used_tokens, key.quota_tokens, key.remaining_tokens) == (40, 1000, 960)
    old_row = accounts.ledger.summary("key_old", by=("model",))[0]
    assert old_row["charged_tokens"] == 40 and old_row["cost"] == 0  # priced rows start with version 4
    with accounts.db.begin() as conn:
        assert conn.execute(sa.text("SELECT version FROM r1serve_schema")).scalar_one() == MIGRATIONS[-1][0]
        assert conn.execute(sa.text("PRAGMA foreign_key_check")).all() == []
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar_one() == 1  # back on after the migration
    assert "reserved_tokens" not in {c["name"] for c in sa.inspect(accounts.db).get_columns("api_keys")}
    accounts.keys.create("new")  # the migrated table takes new keys


def test_the_log_says_where_to_go_and_one_line_per_request(tiny, tmp_path, db):
    key = new_key(db, "logged")
    log = tmp_path / "info" / "server.log"
    log.parent.mkdir()
    server = ServerProcess([str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1"], log,
                           db=db, log_level="info")
    try:
        assert complete(server, key["key"]).status_code == 200
        assert complete(server, "sk-wrong").status_code == 401
        text = server.log_text()
    finally:
        server.stop()
    assert f"Playground: http://127.0.0.1:{server.port}/ui/" in text and f"curl http://127.0.0.1:{server.port}" in text
    assert "Authorization: Bearer" in text and '"model": "tiny"' in text
    prompt = len(PROMPT["prompt"])
    assert ("POST /v1/completions 200 in " in text
            and f"{prompt} prompt (0 cached) + {PROMPT['max_tokens']} completion tokens, key {key['id']}" in text)
    assert "POST /v1/completions 401 in " in text and "GET /health" not in text
    assert "alembic" not in text  # no library chatter at start
