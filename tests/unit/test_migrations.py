"""Migrations upgrade a database that holds data, not only an empty one: the embedded SQLite
has foreign keys on, and a migration that copies a referenced table fails there."""

from __future__ import annotations

import asyncio
import sqlite3

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from e2a.store import db


def _upgrade_to(engine, revision: str) -> None:
    def run(connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(db.MIGRATIONS))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async def go() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    asyncio.run(go())


def _head() -> str:
    """The newest revision (each new migration would otherwise have to edit this test)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def _old_store(tmp_path, revision: str):
    """A store at an older revision holding a user and a destroyed sandbox of theirs: (engine,
    path, an open sqlite3 connection with foreign keys on, as the server has them)."""
    path = tmp_path / "e2a.db"
    engine = db.make_engine(f"sqlite+aiosqlite:///{path}")
    _upgrade_to(engine, revision)
    c = sqlite3.connect(path)
    c.execute("PRAGMA foreign_keys=ON")
    c.execute("INSERT INTO users VALUES ('usr_1', 'a@example.com', 0, '2026-11-01')")
    c.execute("INSERT INTO sandboxes (id, user_id, template, state, vcpu, cpu_fraction, "
              "memory_mib, internet, metadata, env_vars, idle_timeout_seconds, "
              "max_lifetime_seconds, slot, envd_token, created_at, expires_at) VALUES "
              "('sbx_1', 'usr_1', 'standard', 'destroyed', 1, 0.5, 512, 1, '{}', '{}', 60, "
              "7200, NULL, '', '2026-11-01', '2026-11-01')")
    return engine, path, c


def test_upgrade_from_0002_keeps_sandboxes_and_their_events(tmp_path):
    engine, path, c = _old_store(tmp_path, "0002")
    c.execute("INSERT INTO sandbox_events (sandbox_id, from_state, to_state, at) VALUES "
              "('sbx_1', 'running', 'destroyed', '2026-11-01')")
    c.commit()
    c.close()

    asyncio.run(db.migrate(engine))
    asyncio.run(engine.dispose())

    c = sqlite3.connect(path)
    assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [(_head(),)]
    assert c.execute("SELECT id, workspace_id FROM sandboxes").fetchall() == [("sbx_1", None)]
    assert c.execute("SELECT count(*) FROM sandbox_events").fetchone() == (1,)
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    assert ("workspaces", "workspace_id") in {(r[2], r[3]) for r in
                                              c.execute("PRAGMA foreign_key_list(sandboxes)")}
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"workspaces", "tasks", "task_events", "secret_bundles"} <= tables and not any(t.startswith("_alembic_tmp") for t in tables)


def test_upgrading_to_credits_bills_none_of_the_feeds_history(tmp_path):
    """Sandboxes that ran before credits existed are nobody's bill: metering starts at 0007."""
    from e2a.billing.metering import Metering
    from e2a.billing.rates import Rates
    from e2a.config import Settings

    engine, path, c = _old_store(tmp_path, "0006")
    for old, new, at in ((None, "creating", "2026-11-01 10:00:00"),
                         ("booting", "running", "2026-11-01 10:00:01"),
                         ("stopping", "destroyed", "2026-11-01 12:00:00")):
        c.execute("INSERT INTO sandbox_events (sandbox_id, from_state, to_state, reason, at) "
                  "VALUES ('sbx_1', ?, ?, 'create', ?)", (old, new, at))
    c.commit()
    c.close()

    async def go():
        await db.migrate(engine)
        settings = Settings(data_dir=tmp_path)
        await Metering(db.sessionmaker(engine), settings, Rates.from_settings(settings)).tick()
        await engine.dispose()
    asyncio.run(go())

    c = sqlite3.connect(path)
    assert c.execute("SELECT count(*) FROM ledger WHERE kind = 'usage'").fetchone() == (0,)
    assert c.execute("SELECT value FROM metering_cursor").fetchall() == [(3,)]


def test_pause_columns_upgrade_a_store_with_sandboxes_and_downgrade_again(tmp_path):
    """0008 adds its columns in place (no copy of `sandboxes` under the tables that refer to
    it): old rows get the documented defaults, and the downgrade takes them away again."""
    engine, path, c = _old_store(tmp_path, "0007")
    c.execute("INSERT INTO sandbox_events (sandbox_id, from_state, to_state, at) VALUES "
              "('sbx_1', 'running', 'destroyed', '2026-11-01')")
    c.commit()
    c.close()
    _upgrade_to(engine, "0008")
    c = sqlite3.connect(path)
    assert c.execute("SELECT on_idle, auto_resume, paused_at, disk_bytes, forked_from, "
                     "secrets_of FROM sandboxes").fetchall() == [("destroy", 0, None, None,
                                                                  None, None)]
    assert c.execute("SELECT disk_bytes FROM sandbox_events").fetchall() == [(None,)]
    c.close()

    def down(connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(db.MIGRATIONS))
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0007")

    async def go() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(down)
        await engine.dispose()
    asyncio.run(go())
    c = sqlite3.connect(path)
    columns = {r[1] for r in c.execute("PRAGMA table_info(sandboxes)")}
    assert "on_idle" not in columns and "id" in columns
    assert c.execute("SELECT count(*) FROM sandbox_events").fetchone() == (1,)
