"""One attempt's sandbox: its private directory, its cgroup, its environment, the
command spawned inside them, killed as a whole, its outputs collected.

Written to be reused by a long-lived runner parent that forks one child per attempt:
`prepare`, `spawn`, `kill`, `collect` and `remove` keep their state in this object,
not in the process, and `spawn` does in the child only what must happen between fork
and exec (enter the cgroup, drop to the job user)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from corral.agent.dirs import remove_known_dir
from corral.agent.objects import ObjectStore
from corral.agent.proctree import kill_tree
from corral.agent.sandbox.cgroups import AttemptGroup, Stats
from corral.agent.sandbox.collect import Collected, collect_outputs
from corral.agent.sandbox.host import Host, namespace_args, setpriv_args
from corral.agent.sandbox.jobuser import claim_job_user, give_tree, release_job_user
from corral.agent.sandbox.network import KEPT_DIR, AttemptNetwork, NetworkError
from corral.domain.sandbox import job_environment

SUBDIRS = ("work", "outputs", "inputs", "tmp")


class CommandNotFound(Exception):
    pass


class AttemptSandbox:
    def __init__(self, host: Host, job_id: int, attempt: int, job_dir: Path):
        self.host = host
        self.job_id = job_id
        self.attempt = attempt
        self.dir = Path(job_dir)
        self.group: AttemptGroup | None = (
            host.cgroups.attempt(job_id, attempt) if host.cgroups else None
        )
        self.limits_enforced = "none requested"
        self.proc: subprocess.Popen | None = None
        # who the command runs as: the host's job user until claim_user gives the
        # attempt one of its own
        self.user, self.uid, self.gid = host.user, host.uid, host.gid
        self._user_lock: int | None = None
        self.slot: int | None = None  # the claimed user's number: the attempt's addresses
        self.network: AttemptNetwork | None = None

    # -- where things are -------------------------------------------------------------------

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def outputs(self) -> Path:
        return self.dir / "outputs"

    @property
    def inputs(self) -> Path:
        return self.dir / "inputs"

    @property
    def as_job_user(self) -> bool:
        return self.host.mode == "user"

    # -- prepare ------------------------------------------------------------------------------

    def claim_user(self) -> None:
        """A root agent's attempt runs as a job user no other live attempt on this host
        has (held until `remove`): jobs cannot read each other's environment, signal
        each other or open each other's private files."""
        if not self.as_job_user or not self.host.user_slots or self._user_lock is not None:
            return
        user, self._user_lock = claim_job_user(
            self.host.user, self.host.user_slots, self._group_dir
        )
        self.user, self.uid, self.gid = user.name, user.uid, user.gid
        self.slot = user.slot

    def release_user(self) -> None:
        if self._user_lock is not None:
            release_job_user(self._user_lock, self._group_dir, self.uid)
            self._user_lock = None

    @property
    def _group_dir(self) -> str:
        """The attempt's v2 group (where its processes are counted), or ""."""
        return str(self.group.v2) if self.group is not None and self.group.v2 else ""

    def prepare(self, cpus: float, memory_mb: int) -> None:
        """The private directory (0700, the job's), the cgroup with its limits and,
        on an isolated host, the attempt's network (NetworkError: it must not run)."""
        top = str(self.dir)
        os.mkdir(top, 0o700)
        subdirs = [os.path.join(top, d) for d in SUBDIRS]
        for d in subdirs:
            os.mkdir(d, 0o700)
        if self.as_job_user:
            # the job's from here on: what was just made, no walk (the top last, so
            # nothing of the job's can be inside before)
            for d in [*subdirs, top]:
                os.lchown(d, self.uid, self.gid)
        if self.group is not None:
            self.limits_enforced = self.group.create(cpus, memory_mb)
        elif memory_mb or cpus:
            self.limits_enforced = "none: no cgroup for attempts on this host"
        if self.host.network == "isolated":
            if self.slot is None:
                raise NetworkError("an isolated attempt needs a job user of its own")
            # kept for the slot's next attempt only where a claim proves the last
            # attempt's processes are gone (its v2 group is empty: `claim_job_user`)
            kept = KEPT_DIR if self.group is not None and self.group.v2 else None
            self.network = AttemptNetwork(self.slot, kept_dir=kept)
            self.network.create()

    def give(self, path: Path) -> None:
        """Hand a tree this process made to the job user."""
        if self.as_job_user:
            give_tree(path, self.uid, self.gid)

    def environment(self, job_env: Mapping[str, str], corral_vars: Mapping[str, str]) -> dict:
        return job_environment(job_env, corral_vars, home=str(self.dir), user=self.user)

    # -- run ----------------------------------------------------------------------------------

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start the command inside the sandbox, stdout and stderr piped."""
        command = list(argv)
        if self.host.mode == "namespaces" and self.host.bwrap:
            # bwrap would report a missing command as its own failure
            self._check_runnable(command[0], env.get("PATH", ""))
            command = [
                self.host.bwrap,
                *namespace_args(self.host.hide),
                "--bind",
                str(self.dir),
                str(self.dir),
                "--chdir",
                str(self.work),
                "--",
                *command,
            ]
        popen: dict[str, Any] = dict(
            cwd=self.work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            umask=0o022,
        )
        if self.group is not None and self._spawns_inside():
            # no code between fork and exec: the runner steps into the attempt's
            # groups while it starts the command (born inside), and setpriv drops to
            # the job user; subprocess then uses vfork instead of copying the runner
            setpriv = self.host.setpriv
            if self.as_job_user and setpriv is not None:
                # setpriv would report a missing command as its own failure
                self._check_runnable(command[0], env.get("PATH", ""))
                command = [*setpriv_args(setpriv, self.uid, self.gid), *command]
            group = self.group
            self.proc = group.spawn_inside(
                lambda: self._in_network(lambda: subprocess.Popen(command, **popen))
            )
            return self.proc
        fds = self.group.open_for_joining() if self.group is not None else []

        def enter_cgroup() -> None:  # in the child, between fork and exec
            for fd in fds:
                os.write(fd, b"0")

        user: dict = {}
        if self.as_job_user:
            user = {"user": self.uid, "group": self.gid, "extra_groups": []}
        try:
            self.proc = self._in_network(
                lambda: subprocess.Popen(
                    command,
                    preexec_fn=enter_cgroup if fds else None,  # noqa: PLW1509 - only os.write
                    **popen,
                    **user,
                )
            )
        finally:
            for fd in fds:
                os.close(fd)
        return self.proc

    def _in_network(self, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        """Start the command in the attempt's network namespace (when it has one); the
        runner lets go of the namespace then: it lives as long as the command's tree."""
        if self.network is None:
            return start()
        try:
            return self.network.run_inside(start)
        finally:
            self.network.close()

    def _spawns_inside(self) -> bool:
        """Whether `spawn` may start the command by stepping into its groups (root,
        which may move itself back; with setpriv when the job has a user of its own)."""
        return os.geteuid() == 0 and (not self.as_job_user or self.host.setpriv is not None)

    @staticmethod
    def _check_runnable(cmd: str, path: str) -> None:
        if "/" in cmd:
            if not os.path.exists(cmd):
                raise FileNotFoundError(cmd)
            if not os.access(cmd, os.X_OK):
                raise PermissionError(cmd)
        elif shutil.which(cmd, path=path) is None:
            raise FileNotFoundError(cmd)

    def kill(self, grace: float = 0.0) -> None:
        """Everything of the attempt dies: through its cgroup (sessions and double
        forks included); without one, the runner's process tree (it is a subreaper)
        and the command's process group; under bubblewrap the pid namespace goes with
        its init."""
        pgid = self.proc.pid if self.proc is not None else None
        emptied = False
        if self.group is not None:
            emptied = bool(self.group.dirs()) and self.group.kill(grace)
            pgid = None  # nothing of the attempt is outside its cgroup
        if not emptied:
            # without a cgroup (or one that would not empty): the runner's process
            # tree, found by a scan of every process on the host. An emptied group
            # needs no scan (its orphans re-parented here are only zombies now; the
            # runner's exit hands them to init)
            try:
                kill_tree(list(psutil.Process().children(recursive=True)), pgid, grace=grace)
            except psutil.Error:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    @property
    def contained(self) -> bool:
        """True when nothing of the attempt can still run once `kill` returned."""
        return self.group is not None and not self.group.populated()

    def stats(self) -> Stats:
        return self.group.stats() if self.group is not None else Stats()

    # -- after --------------------------------------------------------------------------------

    def collect(self, store: ObjectStore) -> Collected:
        """Call only after `kill`: the job can no longer change what is read."""
        return collect_outputs(self.dir, store, self.uid, may_rename=self.contained, name="outputs")

    def remove(self) -> None:
        if self.group is not None:
            self.group.kill()
            self.group.remove()
        if self.network is not None:
            self.network.close()
        remove_known_dir(self.dir, subdirs=SUBDIRS)
        self.release_user()  # nothing of the attempt is left to run as it
