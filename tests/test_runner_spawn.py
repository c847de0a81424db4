"""How a runner starts its command and waits for it, with real processes: the
command is in its attempt's cgroups from its first instruction and runs as the job
user (every id, no group, no capability) whichever way it was started; the runner
is back in its own groups afterwards; and a trivial job costs the runner no thread
and no call but its finish, while a silent long one is still heartbeated."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from pathlib import Path

import pytest

from corral.agent import runner as runner_mod
from corral.agent.sandbox import cgroups
from corral.agent.sandbox.attempt import AttemptSandbox
from corral.agent.sandbox.host import Host, detect
from tests.test_finish_logs import FakeServer, _runner

pytestmark = pytest.mark.slow


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def root_host(tmp_path: Path):
    """A root agent's host facts (job user, cgroups) for a throwaway data dir, its jobs
    on the host's network (each attempt's own network is test_job_network's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the job user, cgroups)")
    data = tmp_path / "data"
    data.mkdir()
    host = detect(data, job_network="host")
    if host.cgroups is None:
        host.close()
        if _in_ci():
            pytest.fail("no cgroups here")
        pytest.skip("no cgroups here")
    try:
        yield host
    finally:
        cgroups.cleanup_agent_groups(cgroups.agent_key(data))
        host.close()


def _status(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


def _own_cgroups() -> str:
    return Path("/proc/self/cgroup").read_text()


@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "preexec"])
def test_the_command_is_born_in_its_cgroup_as_the_job_user(root_host: Host, setpriv: bool):
    if setpriv and root_host.setpriv is None:
        pytest.skip("no usable setpriv on this host")
    if not setpriv:
        root_host.setpriv = None  # the fallback: user and cgroup set between fork and exec
    job_dir = Path(root_host.jobs_dir) / f"1-1-{secrets.token_hex(6)}"
    sandbox = AttemptSandbox(root_host, 1, 1, job_dir)
    sandbox.prepare(0.5, 256)
    assert sandbox.group is not None
    before = _own_cgroups()
    try:
        env = sandbox.environment({}, {})
        proc = sandbox.spawn(["cat", "/proc/self/status", "/proc/self/cgroup"], env)
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert _own_cgroups() == before, "the runner must be back in its own groups"
        text = out.decode()
        st = _status(text)
        uid, gid = str(root_host.uid), str(root_host.gid)
        assert st["Uid"].split() == [uid] * 4  # real, effective, saved, filesystem
        assert st["Gid"].split() == [gid] * 4
        assert st["Groups"] == ""
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert int(st["CapAmb"], 16) == 0
        # its cgroups: the attempt's, in v2 and in each v1 twin
        lines = [line for line in text.splitlines() if line[:1].isdigit() and line.count(":") >= 2]
        own = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
        name = cgroups.attempt_name(1, 1)
        assert own[""].endswith(f"/{name}"), own
        for controller in sandbox.group.v1:
            key = next(k for k in own if controller in k.split(","))
            assert own[key].endswith(f"/{name}"), own
    finally:
        sandbox.kill()
        sandbox.remove()
    assert not job_dir.exists()


def test_a_missing_command_is_not_found_whichever_way_it_starts(root_host: Host):
    job_dir = Path(root_host.jobs_dir) / f"2-1-{secrets.token_hex(6)}"
    sandbox = AttemptSandbox(root_host, 2, 1, job_dir)
    sandbox.prepare(0, 0)
    before = _own_cgroups()
    try:
        with pytest.raises(FileNotFoundError):
            sandbox.spawn(["no-such-command-here"], sandbox.environment({}, {}))
        assert _own_cgroups() == before
    finally:
        sandbox.remove()


class _Sandbox:
    """What `_watch` and `_drain` need of a sandbox: nothing but kill."""

    def kill(self, grace: float = 0.0) -> None:
        pass


def _popen(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_a_trivial_command_costs_no_thread_and_its_output_rides_the_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "LOG_LINGER", 30.0)  # "ends within the linger", always
    server = FakeServer()
    r = _watching(server, tmp_path)
    threads = threading.active_count()
    proc = _popen(["sh", "-c", "echo out; echo err >&2"])
    assert r._watch(proc) == 0
    r._drain(proc)
    assert r.shipper is None and threading.active_count() == threads  # none was started
    assert server.calls == []
    assert sorted(d for _s, _st, d in r.logs.rest()) == [b"err\n", b"out\n"]
    assert r.logs.closed_streams == 2


