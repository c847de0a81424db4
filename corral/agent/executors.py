"""The agent's slow work, each piece turned into the event the state machine takes:
installing a component, copying an object from a peer, uploading one to the durable
store. I/O only; the decision to do it was `corral.agent.state`'s."""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from corral.agent import tls, transfer
from corral.agent.artifacts import Artifact, Installer, InstallError
from corral.agent.objects import ObjectStore
from corral.agent.runner import SELF_TEST_OK as RUNNER_OK
from corral.agent.selfupdate import SELF_TEST_OK as AGENT_OK
from corral.agent.state import (
    Event,
    InstallDone,
    InstallFailed,
    OffloadDone,
    OffloadFailed,
    TransferDone,
    TransferFailed,
)
from corral.api import Fetch, InstallOrder, OffloadOrder

log = logging.getLogger("corral.agent")


def self_test(what: str, expected: str) -> Callable[[Path], None]:
    """A verifier: the new build must run `--self-test` and say `expected`."""

    def verify(path: Path) -> None:
        try:
            r = subprocess.run(
                [str(path), "--self-test"], check=False, capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InstallError(f"the new {what} cannot run: {exc}") from None
        if r.returncode != 0 or expected not in r.stdout:
            raise InstallError(
                f"the new {what} failed its self-test (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[:300]}"
            )

    return verify


VERIFIERS = {"runner": self_test("runner", RUNNER_OK), "agent": self_test("agent", AGENT_OK)}


async def install(installer: Installer, order: InstallOrder, auth: dict[str, str]) -> Event:
    """Download, verify (sha256, then the build's self-test) and swap in a component."""
    art = Artifact(order.component, order.version, order.url, order.sha256, order.size)

    def work() -> None:
        with httpx.Client(
            timeout=httpx.Timeout(30, read=120), follow_redirects=True, verify=tls.context()
        ) as c:
            installer.install(art, c, auth, verify=VERIFIERS.get(order.component))

    try:
        await asyncio.to_thread(work)
    except (InstallError, OSError) as exc:
        log.warning(
            "install of %s %s failed (order %d): %s",
            order.component,
            order.version,
            order.order,
            exc,
        )
        return InstallFailed(order.component, order.sha256, str(exc))
    except Exception as exc:  # a bug: say so, and let the next order try again
        log.exception("install of %s %s broke", order.component, order.version)
        return InstallFailed(order.component, order.sha256, f"the agent failed: {exc!r}")
    log.info("%s %s installed", order.component, order.version)
    return InstallDone(order.component, order.version, order.sha256)


# Replication copies run on threads of their own: an opened source waits on the
# peer's question to the server, and must not hold a thread the agent's own work
# (asyncio.to_thread: its tick, its store listing) needs. Enough for `slots`
# copies streaming and as many opened ahead of them (daemon.py: 4 and 4).
FETCH_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="corral-fetch")


async def fetch(
    objects: ObjectStore,
    order: Fetch,
    recipient: str,
    slots: asyncio.Semaphore,
    ahead: asyncio.Semaphore | None = None,
) -> Event:
    """Copy an object from a peer, as ordered (the server only orders running
    instances, and the source checks that with the server again). At most `slots`
    copies stream at once; with `ahead`, up to that many more open their source
    meanwhile (the request, the peer's check of the token with the server, the
    answer's head), so the next copy streams as soon as a slot frees: a drain's
    copies then follow one another with no gap, as one stream would."""
    loop = asyncio.get_running_loop()
    try:
        if objects.has(order.sha256):
            return TransferDone(order.sha256)
        opened = None
        if ahead is not None:
            async with ahead:
                opened = await loop.run_in_executor(
                    FETCH_THREADS,
                    functools.partial(
                        transfer.open_source, order.sources, order.token, recipient=recipient
                    ),
                )
                try:
                    await slots.acquire()
                except BaseException:
                    opened.close()
                    raise
        else:
            await slots.acquire()
        try:
            if opened is None:
                opened = await loop.run_in_executor(
                    FETCH_THREADS,
                    functools.partial(
                        transfer.open_source, order.sources, order.token, recipient=recipient
                    ),
                )
            await loop.run_in_executor(
                FETCH_THREADS,
                functools.partial(
                    transfer.receive,
                    objects,
                    order.sha256,
                    order.size,
                    opened,
                    order.token,
                    recipient=recipient,
                    direct=True,  # a replica: cold data, past the page cache
                ),
            )
        finally:
            slots.release()
    except (transfer.TransferError, OSError) as exc:
        log.warning("replication of %s failed: %s", order.sha256[:12], exc)
        return TransferFailed(order.sha256, str(exc))
    except Exception as exc:  # a bug: say so, and let the next order try again
        log.exception("replication of %s broke", order.sha256[:12])
        return TransferFailed(order.sha256, f"the agent failed: {exc!r}")
    log.info("replicated object %s", order.sha256[:12])
    return TransferDone(order.sha256)


async def offload(objects: ObjectStore, order: OffloadOrder, slots: asyncio.Semaphore) -> Event:
    """Upload an object to the durable store, as ordered; the server checks the
    bucket itself before it counts the copy."""
    async with slots:
        try:
            await asyncio.to_thread(
                transfer.upload, objects, order.sha256, order.size, order.url, order.headers
            )
        except (transfer.TransferError, OSError) as exc:
            log.warning("upload of %s to the durable store failed: %s", order.sha256[:12], exc)
            return OffloadFailed(order.sha256, str(exc))
        except Exception as exc:  # a bug: say so, and let the next order try again
            log.exception("upload of %s broke", order.sha256[:12])
            return OffloadFailed(order.sha256, f"the agent failed: {exc!r}")
    log.info("uploaded object %s to the durable store", order.sha256[:12])
    return OffloadDone(order.sha256)
