"""Shared fixtures: a throwaway PostgreSQL database per run, and database URLs for
tests that must pass on both SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from outputs import WRITER

from corral.testing import Cluster

PG_ENV = "CORRAL_TEST_PG_URL"


# The suite runs on several xdist workers sharing two cores: conditions are waited for
# twice their nominal deadline (see corral.testing.slack).
os.environ.setdefault("CORRAL_TEST_SLACK", "2")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _asyncpg_dsn(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _drop(url: str, name: str) -> None:
    await _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_HOST_NET = pytest.StashKey[tuple[bool, "str | None"]]()


def _nft_table_exists() -> bool:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        return False
    r = subprocess.run([nft, "list", "table", "inet", "corral_jobs"], capture_output=True)
    return r.returncode == 0


FAST_LANE_EXAMPLES = 25  # hypothesis's default, 100, in the full suite (what CI runs)


def pytest_configure(config: pytest.Config) -> None:
    """The fast lane (`-m "not slow"`) tries fewer examples in each property test: it is
    for feedback while working; the full suite tries them all.

    What root agents change on this host for their jobs' networks (the nftables
    table, IPv4 forwarding, the slots' kept namespaces) is noted before the run (by the
    controller, not each worker: the workers' agents share the host) and put back after
    it."""
    if config.getoption("markexpr", "") == "not slow":
        from hypothesis import settings

        settings.register_profile("fast-lane", max_examples=FAST_LANE_EXAMPLES)
        settings.load_profile("fast-lane")
    if hasattr(config, "workerinput") or os.geteuid() != 0:
        return
    try:
        forward = Path(_IP_FORWARD).read_text().strip()
    except OSError:
        forward = None
    config.stash[_HOST_NET] = (_nft_table_exists(), forward)


def pytest_unconfigure(config: pytest.Config) -> None:
    before = config.stash.get(_HOST_NET, None)
    if before is None:
        return
    from corral.agent.sandbox.network import forget_kept

    forget_kept()  # the job slots' namespaces the run's agents kept (bind mounts)
    had_table, forward = before
    if not had_table:
        from corral.agent.sandbox.network import remove_host_rules

        remove_host_rules()
    if forward is not None:
        with contextlib.suppress(OSError):
            Path(_IP_FORWARD).write_text(forward)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test is slow: the fast lane (`-m "not slow"`) runs none."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Whatever a test sets in this process's environment (e.g. the CLI's `--ca` sets
    CORRAL_CA in-process) is undone after it: tests sharing a worker must not inherit
    it, nor the agents they start."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if _in_ci():
            pytest.fail(f"{PG_ENV} is not set; CI must test against PostgreSQL")
        pytest.skip(
            f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/postgres)"
        )
    try:
        asyncio.run(_admin(url, "SELECT 1"))
    except Exception as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL at {url} is not reachable in CI: {exc!r}")
        pytest.skip(f"PostgreSQL at {url} is not reachable: {exc!r}")
    return url


async def _migrate(url: str) -> None:
    from corral.store.db import Database
    from corral.store.migrate import migrate

    db = Database(url)
    try:
        await migrate(db)
    finally:
        await db.dispose()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str):
    """A database migrated to head once per worker, which each test's database copies
    (CREATE DATABASE ... TEMPLATE: a file copy in the server, not 30 migrations)."""
    name = f"corral_tmpl_{_worker()}_{secrets.token_hex(4)}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(_migrate(_with_db(pg_server_url, name)))
        yield name
    finally:
        asyncio.run(_drop(pg_server_url, name))


@pytest.fixture
def pg_empty_url(pg_server_url: str):
    """A fresh, empty database for one test (no schema), dropped afterwards."""
    name = f"corral_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_db(pg_server_url, name)
    finally:
        asyncio.run(_drop(pg_server_url, name))


class _FreshDatabases:
    """Copies of the worker's template made ahead of the tests that take them, and
    dropped after them, on a thread of their own: creating a database waits on the
    disk (about 0.3 s here), dropping one about 0.1 s; a test need not wait for either."""

    AHEAD = 2

    def __init__(self, server_url: str, template: str) -> None:
        self.server_url, self.template = server_url, template
        self.ready: queue.Queue[str | BaseException] = queue.Queue()
        self.todo: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="fresh-databases", daemon=True)
        self.thread.start()
        for _ in range(self.AHEAD):
            self._order()

    def _order(self) -> None:
        self.todo.put(("create", f"corral_test_{secrets.token_hex(6)}"))

    def _run(self) -> None:
        while (job := self.todo.get()) is not None:
            op, name = job
            try:
                if op == "create":
                    sql = f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'
                    asyncio.run(_admin(self.server_url, sql))
                    self.ready.put(name)
                else:
                    asyncio.run(_drop(self.server_url, name))
            except Exception as exc:
                if op == "create":
                    self.ready.put(exc)

    def take(self) -> str:
        item = self.ready.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        self._order()
        return item

    def give_back(self, name: str) -> None:
        self.todo.put(("drop", name))

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join(120)
        while not self.ready.empty():
            item = self.ready.get()
            if isinstance(item, str):
                asyncio.run(_drop(self.server_url, item))


@pytest.fixture(scope="session")
def _fresh_pg(pg_server_url: str, pg_template: str):
    fresh = _FreshDatabases(pg_server_url, pg_template)
    try:
        yield fresh
    finally:
        fresh.close()


@pytest.fixture
def pg_url(pg_server_url: str, _fresh_pg: _FreshDatabases):
    """A fresh database for one test, its schema at head, dropped afterwards."""
    name = _fresh_pg.take()
    try:
        yield _with_db(pg_server_url, name)
    finally:
        _fresh_pg.give_back(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A SQLite file migrated to head once per worker; each test gets a copy."""
    path = tmp_path_factory.mktemp("schema") / "corral.db"
    asyncio.run(_migrate(f"sqlite:///{path}"))
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path: Path) -> str:
    """A fresh database of each kind for one test, its schema at head."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        for suffix in ("", "-wal"):
            if Path(f"{template}{suffix}").exists():
                shutil.copyfile(f"{template}{suffix}", f"{tmp_path / 'corral.db'}{suffix}")
        return f"sqlite:///{tmp_path / 'corral.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path: Path) -> str:
    """A fresh, empty database of each kind (no schema): for the migrations' own tests."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_empty_url")


@pytest.fixture
def cluster(tmp_path: Path):
    with Cluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def writer(jobfiles: Path) -> str:
    """A script that writes outputs of known content (see tests/outputs.py)."""
    p = jobfiles / "writer.py"
    p.write_text(WRITER)
    return str(p)


@pytest.fixture
def jobfiles():
    """A directory jobs can read and write (scripts, gates, pid files). pytest's
    tmp_path lies under a 0700 directory the unprivileged job user of a root agent
    cannot enter."""
    d = Path(tempfile.mkdtemp(prefix="corral-jobfiles-", dir="/var/tmp"))
    d.chmod(0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
