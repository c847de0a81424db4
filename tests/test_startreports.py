"""An agent's next exchange lets the start reports of the attempts it just started go
first (corral.agent.startreports), and never waits on them for long."""

from __future__ import annotations

import asyncio

from corral.agent.startreports import StartReports


def test_the_next_exchange_waits_for_start_reports_then_goes():
    async def main():
        reports = StartReports(wait=30.0)
        await asyncio.wait_for(reports.settled(), 1)  # nothing started: no wait
        reports.started(7, 1)
        reports.started(8, 2)
        waiting = asyncio.create_task(reports.settled())
        await asyncio.sleep(0)
        reports.relayed([{"job_id": 7, "attempt": 1, "action": "heartbeat"}])
        reports.relayed([{"job_id": 7, "attempt": 1, "action": "start"}])
        await asyncio.sleep(0.01)
        assert not waiting.done()  # job 8's start is still on its way
        reports.relayed([{"job_id": 8, "attempt": 2, "action": "start"}, {"bad": "report"}])
        await asyncio.wait_for(waiting, 1)  # well before the 30 s wait
        assert reports.pending == {}

    asyncio.run(main())


def test_a_start_report_that_never_comes_through_the_relay_is_waited_for_once():
    async def main():
        reports = StartReports(wait=0.05)
        reports.started(9, 1)  # its runner reports directly, or dies first
        await asyncio.wait_for(reports.settled(), 5)
        assert reports.pending == {}
        await asyncio.wait_for(reports.settled(), 0.01)  # not waited for again

    asyncio.run(main())
