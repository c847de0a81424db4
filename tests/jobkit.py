"""Helpers of the end-to-end sandbox tests: a job's end, its output, and what the
machine cannot do (skipped outside CI, failed under CI=true)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from corral.testing import wait_for


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(why: str) -> NoReturn:
    """This machine cannot run the test: a skip with the reason, a failure in CI."""
    if in_ci():
        pytest.fail(why)
    pytest.skip(why)


def ended(client, job_id: int, timeout: float = 60):
    """The job once it has ended."""
    return wait_for(
        lambda: (j := client.job(job_id)).state in ("succeeded", "failed", "cancelled") and j,
        timeout,
        f"job {job_id} to end",
    )


def output(client, job_id: int, attempt: int | None = None) -> str:
    """Everything the job (or one attempt of it) printed, both streams."""
    out: list[bytes] = []
    client.follow(job_id, on_output=lambda _s, d: out.append(d), attempt=attempt)
    return b"".join(out).decode(errors="replace")
