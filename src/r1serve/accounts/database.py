"""The platform database: API keys and the usage ledger, through SQLAlchemy.

SQLite (the default, one file in the data directory) runs in WAL mode with synchronous=FULL:
a row committed before the response is sent survives the process being killed. PostgreSQL
serves several servers sharing one ledger. The schema is versioned; `migrate()` brings any
older database up to date at start (the DDL through Alembic's operations, so it is portable).
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from typing import Callable, Iterator

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

from r1serve.errors import InvalidRequestError

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 of the secret, never the secret
    sa.Column("prefix", sa.String(16), nullable=False),  # "sk-ab12…", to recognise a key in lists
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("quota_tokens", sa.BigInteger, nullable=True),  # None: unlimited
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("used_tokens", sa.BigInteger, nullable=False, default=0),  # charged by finished requests
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

usage_ledger = sa.Table(
    "usage_ledger", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=True),  # None: open server
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),  # reasoning included, as OpenAI counts
    sa.Column("reasoning_tokens", sa.Integer, nullable=False),
    sa.Column("charged_tokens", sa.Integer, nullable=False),
    sa.Column("cost", sa.Float, nullable=False, server_default="0"),  # at the price table's rates when settled
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # "ok" | "aborted" | "error"
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Index("ix_usage_ledger_request_id", "request_id"),  # a journaled settlement looks its row up
)

# A running server's lease: it pushes `expires_at` forward every few seconds; once that has
# passed, the server is taken for dead and its quota holds stop counting.
server_leases = sa.Table(
    "server_leases", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),  # where it ran and as which pid: for operators
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per admitted request of a key with a quota or a rate limit. While it runs,
# `held_tokens` is its worst case, held against the quota under its server's lease; when it
# ends, 0. `rate_tokens` (worst case, then what it was charged) and `admitted_at` are what
# the per-minute limits count, on every server sharing the database.
admissions = sa.Table(
    "admissions", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("lease_id", sa.String(32), nullable=False),
    sa.Column("held_tokens", sa.BigInteger, nullable=False),
    sa.Column("rate_tokens", sa.BigInteger, nullable=False),
    sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_admissions_key_time", "key_id", "admitted_at"),
)

stored_responses = sa.Table(
    "stored_responses", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # resp_…
    sa.Column("key_id", sa.String(32), nullable=True, index=True),  # whose it is (None: an open server's)
    sa.Column("response", sa.Text, nullable=False),  # the Responses API object, as JSON
    sa.Column("conversation", sa.Text, nullable=False),  # the chat messages it ends, as JSON (previous_response_id)
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

schema_version = sa.Table("r1serve_schema", metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1(ops: Operations) -> None:
    # The schema as version 1 shipped it, spelled out: later versions change it from here.
    ops.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("quota_tokens", sa.BigInteger, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("used_tokens", sa.BigInteger, nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    ops.create_table(
        "usage_ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        *(sa.Column(c, sa.Integer, nullable=False) for c in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                             "reasoning_tokens", "charged_tokens", "latency_ms")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    ops.create_index("ix_usage_ledger_created_at", "usage_ledger", ["created_at"])
    ops.create_index("ix_usage_key_time", "usage_ledger", ["key_id", "created_at"])


def _v2(ops: Operations) -> None:
    # Quota holds become rows under a server's lease (a crashed server's holds expire with
    # it), and rate limits count admissions in the database (shared by every server).
    bind = ops.get_bind()
    server_leases.create(bind)
    admissions.create(bind)
    with ops.batch_alter_table("api_keys") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("reserved_tokens")


def _v3(ops: Operations) -> None:
    # Settlements replayed from a server's journal are idempotent by request id.
    ops.create_index("ix_usage_ledger_request_id", "usage_ledger", ["request_id"])


def _v4(ops: Operations) -> None:
    # Each row records its cost at the prices it settled under (rows from before: 0).
    with ops.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("cost", sa.Float, nullable=False, server_default="0"))


def _v5(ops: Operations) -> None:
    # Responses kept for previous_response_id and GET /v1/responses/{id} (store: true).
    stored_responses.create(ops.get_bind())


# (version, upgrade) in order; a new schema change is a new entry, never an edit of an old one.
MIGRATIONS: list[tuple[int, Callable[[Operations], None]]] = [(1, _v1), (2, _v2), (3, _v3), (4, _v4), (5, _v5)]

# What a database that went away raises (refused or dropped connections, a pool that cannot
# connect, SQLite's lock or disk errors): the server answers 503 and retries, it is no bug.
UNREACHABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def db_now(conn: sa.Connection) -> dt.datetime:
    """The time by the database's clock where there is one to share: servers on several hosts
    then agree on leases and rate windows whatever their own clocks say."""
    if conn.dialect.name == "postgresql":
        return conn.execute(sa.select(sa.func.now())).scalar_one()
    return utcnow()  # SQLite: every server runs on the host that has the file


def as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands datetimes back naive; every stored time is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def open_database(url: str) -> sa.Engine:
    """A connection pool (SQLAlchemy engine) for `url` with the schema migrated to the latest version."""
    # A database host that stops answering fails a connection in seconds, not after TCP's minutes.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    try:
        db = sa.create_engine(url, future=True, pool_pre_ping=True, connect_args=connect_args)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise InvalidRequestError(f"--db {url!r} is not usable: {e}. Use sqlite:///PATH or "
                                  "postgresql+psycopg://USER:PASS@HOST/DB") from None
    if db.dialect.name == "sqlite":
        sa.event.listen(db, "connect", _sqlite_pragmas)
        sa.event.listen(db, "begin", _sqlite_begin)
    migrate(db)
    return db


@contextmanager
def reading(db: sa.Engine) -> Iterator[sa.Connection]:
    """A read-only transaction. On SQLite it is deferred: it takes no write lock, so key
    lookups never queue behind the ledger's writes (WAL readers see the last commit)."""
    with db.connect().execution_options(r1serve_read_only=True) as conn, conn.begin():
        yield conn


