"""Schemathesis hooks for tests/test_schemathesis.py (loaded via SCHEMATHESIS_HOOKS).

Long-polls (`wait` on events, logs and uploads) hold a valid request up to a minute by
design (uploads wait 60 s for a holder by default); a `wait` that is missing or within
range is set to 0 so the bounded run stays bounded. Out-of-range and wrongly typed
values are left alone: those must get 422."""

from __future__ import annotations

import schemathesis

LONG_POLLS = {"/api/v1/objects", "/api/v1/events", "/api/v1/jobs/{job_id}/logs"}


@schemathesis.hook
def map_case(context, case):
    if case.path not in LONG_POLLS:
        return case
    query = dict(case.query or {})
    wait = query.get("wait")
    if "wait" not in query or (
        isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 600
    ):
        query["wait"] = 0
        case.query = query
    return case
