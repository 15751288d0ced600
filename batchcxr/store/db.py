"""Engine creation and schema migration (Alembic, run programmatically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_S = 5.0


def head_revision() -> str:
    """The newest schema revision: each migration file is named after its revision
    (``0007_worklist_filter_indexes.py`` is revision ``0007``; tests/test_store.py checks this
    against Alembic's own answer), so a start-up with the schema up to date never imports Alembic."""
    return max(p.name.split("_", 1)[0] for p in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, writer: bool = True) -> Engine:
    """An engine for any SQLAlchemy URL.

    SQLite gets WAL (readers never wait for the writer), a busy timeout and foreign keys. A
    writer engine (``writer=True``) starts every transaction with ``BEGIN IMMEDIATE``: it takes
    the write lock when it starts, so two processes (the watcher and the nightly job) queue for
    it instead of failing with "database is locked" when a read turns into a write. A reader
    engine uses plain (deferred) transactions, which never take or wait for the write lock. A
    new SQLite file is created readable by its owner only (it holds patient data).
    """
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MIGRATION_LOCK = 0x62617463  # "batc": PostgreSQL advisory lock key held while migrating


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest revision. Processes starting at once take
    turns: SQLite's write lock (BEGIN IMMEDIATE), PostgreSQL's transaction advisory lock."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        if _revision(connection) == head_revision():
            return
        from alembic import command

        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def _revision(connection) -> str | None:
    """The schema revision Alembic recorded in this database (None for a new one)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