def _sqlite_begin(conn: sa.Connection) -> None:
    # Writers take the lock when they begin: a deferred transaction that reads, then writes,
    # can fail with SQLITE_BUSY instead of waiting its turn.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("r1serve_read_only") else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # transactions are begun explicitly (_sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # committed means on disk
    cur.execute("PRAGMA busy_timeout=10000")  # writers from several threads or processes wait, not fail
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def migrate(db: sa.Engine, upto: int | None = None) -> int:
    """Bring the schema to the latest version (or `upto`); returns the version it is at."""
    with db.connect() as conn:
        # SQLite changes a table by copying it, which foreign keys would refuse half-way; the
        # pragma cannot change inside a transaction, so it is set around it.
        _sqlite_foreign_keys(conn, False)
        try:
            with conn.begin():
                current = _upgrade(conn, upto)
        finally:
            _sqlite_foreign_keys(conn, True)
    return current


def _upgrade(conn: sa.Connection, upto: int | None) -> int:
    if conn.dialect.name == "postgresql":  # two servers starting at once migrate one at a time
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7261)"))
    if not sa.inspect(conn).has_table("r1serve_schema"):
        schema_version.create(conn)
        conn.execute(schema_version.insert().values(version=0))
    current = conn.execute(sa.select(schema_version.c.version)).scalar_one()
    ops = Operations(MigrationContext.configure(conn))
    for version, upgrade in MIGRATIONS:
        if current < version <= (upto or version):
            upgrade(ops)
            conn.execute(schema_version.update().values(version=version))
            current = version
    return current


def _sqlite_foreign_keys(conn: sa.Connection, on: bool) -> None:
    if conn.dialect.name == "sqlite":
        conn.connection.dbapi_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
