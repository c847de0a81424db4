"""Issue 10 item 10: peer "one-time" tokens are single-use and bound to the recipient
instance they were issued for (store level, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

from corral.store import objects
from corral.store.db import Database
from corral.store.migrate import migrate
from tests.storekit import register

T0 = 1_000_000.0
SHA = "ab" * 32


async def _setup(url: str):
    db = Database(url)
    await migrate(db)
    ids = []
    for name in ("rcpt", "other"):
        reg = await register(db, name, T0)
        ids.append(reg.instance["id"])
    return db, ids


def test_peer_token_works_once_and_only_for_its_recipient(db_url):
    async def main():
        db, (rcpt, other) = await _setup(db_url)
        token = await db.transact(objects.grant, SHA, rcpt, T0)

        async def verify(recipient, now=T0 + 1):
            return await db.transact(objects.verify_grant, SHA, token, now, recipient=recipient)

        # presented on behalf of another instance (or of nobody): refused, not used up
        assert "recipient" in (await verify(other) or "")
        assert "recipient" in (await verify(None) or "")
        assert await verify(rcpt) is None
        # a second use, within the ten minutes it is valid: refused
        assert "used" in (await verify(rcpt) or "")
        # concurrent redemptions of a fresh token: exactly one wins
        token = await db.transact(objects.grant, SHA, rcpt, T0)
        results = await asyncio.gather(
            *(
                db.transact(objects.verify_grant, SHA, token, T0 + 1, recipient=rcpt)
                for _ in range(4)
            ),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 1, results
        # a server's own fetch (no recipient instance): once as well
        token = await db.transact(objects.grant, SHA, None, T0)
        assert await db.transact(objects.verify_grant, SHA, token, T0 + 1, recipient=None) is None
        assert await db.transact(objects.verify_grant, SHA, token, T0 + 1, recipient=None)
        await db.dispose()

    asyncio.run(main())
