"""Agent self-update: switch to a new agent build without stopping jobs.

When the `agent` component is installed at a sha256 other than the running build's,
the agent writes a trial record, starts a detached watchdog, and re-executes into
the new build (same PID: its runners stay its children and are adopted from their
attempt directories). The new build commits the trial on its first heartbeat. If
it does not heartbeat within the timeout it re-executes the previous build itself;
if it hangs or crashes, the watchdog kills it and the supervisor (systemd, the
local backend) starts the base command, which finds the uncommitted trial and rolls
back. Every rollback is reported as an install error, so the server's backoff and
cap bound how often a bad build is tried.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from corral.agent.artifacts import Installer
from corral.agent.identity import write_json_atomic

log = logging.getLogger("corral.agent.selfupdate")

COMPONENT = "agent"
SHA_ENV = "CORRAL_AGENT_SHA256"
VERSION_ENV = "CORRAL_AGENT_VERSION"
SELF_TEST_OK = "corral-agent ok"
MAX_FAILED_BOOTS = 3


class SelfUpdate:
    def __init__(
        self, data_dir: Path, installer: Installer, agent_args: list[str], timeout: float = 60.0
    ):
        self.dir = data_dir / "components" / COMPONENT
        self.installer = installer
        self.agent_args = agent_args
        self.timeout = timeout
        self.own_sha = os.environ.get(SHA_ENV) or None
        self.trial_path = self.dir / "trial.json"
        self.boots_path = self.dir / "boots.json"
        self.rollback_error: tuple[str, str] | None = None  # (sha256, why)

    # -- records ------------------------------------------------------------------------------

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def trial(self) -> dict | None:
        t = self._read(self.trial_path)
        return t if t and t.get("state") == "trial" else None

    @property
    def on_trial(self) -> bool:
        t = self.trial()
        return t is not None and t["sha256"] == self.own_sha

    # -- switching ----------------------------------------------------------------------------

    def _exec(self, argv: list[str], sha: str | None, version: str | None) -> None:
        env = dict(os.environ)
        env.pop(SHA_ENV, None)
        env.pop(VERSION_ENV, None)
        if sha:
            env[SHA_ENV], env[VERSION_ENV] = sha, version or ""
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], argv, env)  # noqa: S606 - re-executing in place keeps the PID

    def base_argv(self) -> list[str]:
        return [sys.executable, "-m", "corral", "agent"]

    def switch_if_needed(self) -> None:
        """After an install: re-execute into the installed build if it is not us."""
        installed = self.installer.installed(COMPONENT)
        if installed is None or installed.sha256 == self.own_sha:
            return
        trial = {
            "state": "trial",
            "sha256": installed.sha256,
            "version": installed.version,
            "path": str(installed.path),
            "previous_sha256": self.own_sha,
            "previous_version": os.environ.get(VERSION_ENV),
            "deadline": time.time() + self.timeout,
            "pid": os.getpid(),
        }
        write_json_atomic(self.trial_path, trial)
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral.agent.watchdog",
                str(self.trial_path),
                str(os.getpid()),
                str(trial["deadline"]),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        log.warning(
            "switching to agent %s (sha256 %s); jobs keep running",
            installed.version,
            installed.sha256[:12],
        )
        self._exec([str(installed.path), *self.agent_args], installed.sha256, installed.version)

    def _restore_previous(self, trial: dict) -> None:
        """Point current.json back at the build that ran before the trial."""
        prev = trial.get("previous_sha256")
        marker = self.dir / "current.json"
        if prev and (self.dir / prev / COMPONENT).is_file():
            write_json_atomic(
                marker,
                {
                    "version": trial.get("previous_version") or "unknown",
                    "sha256": prev,
                    "path": str(self.dir / prev / COMPONENT),
                    "installed_at": time.time(),
                    "previous": None,
                },
            )
        else:
            marker.unlink(missing_ok=True)

    def rollback(self, why: str) -> None:
        """The trial failed: restore the previous build and run it."""
        trial = self._read(self.trial_path) or {}
        self._restore_previous(trial)
        trial.update(state="rolled_back", why=why)
        write_json_atomic(self.trial_path, trial)
        log.error("agent %s rolled back: %s", trial.get("version"), why)
        prev = trial.get("previous_sha256")
        if prev and (self.dir / prev / COMPONENT).is_file():
            self._exec(
                [str(self.dir / prev / COMPONENT), *self.agent_args],
                prev,
                trial.get("previous_version"),
            )
        self._exec([*self.base_argv(), *self.agent_args], None, None)

    # -- at start, at the first heartbeat, on every loop ----------------------------------------

    def on_start(self) -> None:
        """Finish whatever a previous process left: a failed trial is rolled back; a
        base agent whose committed build is another one re-executes into it."""
        record = self._read(self.trial_path)
        if record and record.get("state") == "trial" and record["sha256"] != self.own_sha:
            # the trial build died (crash, or killed by the watchdog) and the
            # supervisor started us instead
            self._restore_previous(record)
            record.update(state="rolled_back", why="the new agent died before its first heartbeat")
            write_json_atomic(self.trial_path, record)
        record = self._read(self.trial_path)
        if record and record.get("state") == "rolled_back" and not record.get("reported"):
            self.rollback_error = (
                record["sha256"],
                f"agent {record.get('version')} rolled back: {record.get('why')}",
            )
        if self.on_trial or self.own_sha is not None:
            return
        installed = self.installer.installed(COMPONENT)
        if installed is None or (
            record
            and record.get("sha256") == installed.sha256
            and record.get("state") == "rolled_back"
        ):
            return
        boots = self._read(self.boots_path) or {}
        if boots.get(installed.sha256, 0) >= MAX_FAILED_BOOTS:
            self.rollback_error = (
                installed.sha256,
                f"agent {installed.version} failed to "
                f"start {MAX_FAILED_BOOTS} times; staying on the base build",
            )
            return
        boots[installed.sha256] = boots.get(installed.sha256, 0) + 1
        write_json_atomic(self.boots_path, boots)
        log.info("re-executing into the committed agent %s", installed.version)
        self._exec([str(installed.path), *self.agent_args], installed.sha256, installed.version)

    def heartbeat_ok(self) -> None:
        t = self.trial()
        if t is not None and t["sha256"] == self.own_sha:
            t["state"] = "committed"
            write_json_atomic(self.trial_path, t)
            log.info("agent %s committed", t["version"])
        if self.own_sha and self.boots_path.exists():
            self.boots_path.unlink(missing_ok=True)

    def error_reported(self) -> None:
        record = self._read(self.trial_path)
        if record and record.get("state") == "rolled_back":
            record["reported"] = True
            write_json_atomic(self.trial_path, record)
        self.rollback_error = None

    def check_deadline(self) -> None:
        t = self.trial()
        if t is not None and t["sha256"] == self.own_sha and time.time() > t["deadline"]:
            self.rollback(f"no heartbeat within {self.timeout:g}s of the switch")
