"""Attempt tokens this server has seen pass a fence, remembered so the body guard
need not look them up again before it reads that attempt's next body.

The guard's question is only "was this token issued for this attempt?" (fencing stays
with the routes' conditional UPDATEs). A token is issued once and its hash never
changes or goes away while the attempt row exists, so a yes stays true: remembering it
is exact, not a cache that can go stale. A token that passed the start route's fence
was issued; so was one the database confirmed. Bounded (least recently added first
out): a forgotten token is looked up again, as before. Only hashes are kept."""

from __future__ import annotations

from collections import OrderedDict

from corral.domain.tokens import hash_secret

DEFAULT_SIZE = 50_000  # far more attempts than one server has live at once


class IssuedTokens:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[int, int, str], None] = OrderedDict()

    def add(self, job_id: int, number: int, token: str) -> None:
        key = (job_id, number, hash_secret(token))
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def known(self, job_id: int, number: int, token: str) -> bool:
        return (job_id, number, hash_secret(token)) in self._seen

    def __len__(self) -> int:
        return len(self._seen)
