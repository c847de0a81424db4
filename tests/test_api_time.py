"""Times on the wire are ISO-8601 UTC; in Python they stay epoch seconds (UtcTime) that
know their datetime, so the server's arithmetic and the SDK's parsing agree."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import ValidationError

from corral.api import EventView, JobView
from corral.api.common import UtcTime

T = 1767225600.25  # 2026-01-01T00:00:00.25Z


def _event(ts) -> EventView:
    return EventView(id=1, ts=ts, level="info", kind="k", message="m")


def test_json_is_iso_utc_and_parses_back_to_the_same_moment():
    e = _event(T)
    wire = json.loads(e.model_dump_json())
    assert wire["ts"] == "2026-01-01T00:00:00.250000Z"
    back = EventView.model_validate(wire)
    assert back.ts == T
    assert isinstance(back.ts, UtcTime)
    assert back.ts.datetime == dt.datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=dt.UTC)
    assert back.ts - 0.25 == 1767225600.0  # still plain seconds for arithmetic


def test_other_zones_naive_times_and_bad_text():
    assert _event("2026-01-01T01:00:00+01:00").ts == 1767225600.0
    assert _event("2026-01-01T00:00:00").ts == 1767225600.0  # naive is UTC
    assert _event(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).ts == 1767225600.0
    with pytest.raises(ValidationError, match="not an ISO-8601 time"):
        _event("yesterday")


def test_openapi_says_date_time_and_none_stays_none():
    props = JobView.model_json_schema()["properties"]
    assert props["created_at"] == {"format": "date-time", "title": "Created At", "type": "string"}
    assert (
        '"started_at":null'
        in JobView(
            id=1,
            name=None,
            state="queued",
            command=["true"],
            fleet=None,
            cpus=1,
            memory_mb=0,
            max_attempts=3,
            attempt=0,
            instance_id=None,
            exit_code=None,
            reason=None,
            created_at=T,
            started_at=None,
            finished_at=None,
            result_attempt=None,
        ).model_dump_json()
    )
