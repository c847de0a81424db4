"""Wake-ups across servers on one PostgreSQL: LISTEN/NOTIFY on one channel.

Each server keeps one dedicated connection (outside the pool) that LISTENs on
`corral_wake` and sends the keys this server woke, batched per event-loop turn, as
JSON in `pg_notify`. A notification reaches every listening session, the sender's
too; the sender's own are dropped by backend pid. Keys are what
`corral.server.notify.Notifier` wakes: strings, or tuples of strings (sent as lists).

Delivery is at most once while connected: a server that loses its connection
reports it (`on_state(False)`) so its waiters fall back to re-checking on a timer,
reconnects with back-off, then wakes every local waiter once (`on_state(True)`)
since it may have missed notifications meanwhile. Keys that could not be sent are
kept and sent after reconnecting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Hashable

import asyncpg
import sqlalchemy as sa

log = logging.getLogger(__name__)

CHANNEL = "corral_wake"
MAX_PAYLOAD = 7000  # PostgreSQL refuses payloads of 8000 bytes or more
KEEPALIVE = 10.0  # a query on an idle connection at least this often finds it broken
RETRY_MAX = 5.0
MAX_PENDING = 100_000


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """The plain libpq URL asyncpg takes, from the `postgresql+asyncpg://` one."""
    url = sa.engine.make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def encode(keys: list[Hashable]) -> list[str]:
    """JSON payloads of at most MAX_PAYLOAD bytes carrying all of `keys`."""
    out: list[str] = []
    batch: list[object] = []
    size = 2
    for key in keys:
        item = list(key) if isinstance(key, tuple) else key
        n = len(json.dumps(item)) + 1
        if batch and size + n > MAX_PAYLOAD:
            out.append(json.dumps(batch))
            batch, size = [], 2
        batch.append(item)
        size += n
    if batch:
        out.append(json.dumps(batch))
    return out


def decode(payload: str) -> list[Hashable]:
    """The keys in one payload; an unreadable payload carries none."""
    try:
        items = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [tuple(i) if isinstance(i, list) else i for i in items if isinstance(i, (str, list))]


class WakeBus:
    def __init__(
        self,
        url: str,
        on_keys: Callable[[list[Hashable]], None],
        on_state: Callable[[bool], None],
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._on_keys = on_keys
        self._on_state = on_state
        self._pending: dict[Hashable, None] = {}  # ordered set
        self._kick = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._pid = 0
        self.sent = 0  # notifications sent, for tests and metrics
        self.received = 0

    def publish(self, keys: tuple[Hashable, ...]) -> None:
        if len(self._pending) > MAX_PENDING:
            return  # a long outage: other servers' waiters time out and look anyway
        for k in keys:
            self._pending[k] = None
        self._kick.set()

    def _heard(self, _conn, pid: int, _channel: str, payload: str) -> None:
        if pid == self._pid:
            return  # our own, already woken locally
        self.received += 1
        keys = decode(payload)
        if keys:
            self._on_keys(keys)

    async def run(self) -> None:
        """Listen and send until cancelled, reconnecting on failure."""
        delay = 0.1
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("wake-up channel to PostgreSQL lost: %s; retrying", exc)
            finally:
                self._on_state(False)
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self) -> None:
        conn = self._conn = await asyncpg.connect(self._dsn, timeout=10)
        self._pid = conn.get_server_pid()
        await conn.add_listener(CHANNEL, self._heard)
        self._on_state(True)
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), KEEPALIVE)
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=KEEPALIVE)
                continue
            self._kick.clear()
            await asyncio.sleep(0)  # gather what the rest of this turn wakes
            keys = list(self._pending)
            self._pending.clear()
            try:
                for payload in encode(keys):
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload, timeout=10)
                    self.sent += 1
            except BaseException:
                for k in keys:  # sent again after reconnecting (a wake-up is idempotent)
                    self._pending[k] = None
                self._kick.set()
                raise