def _watching(server: FakeServer, tmp_path: Path):
    r = _runner(server, tmp_path)
    r.shipper = None
    r.started_at = runner_mod.time.monotonic()
    r.sandbox = _Sandbox()
    return r


def test_a_silent_long_command_is_heartbeated(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "HEARTBEAT_EVERY", 0.3)
    server = FakeServer()
    r = _watching(server, tmp_path)
    proc = _popen(["sleep", "2"])
    assert r._watch(proc) == 0
    r._drain(proc)
    r.join_shipper()
    assert "heartbeat" in [a for a, _ in server.calls]


def test_output_waiting_past_the_linger_is_shipped_before_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "LOG_LINGER", 0.05)
    server = FakeServer()
    r = _watching(server, tmp_path)
    proc = _popen(["sh", "-c", "echo early; sleep 0.8"])
    assert r._watch(proc) == 0
    r._drain(proc)
    r.join_shipper()
    assert [a for a, _ in server.calls] == ["logs"]
    assert r.logs.rest() == []


def test_a_refused_heartbeat_stops_the_watch(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "HEARTBEAT_EVERY", 0.3)
    server = FakeServer()

    def refused(_method, url, json, deadline=None, stop=None):
        server.calls.append((url.rsplit("/", 1)[1], json))

        class Resp:
            status_code = 409
            text = "stale"

        return Resp

    server.request = refused  # type: ignore[method-assign]
    r = _watching(server, tmp_path)
    proc = _popen(["sleep", "30"])
    try:
        assert r._watch(proc) is None
        assert r.stale.is_set()
        assert [a for a, _ in server.calls] == ["heartbeat"]
    finally:
        proc.kill()
        proc.wait()


def test_each_live_attempt_claims_a_job_user_of_its_own(root_host: Host, tmp_path: Path):
    """Two attempts at once run as two users; a user whose attempt is gone is claimed
    again (the lowest free one), and the command runs as the attempt's user."""
    root_host.user_slots = str(tmp_path / "slots")
    first = AttemptSandbox(
        root_host, 3, 1, Path(root_host.jobs_dir) / f"3-1-{secrets.token_hex(6)}"
    )
    second = AttemptSandbox(
        root_host, 4, 1, Path(root_host.jobs_dir) / f"4-1-{secrets.token_hex(6)}"
    )
    try:
        first.claim_user()
        second.claim_user()
        assert first.user == f"{root_host.user}-0" and second.user == f"{root_host.user}-1"
        assert len({first.uid, second.uid, root_host.uid}) == 3
        assert 0 not in (first.uid, first.gid, second.uid, second.gid)
        second.prepare(0, 0)
        proc = second.spawn(["cat", "/proc/self/status"], second.environment({}, {}))
        out, _err = proc.communicate(timeout=30)
        st = _status(out.decode())
        assert st["Uid"].split() == [str(second.uid)] * 4
        assert st["Gid"].split() == [str(second.gid)] * 4
        assert os.stat(second.dir).st_uid == second.uid
        assert second.environment({}, {})["USER"] == second.user
    finally:
        second.kill()
        second.remove()
    first.release_user()
    third = AttemptSandbox(
        root_host, 5, 1, Path(root_host.jobs_dir) / f"5-1-{secrets.token_hex(6)}"
    )
    third.claim_user()
    try:
        assert third.user == f"{root_host.user}-0"  # the lowest free one again
    finally:
        third.release_user()


def test_the_job_users_lock_dir_must_be_the_agents_own(root_host: Host, tmp_path: Path):
    from corral.agent.sandbox.jobuser import JobUserError, claim_job_user

    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "slots"
    link.symlink_to(target)
    with pytest.raises(JobUserError):
        claim_job_user(root_host.user, str(link))
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    _user, fd = claim_job_user(root_host.user, str(open_dir))
    os.close(fd)
    assert open_dir.stat().st_mode & 0o777 == 0o700


