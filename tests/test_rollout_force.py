"""Issue 10 item 7: a held rollout is released by the command its WARNING suggests.

An instance that runs a build of another scheme (main.7) is held when a release
(1.1.0) is rolled out: the versions cannot be compared. The warning says to replace
it with an explicit rollout (--force); that command, with the same version, must
work, and forcing another version and back must not leave the instance held."""

from __future__ import annotations

import pytest
from test_reconciler import T0, heartbeat, run, setup

from corral.api import RolloutRequest
from corral.domain.reconcile import ComponentState
from corral.store import components, events


async def _held(db, inst) -> None:
    await db.transact(
        components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
    )
    await db.transact(components.advance, db, T0)
    assert await heartbeat(db, inst, "main.7", T0) == []
    (row,) = await db.query(components.instance_status)
    assert row["state"] == ComponentState.HELD
    (warn,) = await db.query(events.list_events, min_level="warning", kind="component.held")
    assert "--force" in warn["message"]


def test_held_instance_is_released_by_force_with_the_same_version(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await _held(db, inst)
        forced = await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", force=True),
            T0 + 1,
        )
        assert forced["version"] == "1.1.0" and forced["allow_downgrade"]
        await db.transact(components.advance, db, T0 + 1)
        orders = await heartbeat(db, inst, "main.7", T0 + 1)
        assert [o.version for o in orders] == ["1.1.0"]
        (row,) = await db.query(components.instance_status)
        assert row["state"] == ComponentState.INSTALLING
        # the install lands: the forced rollout completes
        await heartbeat(db, inst, "1.1.0", T0 + 2)
        await db.transact(components.advance, db, T0 + 2)
        (row,) = await db.query(components.instance_status)
        assert row["state"] == ComponentState.CONVERGED
        assert (await db.query(components.get_rollout, forced["id"]))["state"] == "completed"
        # without --force the same version is still refused as already desired
        with pytest.raises(components.ComponentError, match="already desired"):
            await db.transact(
                components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
            )
        await db.dispose()

    run(main())


def test_forcing_another_version_and_back_does_not_leave_it_held(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await _held(db, inst)
        for k, version in enumerate(("1.2.0", "1.1.0"), start=1):
            await db.transact(
                components.start_rollout,
                RolloutRequest(component="runner", version=version, force=True),
                T0 + k,
            )
            await db.transact(components.advance, db, T0 + k)
            orders = await heartbeat(db, inst, "main.7", T0 + k)
            assert [o.version for o in orders] == [version], version
            (row,) = await db.query(components.instance_status)
            assert row["state"] == ComponentState.INSTALLING, (version, row["state"])
        await db.dispose()

    run(main())
