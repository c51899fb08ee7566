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
    sa.Column("reserved_tokens", sa.BigInteger, nullable=False, default=0),  # worst case of requests running
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
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # "ok" | "aborted" | "error"
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

schema_version = sa.Table("r1serve_schema", metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1(ops: Operations) -> None:
    bind = ops.get_bind()
    for table in (api_keys, usage_ledger):
        table.create(bind)
    ops.create_index("ix_usage_key_time", "usage_ledger", ["key_id", "created_at"])


# (version, upgrade) in order; a new schema change is a new entry, never an edit of an old one.
MIGRATIONS: list[tuple[int, Callable[[Operations], None]]] = [(1, _v1)]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands datetimes back naive; every stored time is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def open_database(url: str) -> sa.Engine:
    """An engine for `url` with the schema migrated to the latest version."""
    try:
        engine = sa.create_engine(url, future=True, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise InvalidRequestError(f"--db {url!r} is not usable: {e}. Use sqlite:///PATH or "
                                  "postgresql+psycopg://USER:PASS@HOST/DB") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
    migrate(engine)
    return engine


@contextmanager
def reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A read-only transaction. On SQLite it is deferred: it takes no write lock, so key
    lookups never queue behind the ledger's writes (WAL readers see the last commit)."""
    with engine.connect().execution_options(r1serve_read_only=True) as conn, conn.begin():
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


def migrate(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # two servers starting at once migrate one at a time
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7261)"))
        if not sa.inspect(conn).has_table("r1serve_schema"):
            schema_version.create(conn)
            conn.execute(schema_version.insert().values(version=0))
        current = conn.execute(sa.select(schema_version.c.version)).scalar_one()
        ops = Operations(MigrationContext.configure(conn))
        for version, upgrade in MIGRATIONS:
            if version > current:
                upgrade(ops)
                conn.execute(schema_version.update().values(version=version))
                current = version
    return current