def test_a_user_whose_runner_died_is_not_given_out_while_its_attempt_runs(
    root_host: Host, tmp_path: Path
):
    """A runner SIGKILLed before it released its user leaves its attempt's processes
    running as that user until the agent kills them: that user is passed over until
    its group is empty, then given out again."""
    root_host.user_slots = str(tmp_path / "slots")
    job_dir = Path(root_host.jobs_dir) / f"6-1-{secrets.token_hex(6)}"
    dead = AttemptSandbox(root_host, 6, 1, job_dir)
    dead.claim_user()
    dead.prepare(0, 0)
    assert dead.group is not None
    proc = dead.spawn(["sleep", "60"], dead.environment({}, {}))
    try:
        # the runner dies: the kernel closes its lock, nothing is released
        assert dead._user_lock is not None
        os.close(dead._user_lock)
        dead._user_lock = None
        other = AttemptSandbox(
            root_host, 7, 1, Path(root_host.jobs_dir) / f"7-1-{secrets.token_hex(6)}"
        )
        other.claim_user()
        assert other.user != dead.user, "a user whose processes still run was given out"
        other.release_user()
    finally:
        dead.kill()  # what the agent does when it reaps the dead runner's attempt
        proc.wait(timeout=10)
        dead.remove()
    again = AttemptSandbox(
        root_host, 8, 1, Path(root_host.jobs_dir) / f"8-1-{secrets.token_hex(6)}"
    )
    again.claim_user()
    try:
        assert again.user == dead.user  # its group is gone: free again
    finally:
        again.release_user()


def test_what_a_job_user_left_in_shared_places_is_removed_and_nothing_else(tmp_path: Path):
    """Files, directories and links owned by the user go, from the shared places and the
    sticky, world-writable directories inside them; another user's files, a link's
    target, what lies in a directory the user could not write and what it wrote to a
    directory shared on purpose stay."""
    if os.geteuid() != 0:
        pytest.skip("needs root (files of another user)")
    from corral.agent.sandbox.jobuser import remove_files_of

    uid, other = 64990, 64991
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    target = tmp_path / "precious"
    target.write_text("root's")

    def owned(path: Path, who: int, text: str | None = "x") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.mkdir()
        else:
            path.write_text(text)
        os.lchown(path, who, who)
        return path

    mine = [
        owned(shared / "secret", uid),
        owned(shared / "cache", uid, None),
        owned(shared / "cache" / "deep", uid),
    ]
    link = shared / "link"
    link.symlink_to(target)
    os.lchown(link, uid, uid)
    opened = shared / "x11"  # world-writable, not the user's: searched inside
    opened.mkdir()
    opened.chmod(0o1777)
    owned(opened / "socket-file", uid)
    closed = shared / "roots"  # the user could not have written here
    closed.mkdir(mode=0o755)
    results = shared / "results"  # shared on purpose (no sticky bit): results stay
    results.mkdir()
    results.chmod(0o777)
    kept = [
        owned(shared / "theirs", other),
        owned(closed / "not-theirs", uid),
        owned(results / "result.txt", uid),
        target,
    ]

    assert remove_files_of(uid, roots=(str(shared),)) == 4  # secret, cache, link, socket-file
    assert not any(p.exists() for p in [*mine, opened / "socket-file"]) and not link.is_symlink()
    assert all(p.exists() for p in kept) and target.read_text() == "root's"
    with pytest.raises(ValueError):
        remove_files_of(0, roots=(str(shared),))


def test_the_ipc_objects_of_a_user_are_found_by_owner_or_creator():
    from corral.agent.sandbox.jobuser import owned_ipc_ids

    shm = (
        "       key      shmid perms     size  cpid  lpid nattch   uid   gid  cuid  cgid\n"
        "   1433715          4   600       56  2225 12227      5   101   104   101   104\n"
        "  13393994         18   600     4096  9001  9001      0   995   995   995   995\n"
        "         0         19   600     4096  9002  9002      0     0     0   995   995\n"
    )
    assert owned_ipc_ids(shm, 995) == [18, 19]  # made by 995 and given to root: still its
    assert owned_ipc_ids(shm, 101) == [4]
    assert owned_ipc_ids(shm, 7) == []
    assert owned_ipc_ids("", 995) == []
