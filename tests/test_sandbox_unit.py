"""The sandbox's pure decisions and its file handling, without processes: cgroup
layout and limit plans, the description an operator sees, the kernel's counters, the
job's environment, log cutting, output collection that never follows a link, safe
unpacking of a shipped working directory, and deterministic packing."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from corral.agent.objects import ObjectStore
from corral.agent.sandbox import workdir as unpack
from corral.agent.sandbox.collect import collect_outputs
from corral.client import workdir as packing
from corral.domain.drain import Holder, ObjectInfo, at_risk
from corral.domain.instances import InstanceState
from corral.domain.sandbox import (
    DEFAULT_MAX_PIDS,
    MINIMAL_PATH,
    LimitPlan,
    SandboxFacts,
    attempts_memory_ceiling,
    cgroup_layout,
    command_result,
    cut_log,
    describe,
    job_environment,
    log_marker,
    loopback_resolvers,
    not_found_reason,
    parse_flat_keyed,
    parse_mountinfo,
    pids_ceilings,
    plan_limits,
    slow_group_moves,
    text_problem,
)

HYBRID_MOUNTS = """\
24 29 0:22 / /sys rw,nosuid - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu\\040acct rw - cgroup cgroup rw,cpuacct
35 30 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
"""
HYBRID_SELF = "4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n8:pids:/\n9:name=systemd:/\n0::/\n"
UNIFIED_MOUNTS = "25 24 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
UNIFIED_SELF = "0::/system.slice/corral-agent.service\n"


def test_cgroup_layout_of_a_hybrid_and_a_unified_host():
    hybrid = cgroup_layout(HYBRID_MOUNTS, HYBRID_SELF)
    assert hybrid.v2_dir == "/sys/fs/cgroup/unified"
    assert dict(hybrid.v1_dirs) == {
        "memory": "/sys/fs/cgroup/memory/process_api/abc",
        "cpu": "/sys/fs/cgroup/cpu",
        "pids": "/sys/fs/cgroup/pids",
    }
    assert hybrid.hybrid
    unified = cgroup_layout(UNIFIED_MOUNTS, UNIFIED_SELF)
    assert unified.v2_dir == "/sys/fs/cgroup/system.slice/corral-agent.service"
    assert not unified.v1_dirs and not unified.hybrid
    assert cgroup_layout("", "1:cpu:/\n").v2_dir is None


def test_cgroup_moves_are_slow_unless_cgroup2_favors_dynamic_changes():
    assert slow_group_moves(parse_mountinfo(HYBRID_MOUNTS))
    assert slow_group_moves(parse_mountinfo(UNIFIED_MOUNTS))
    favoring = UNIFIED_MOUNTS.replace("rw,nsdelegate", "rw,nsdelegate,favordynmods")
    assert not slow_group_moves(parse_mountinfo(favoring))
    hybrid_favoring = HYBRID_MOUNTS.replace("cgroup2 rw", "cgroup2 rw,favordynmods")
    assert not slow_group_moves(parse_mountinfo(hybrid_favoring))
    assert not slow_group_moves([])  # no cgroup2: no group moves to speak of


def test_limits_go_through_v2_first_then_v1_else_are_recorded_as_not_enforced():
    assert plan_limits(frozenset({"memory", "cpu"}), frozenset({"memory"})) == LimitPlan("v2", "v2")
    hybrid = plan_limits(frozenset(), frozenset({"memory", "cpu"}))
    assert hybrid == LimitPlan("v1", "v1")
    assert hybrid.enforced(2048, 2) == "memory, cpu"
    assert LimitPlan(None, "v1").enforced(2048, 1) == "cpu"
    assert LimitPlan(None, None).enforced(2048, 1).startswith("none: ")
    assert LimitPlan(None, None).enforced(0, 0) == "none requested"
    # the pids ceiling is every attempt's, not asked for: it goes the same way
    assert plan_limits(frozenset({"pids"}), frozenset({"memory", "cpu", "pids"})) == LimitPlan(
        "v1", "v1", "v2"
    )
    assert plan_limits(frozenset(), frozenset({"pids"})).enforced(0, 0) == "none requested"


def test_the_host_keeps_half_its_process_ids_whatever_the_attempts_do():
    assert pids_ceilings(32768, DEFAULT_MAX_PIDS) == (16384, 4096)
    assert pids_ceilings(4_194_304, 100) == (2_097_152, 100)
    assert pids_ceilings(32768, 0) == (16384, 16384)  # 0: the agent's whole share
    assert pids_ceilings(1000, 4096) == (500, 500)  # never more than the agent's share


def test_the_description_says_once_what_the_host_cannot_isolate():
    full = SandboxFacts(root=True, cgroup=True, limits=LimitPlan("v1", "v1", "v1"), job_user="cj")
    text, warnings = describe(full)
    assert text == "cgroup v2; limits memory v1,cpu v1,pids v1; user cj" and warnings == []
    no_pids = SandboxFacts(root=True, cgroup=True, limits=LimitPlan("v1", "v1"), job_user="cj")
    (warning,) = describe(no_pids)[1]
    assert "no usable pids cgroup controller" in warning and "fork bomb" in warning
    bare = SandboxFacts(root=False, cgroup=False, cgroup_error="no cgroup v2 hierarchy")
    text, warnings = describe(bare)
    assert text == "subreaper; limits off"
    assert any("subreaper" in w and "no cgroup v2 hierarchy" in w for w in warnings)
    assert any("not enforced" in w for w in warnings)
    assert any("can read the agent's data dir" in w for w in warnings)
    ns = SandboxFacts(root=False, cgroup=False, namespaces=True)
    assert not any("data dir" in w for w in describe(ns)[1])


def test_all_attempts_are_held_to_what_the_agent_offers_and_the_host_keeps_a_reserve():
    assert attempts_memory_ceiling(24_000, 300) == 300
    assert attempts_memory_ceiling(24_000, 24_000) == 21_600  # a tenth kept
    assert attempts_memory_ceiling(24_000, 0) == 21_600  # nothing offered: the host's
    assert attempts_memory_ceiling(2_048, 2_048) == 1_536  # at least 512 MB kept
    assert attempts_memory_ceiling(256, 256) == 64  # never nothing


def test_an_oom_kill_says_which_memory_ran_out():
    assert command_result(-9, 1, 64) == (137, "killed: out of memory (limit 64 MB)")
    assert command_result(-9, 1, 0, 300) == (
        137,
        "killed: out of memory (the job set no --memory; this instance's jobs share 300 MB)",
    )
    assert command_result(-9, 1, 0) == (
        137,
        "killed: out of memory (the host's: the job set no --memory)",
    )
    assert command_result(-9, 0, 0, 300) == (137, "killed by signal SIGKILL")
    assert command_result(0, 1, 0, 300) == (0, None)  # a child killed, the job went on


def test_the_description_says_whether_jobs_share_the_hosts_network():
    plan = LimitPlan("v1", "v1", "v1")
    iso = SandboxFacts(root=True, cgroup=True, limits=plan, job_user="cj", network="isolated")
    text, warnings = describe(iso)
    assert text.endswith("; network isolated") and warnings == []
    shared = SandboxFacts(root=True, cgroup=True, limits=plan, shared_memory_mb=300)
    assert describe(shared)[0] == "cgroup v2; limits memory v1,cpu v1,pids v1; jobs share 300 MB"
    (warning,) = describe(replace(iso, network="host"))[1]
    assert "share the host's network (--job-network host)" in warning
    assert "its database" in warning
    fallback = replace(iso, network="host", network_error="nftables (nft) is not installed")
    (warning,) = describe(fallback)[1]
    assert "(nftables (nft) is not installed)" in warning
    (warning,) = describe(replace(iso, loopback_resolvers=("127.0.0.53",)))[1]
    assert "cannot resolve names" in warning and "127.0.0.53" in warning


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("nameserver 127.0.0.53\noptions edns0 trust-ad\n", ("127.0.0.53",)),
        ("# generated\nnameserver ::1\nnameserver 127.0.0.1 # local\n", ("::1", "127.0.0.1")),
        ("nameserver 127.0.0.53\nnameserver 10.0.0.2\n", ()),  # one reachable is enough
        ("nameserver 10.255.255.53\n", ()),
        ("search example.org\n", ()),  # none at all: the resolver's default, not ours to say
        ("nameserver not-an-address\n", ()),
    ],
)
def test_a_resolv_conf_of_loopback_resolvers_only_is_noticed(conf: str, expected):
    assert loopback_resolvers(conf) == expected


def test_kernel_counters_and_the_oom_reason():
    events = parse_flat_keyed("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert events["oom_kill"] == 1
    v1 = parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert v1["oom_kill"] == 2
    assert parse_flat_keyed("usage_usec 1500000\nuser_usec 1\n")["usage_usec"] == 1_500_000
    assert command_result(-9, 1, 2048) == (137, "killed: out of memory (limit 2048 MB)")
    assert command_result(-9, 0, 2048) == (137, "killed by signal SIGKILL")
    # no limit of its own: the host's memory ran out, and the kernel chose the job
    assert command_result(-9, 1, 0) == (
        137,
        "killed: out of memory (the host's: the job set no --memory)",
    )
    assert command_result(0, 1, 2048) == (0, None)  # a child was killed; the job coped
    assert command_result(3, 0, 0) == (3, None)


def test_the_environment_is_built_from_scratch():
    os.environ["CORRAL_SECRET_FOR_TEST"] = "leak"
    env = job_environment(
        {"LR": "0.1", "PATH": "/opt/bin"},
        {"CORRAL_JOB_ID": "7"},
        home="/jobs/7-1",
        user="corral-job",
    )
    assert env == {
        "PATH": "/opt/bin",
        "HOME": "/jobs/7-1",
        "LANG": "C.UTF-8",
        "TMPDIR": "/jobs/7-1/tmp",
        "USER": "corral-job",
        "LOGNAME": "corral-job",
        "LR": "0.1",
        "CORRAL_JOB_ID": "7",
    }
    assert job_environment({}, {}, "/h", "u")["PATH"] == MINIMAL_PATH
    assert (
        job_environment({"CORRAL_JOB_ID": "forged"}, {"CORRAL_JOB_ID": "7"}, "/h", "u")[
            "CORRAL_JOB_ID"
        ]
        == "7"
    )


def test_a_log_is_cut_at_its_limit_with_the_marker():
    assert log_marker(64 * 2**20) == b"[corral: log truncated after 64 MiB]\n"
    assert cut_log(0, 10, b"12345") == (b"12345", False)
    assert cut_log(8, 10, b"12345") == (b"12" + log_marker(10), True)
    # output that fills the limit exactly is whole; the next byte brings the marker
    # (a pipe read in 64 KiB pieces meets a 4 MiB limit exactly on a boundary)
    assert cut_log(5, 10, b"12345") == (b"12345", False)
    assert cut_log(10, 10, b"x") == (log_marker(10), True)
    assert cut_log(10, 10, b"") == (b"", False)
    # after the marker, nothing more
    assert cut_log(10 + len(log_marker(10)), 10, b"x") == (b"", True)
    assert log_marker(1000) == b"[corral: log truncated after 1000 bytes]\n"


def test_text_a_process_cannot_take():
    assert text_problem("fine é") is None
    assert text_problem("a\0b") == "contains a NUL byte"
    assert text_problem("\udcff") == "is not valid UTF-8"


def test_a_claim_never_makes_an_object_safe_but_a_claimed_object_is_at_risk():
    def h(i: str) -> Holder:
        return Holder(i, InstanceState.RUNNING, False)

    # the real holder leaves; another instance only claims the object: at risk
    claimed = ObjectInfo("s1", 10, (h("holder"),), claims=("claimant",))
    assert at_risk([claimed], "holder") == [claimed]
    # the claimant leaves holding only an unverified claim: still at risk
    fresh = ObjectInfo("s2", 10, (), claims=("claimant",))
    assert at_risk([fresh], "claimant") == [fresh]
    # a verified copy elsewhere makes it safe
    safe = ObjectInfo("s3", 10, (h("holder"), h("other")), claims=("claimant",))
    assert at_risk([safe], "holder") == []


# ---- output collection ---------------------------------------------------------------------


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    (d / "outputs" / "sub").mkdir(parents=True)
    return d


def test_outputs_are_collected_without_following_any_link(tmp_path: Path, job_dir: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    out = job_dir / "outputs"
    (out / "model.bin").write_bytes(b"weights")
    (out / "sub" / "log.txt").write_text("epoch 1")
    os.symlink(victim / "precious", out / "link")
    os.symlink(victim, out / "dirlink")
    os.mkfifo(out / "pipe")
    store = ObjectStore(tmp_path / "agent")
    got = collect_outputs(job_dir, store, os.getuid())
    assert [o["path"] for o in got.outputs] == ["model.bin", "sub/log.txt"]
    assert got.notes == [
        "skipped 3 outputs: dirlink is a symlink; link is a symlink; pipe is a fifo"
    ]
    assert (victim / "precious").read_text() == "keep me"
    stored = store.path(got.outputs[0]["sha256"])
    assert stored.read_bytes() == b"weights"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    assert (out / "model.bin").exists()  # copied, not taken
    assert stat.S_IMODE((out / "model.bin").stat().st_mode) != 0o444  # never chmod-ed there


def test_a_symlinked_output_dir_is_skipped_whole(tmp_path: Path, job_dir: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a").write_text("a")
    (job_dir / "outputs" / "sub").rmdir()
    (job_dir / "outputs").rmdir()
    os.symlink(victim, job_dir / "outputs")
    got = collect_outputs(job_dir, ObjectStore(tmp_path / "agent"), os.getuid())
    assert got.outputs == []
    assert got.notes == ["skipped the output dir: it is a symlink"]
    assert (victim / "a").read_text() == "a"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_files_the_job_does_not_own_are_skipped_and_a_lone_file_may_be_taken(
    tmp_path: Path, job_dir: Path
):
    out = job_dir / "outputs"
    (out / "mine").write_bytes(b"m" * 100)
    (out / "theirs").write_bytes(b"t")
    os.chown(out / "mine", 4242, 4242)
    os.chown(out / "sub", 4242, 4242)
    os.chown(out, 4242, 4242)
    store = ObjectStore(tmp_path / "agent")
    got = collect_outputs(job_dir, store, 4242, may_rename=True)
    assert [o["path"] for o in got.outputs] == ["mine"]
    assert got.notes == ["skipped 1 output: theirs is not owned by the job"]
    stored = store.path(got.outputs[0]["sha256"])
    assert not (out / "mine").exists()  # one link, same filesystem: renamed into the store
    assert (stored.stat().st_uid, stat.S_IMODE(stored.stat().st_mode)) == (0, 0o444)


def test_a_full_store_leaves_nothing_behind(tmp_path: Path, job_dir: Path, monkeypatch):
    (job_dir / "outputs" / "big").write_bytes(b"x" * 10)
    store = ObjectStore(tmp_path / "agent")
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(store.root)):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as exc:
        collect_outputs(job_dir, store, os.getuid())
    assert exc.value.errno == 28
    assert list(store.root.iterdir()) == []


# ---- the shipped working directory ----------------------------------------------------------


def _tar(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    p = tmp_path / "w.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return p


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type = kind
    i.linkname = link
    return i


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([(_info("/etc/evil"), b"x")], "an absolute path"),
        ([(_info("a/../../evil"), b"x")], "'..'"),
        ([(_info("up", tarfile.SYMTYPE, "../../etc"), None)], "pointing out of the tree"),
        ([(_info("abs", tarfile.SYMTYPE, "/etc/passwd"), None)], "absolute path"),
        ([(_info("hard", tarfile.LNKTYPE, "/etc/passwd"), None)], "a hard link"),
        ([(_info("dev", tarfile.CHRTYPE), None)], "not a file, directory or symlink"),
        ([(_info("fifo", tarfile.FIFOTYPE), None)], "not a file, directory or symlink"),
    ],
)
def test_an_unsafe_workdir_archive_is_refused(tmp_path: Path, members, why: str):
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(unpack.UnsafeArchive, match=why):
        unpack.extract(_tar(tmp_path, members), dest)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_nothing_is_written_through_a_symlink_in_the_archive(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "work"
    dest.mkdir()
    # a link, then a file "through" it: links are made last, so the file went into a
    # real directory and the link then collides with it
    archive = _tar(
        tmp_path,
        [(_info("d", tarfile.SYMTYPE, "x"), None), (_info("d/f"), b"data")],
    )
    with pytest.raises(unpack.UnsafeArchive, match="appears twice"):
        unpack.extract(archive, dest)
    assert not (dest / "d").is_symlink()
    assert list(outside.iterdir()) == []


def _tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("import pkg.mod\n")
    (root / "pkg" / "mod.py").write_text("X = 1\n")
    (root / "pkg" / "cache.tmp").write_text("junk")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    (root / "data").mkdir()
    (root / "data" / "huge.bin").write_bytes(b"\0" * 5000)
    (root / "data" / "keep.txt").write_text("kept by negation")
    (root / ".gitignore").write_text("data/*\n!data/keep.txt\n")
    (root / "pkg" / ".gitignore").write_text("*.tmp\n")
    (root / ".corralignore").write_text("secret.env\n")
    (root / "secret.env").write_text("TOKEN=x")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    os.symlink("train.py", root / "link.py")
    os.symlink("/etc/passwd", root / "escape")
    return root


def test_packing_is_deterministic_and_honours_ignore_files(tmp_path: Path):
    a = _tree(tmp_path / "a")
    first = packing.pack(a)
    os.utime(a / "train.py", (1, 1))  # times and modes that do not matter
    (a / "pkg" / "mod.py").chmod(0o600)
    second = packing.pack(a)
    b = _tree(tmp_path / "b")  # the same tree elsewhere
    third = packing.pack(b)
    try:
        assert first.sha256 == second.sha256 == third.sha256
        with tarfile.open(first.path) as t:
            names = t.getnames()
            assert {m.mtime for m in t} == {0} and {m.uid for m in t} == {0}
            assert t.getmember("run.sh").mode == 0o755
            assert t.getmember("train.py").mode == 0o644
        assert names == [
            ".corralignore",
            ".gitignore",
            "data",
            "data/keep.txt",
            "link.py",
            "pkg",
            "pkg/.gitignore",
            "pkg/mod.py",
            "run.sh",
            "train.py",
        ]
        assert first.skipped == ["escape (a symlink pointing out of the directory)"]
        dest = tmp_path / "unpacked"
        dest.mkdir()
        unpack.extract(first.path, dest)
        assert (dest / "pkg" / "mod.py").read_text() == "X = 1\n"
        assert os.readlink(dest / "link.py") == "train.py"
    finally:
        for p in (first, second, third):
            p.path.unlink()


def test_a_workdir_over_the_limit_names_its_biggest_files(tmp_path: Path):
    root = tmp_path / "w"
    root.mkdir()
    (root / "big.bin").write_bytes(b"\0" * 3000)
    (root / "medium.bin").write_bytes(b"\0" * 2000)
    (root / "small.py").write_text("x")
    with pytest.raises(packing.WorkdirError) as exc:
        packing.pack(root, max_bytes=4000)
    message = str(exc.value)
    assert "over the 3.9 KiB limit" in message
    assert message.index("big.bin (2.9 KiB)") < message.index("medium.bin (2.0 KiB)")
    assert ".corralignore" in message


def test_the_shipped_unit_and_bootstrap_keep_the_join_token_in_a_0600_file():
    root = Path(__file__).resolve().parents[1] / "corral"
    unit = (root / "deploy" / "corral-agent.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert "--join-token " not in exec_start and "CORRAL_JOIN_TOKEN" not in unit
    assert "KillMode=process" in unit and "Delegate=yes" in unit
    script = (root / "server" / "templates" / "bootstrap.sh").read_text()
    # the env file the unit reads never holds the token; a token given on the command
    # line goes to a file written under umask 077, and the agent is given its path
    assert "CORRAL_JOIN_TOKEN=%s" not in script
    assert """(umask 077 && printf '%s\\n' "$JOIN_TOKEN" > "$TOKEN_FILE")""" in script
    assert 'set -- "$@" --join-token-file "$TOKEN_FILE"' in script


def test_without_cgroup_kill_a_group_is_frozen_killed_and_thawed(tmp_path: Path):
    """The kill for kernels without cgroup.kill, on a real cgroup: a daemon that left
    its session dies with the group."""
    import subprocess

    from corral.agent.sandbox import cgroups

    key = cgroups.agent_key(tmp_path)
    found, why = cgroups.detect(key)
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"no cgroup v2 group here: {why}")
        pytest.skip(f"no cgroup v2 group here: {why}")
    try:
        found.kill_file = False
        group = found.attempt(1, 1)
        group.create(0, 0)
        fds = group.open_for_joining()
        try:
            proc = subprocess.Popen(
                ["sh", "-c", "setsid sh -c 'sleep 300' & sleep 300"],
                preexec_fn=lambda: [os.write(fd, b"0") for fd in fds],  # noqa: PLW1509
                start_new_session=True,
            )
        finally:
            for fd in fds:
                os.close(fd)
        import time

        deadline = time.monotonic() + 10
        while len(group.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(group.pids()) >= 3
        assert group.kill()
        assert group.pids() == [] and not group.populated()
        proc.wait(timeout=5)
        group.remove()
        assert found.attempts() == []
    finally:
        cgroups.cleanup_agent_groups(key)


def test_a_missing_command_says_where_it_was_looked_for_but_never_a_path_the_job_set():
    assert not_found_reason("python", MINIMAL_PATH) == (
        f"command not found: python (not on the job's PATH, {MINIMAL_PATH}; "
        "give its full path, or set PATH with -e)"
    )
    # a PATH the job set may have come from a secret: not repeated in the reason
    secretish = "/opt/s3cr3t-token/bin:/usr/bin"
    reason = not_found_reason("python", secretish)
    assert secretish not in reason and "not on the job's PATH;" in reason
    assert (
        not_found_reason("./train.sh", MINIMAL_PATH)
        == "command not found: ./train.sh (no such file)"
    )
