"""Secrets at rest: values the store keeps sealed with the server key.

A sealed value is a Fernet token (AES-128-CBC with an HMAC-SHA256, from the maintained
`cryptography` package). The key lives in the server's data dir (`secret.key`, 0600) or
comes from `CORRAL_SECRET_KEY`; every server of one database needs the same key. The
database handle carries its sealer (see `Database(sealer=...)`), so store functions
reach it from the connection they are given.
"""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.ext.asyncio import AsyncConnection

OPTION = "corral_sealer"  # the engine execution option that carries the sealer


class SealError(RuntimeError):
    """A sealed value cannot be read: no server key, or not the key that sealed it."""


class Sealer:
    def __init__(self, key: str | bytes):
        try:
            self._fernet = Fernet(key.encode() if isinstance(key, str) else key)
        except (ValueError, TypeError):
            raise SealError(
                "the server key is malformed: it must be 32 url-safe base64-encoded bytes "
                "(make one with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            ) from None

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode()

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def unseal(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise SealError(
                "a secret in the database cannot be unsealed with this server key: every "
                "server of one database needs the same key (DATA_DIR/secret.key or "
                "CORRAL_SECRET_KEY)"
            ) from None

    def seal_json(self, value: dict[str, str]) -> str:
        return self.seal(json.dumps(value, sort_keys=True))

    def unseal_json(self, token: str) -> dict[str, str]:
        value = json.loads(self.unseal(token))
        if not isinstance(value, dict):
            raise SealError("a sealed value in the database is not a mapping")
        return value


def sealer_of(conn: AsyncConnection) -> Sealer:
    """The sealer of the database this connection belongs to."""
    sync = conn.sync_connection
    sealer = sync.get_execution_options().get(OPTION) if sync is not None else None
    if sealer is None:
        raise SealError(
            "this database handle has no server key: secrets cannot be sealed or unsealed"
        )
    return sealer
