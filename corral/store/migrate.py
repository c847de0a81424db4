"""Bring the schema to head. The server runs this on every start."""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from corral.store.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x636F7272  # "corr": one migrator at a time across servers


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision of this build (read from its migration scripts once)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or "base"


async def migrate(db: Database) -> str:
    """Upgrade to head; return the revision the database is now at."""

    def _upgrade(sync_conn: sa.Connection) -> str:
        if sync_conn.dialect.name == "postgresql":
            sync_conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK}
            )
        current = MigrationContext.configure(sync_conn).get_current_revision()
        if current == head_revision():  # a restart: nothing to run, no scripts to load
            return current
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")
        return MigrationContext.configure(sync_conn).get_current_revision() or "base"

    async def _run(conn) -> str:
        return await conn.run_sync(_upgrade)

    return await db.transact(_run)
