"""Nothing left behind, whatever ends the run.

The real thing: a pytest subprocess (a generated test using the harness's own fixtures) mounts tmpfs,
hugetlbfs 2M and ext4 on a loop device, makes a folder in /var/tmp and reserves one 2 MiB hugepage,
then waits. SIGTERM/SIGHUP to its process group must leave nothing (orderly teardown, exit status 2);
after SIGKILL with a non-default TMPDIR everything is still there and the session-start recovery
removes it; a live run's resources survive recovery run from another process. These need root,
hugetlbfs and loop devices and skip with the reason otherwise.

Then the bookkeeping without root: the ledger's owner identity (pid + start time + boot), recovery of
recorded folders, the hugepage holder on file before the pool grows, and the signal handling
(deferral in critical sections, repeats ignored, the last resort) in throwaway interpreters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.memory import PAGE_2M, ledger, mounts
from harness.memory.hugepages import HugepagePool, prune_stale
from harness.memory.usage import hugepage_dir
from harness.pytest.memory import recover_stale

READY_TIMEOUT = 120.0  # pytest start-up, mkfs.ext4, and up to 30 s queueing for a hugepage
EXIT_TIMEOUT = 60.0  # bound on the orderly teardown after SIGTERM (the last resort fires at 20 s)
NR_2M = hugepage_dir(PAGE_2M) / "nr_hugepages"

CHILD_CONFTEST = 'pytest_plugins = ["harness.pytest.memory"]\n'
CHILD_TEST = textwrap.dedent('''
    import json, os, time

    import pytest

    from harness.memory import PAGE_2M
    from harness.memory.ledger import Owner
    from harness.memory.mounts import MountError
    from harness.unsupported import Unsupported


    def _say(info):
        path = os.environ["KH_READY"]
        with open(path + ".part", "w") as f:
            json.dump(info, f)
        os.rename(path + ".part", path)  # the waiting test never reads half a file


    def test_hold_everything(host_mounts, hugepages):
        try:
            mps = [host_mounts.tmpfs(), host_mounts.hugetlbfs(PAGE_2M), host_mounts.ext4(64 << 20)]
            hostfs = host_mounts.hostfs()
        except MountError as e:
            _say({"skip": str(e)})
            raise
        try:
            hugepages.reserve(PAGE_2M, 1)
        except Unsupported as e:  # HugepagesUnavailable: the run skips with it
            _say({"skip": str(e)})
            raise
        _say({"pid": os.getpid(), "owner": Owner.current().key, "base": str(host_mounts.base),
              "mounts": [str(m) for m in mps], "image": str(host_mounts.base / "ext4.img"),
              "loop": host_mounts._loop, "hostfs": str(hostfs), "holder": hugepages.pool.key})
        time.sleep(300)
''')


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: mounts, loop devices and hugepage pools"
    try:
        fss = Path("/proc/filesystems").read_text()
    except OSError:
        fss = ""
    if "hugetlbfs" not in fss:
        return "this kernel has no hugetlbfs"
    if not NR_2M.exists():
        return f"this kernel has no 2 MiB hugepage pool ({NR_2M} is missing)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control is missing)"
    for tool in ("losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


needs_host = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


# ---- helpers: the child run and what the machine shows ------------------------------------------
def _nr_2m() -> int:
    return int(NR_2M.read_text())


def _holders_2m(book: dict[str, Any] | None = None) -> dict[str, int]:
    if book is None:
        if not ledger.LEDGER.exists():
            return {}
        with ledger.locked(ledger.LEDGER) as led:
            return _holders_2m(led)
    return dict(book.get("pools", {}).get(str(PAGE_2M), {}).get("holders", {}))


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(st[2]) == pgid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    log: Path
    info: dict[str, Any] = field(default_factory=dict)
    nr_before: int = 0
    foreign_before: bool = False

    def output(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""

    def left(self, book: dict[str, Any] | None = None) -> dict[str, list[str]]:
        """What of the child's is still on the machine (book: the ledger, when the caller holds it)."""
        base = self.info["base"]
        under = [mp for mp in mounts.mountpoints() if mp == base or mp.startswith(base + "/")]
        loops = [dev for dev, b in mounts.loop_devices().items() if b.removesuffix(" (deleted)") == self.info["image"]]
        dirs = [d for d in (base, self.info["hostfs"]) if os.path.lexists(d)]
        recs = book.get("owners", {}) if book is not None else ledger.owners()
        owners = [k for k in recs if k == self.info["owner"]]
        holders = [k for k in _holders_2m(book) if k == self.info["holder"]]
        return {"mounts": under, "loops": loops, "dirs": dirs, "owners": owners, "holders": holders}

    def assert_pool_back(self) -> None:
        holders = _holders_2m()
        assert self.info["holder"] not in holders, f"the child's hugepage is still in the ledger: {holders}"
        if not self.foreign_before and not holders:  # others reserving meanwhile move the pool too
            assert _nr_2m() == self.nr_before, f"nr_hugepages (2 MiB) is {_nr_2m()}, was {self.nr_before}"


def _start(tmp_path: Path, *, xdist: bool, tmpdir: str | None = None) -> Child:
    (tmp_path / "conftest.py").write_text(CHILD_CONFTEST)
    (tmp_path / "test_child.py").write_text(CHILD_TEST)
    ready = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not the outer run's
    env["KH_READY"] = str(ready)
    if tmpdir:
        env["TMPDIR"] = tmpdir
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "test_child.py"]
    if xdist:
        argv += ["-n", "1"]
    log = tmp_path / "child.log"
    holders = _holders_2m()
    nr = _nr_2m()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    child = Child(proc, log, nr_before=nr, foreign_before=bool(holders))
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child run ended ({proc.returncode}) before it was ready:\n{child.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the child run was not ready after {READY_TIMEOUT:g} s:\n{child.output()}")
        time.sleep(0.05)
    child.info = json.loads(ready.read_text())
    if "skip" in child.info:
        pytest.skip(f"the child run cannot hold the resources here: {child.info['skip']}")
    return child


def _stop(child: Child, sig: int) -> int:
    """Send sig to the child's process group; its exit status once the whole group is gone."""
    os.killpg(child.proc.pid, sig)
    try:
        rc = child.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child run was still running {EXIT_TIMEOUT:g} s after signal {sig}:\n{child.output()}")
    deadline = time.monotonic() + EXIT_TIMEOUT
    while _group(child.proc.pid):  # xdist workers end after their controller
        assert time.monotonic() < deadline, f"group members still alive: {_group(child.proc.pid)}"
        time.sleep(0.05)
    return rc


@pytest.fixture
def reaper() -> Iterator[list[Child]]:
    """Whatever a test fails on: its children are killed and what they left is given back."""
    children: list[Child] = []
    yield children
    for c in children:
        if c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait(EXIT_TIMEOUT)
        end = time.monotonic() + EXIT_TIMEOUT
        while _group(c.proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
    if children:
        recover_stale()


def _nothing_left(child: Child) -> None:
    left = child.left()
    assert not any(left.values()), f"left behind: {left}\n{child.output()}"
    child.assert_pool_back()


# ---- the real thing -----------------------------------------------------------------------------
@needs_host
@pytest.mark.parametrize(("sig", "xdist"), [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGHUP, False)],
                         ids=["SIGTERM", "SIGTERM-xdist", "SIGHUP"])
def test_sigterm_leaves_nothing(tmp_path, reaper, sig, xdist):
    child = _start(tmp_path, xdist=xdist)
    reaper.append(child)
    left = child.left()
    assert len(left["mounts"]) == 3 and left["loops"] and len(left["dirs"]) == 2 and left["holders"], left
    rc = _stop(child, sig)
    # pytest's "interrupted": the orderly end, as after Ctrl-C (not -15: killed outright)
    assert rc == 2, f"exit status {rc}, expected 2 (interrupted)\n{child.output()}"
    assert signal.Signals(sig).name in child.output()
    _nothing_left(child)


@needs_host
def test_sigkill_with_another_tmpdir_is_recovered(tmp_path, reaper):
    tmpdir = tempfile.mkdtemp(prefix="khtest-", dir="/var/tmp")  # not a folder the fallback scans
    try:
        child = _start(tmp_path, xdist=True, tmpdir=tmpdir)
        reaper.append(child)
        assert child.info["base"].startswith(os.path.realpath(tmpdir) + "/")
        # Holding the ledger keeps any other session start on this machine (another test, another
        # run) from recovering the dead child's resources before they are counted here.
        with ledger.locked(ledger.LEDGER) as book:
            rc = _stop(child, signal.SIGKILL)
            assert rc == -signal.SIGKILL
            left = child.left(book)
            # all still there: SIGKILL cannot be caught, so this proves the recovery below does the work
            assert len(left["mounts"]) == 3, left
            assert left["loops"] and len(left["dirs"]) == 2 and left["owners"] and left["holders"], left
        cleaned = recover_stale()  # what every session start runs
        # (a session start elsewhere may have been first: then it did the same, with the same code)
        assert child.info["base"] in cleaned or not os.path.lexists(child.info["base"]), cleaned
        _nothing_left(child)
    finally:
        mounts.cleanup_dir(tmpdir)  # unmounts first: never rmtree into a mount


@needs_host
def test_recovery_leaves_a_live_run_alone(tmp_path, reaper):
    child = _start(tmp_path, xdist=False)
    reaper.append(child)
    held = child.left()
    other = subprocess.run([sys.executable, "-c", "import json; from harness.pytest.memory import recover_stale; "
                            "print(json.dumps(recover_stale()))"],
                           capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=True)
    cleaned = json.loads(other.stdout) + recover_stale()  # another process, then this one
    assert not [c for c in cleaned if child.info["base"] in c or child.info["holder"] in c], cleaned
    assert child.left() == held
    assert child.proc.poll() is None
    assert _stop(child, signal.SIGTERM) == 2
    _nothing_left(child)


@needs_host
def test_recovery_never_removes_a_folder_over_a_mount_it_did_not_record(tmp_path):
    led = tmp_path / "ledger.json"
    d = tmp_path / "kvm-harness-mnt.1.x"
    (d / "theirs").mkdir(parents=True)
    mounts.mount("none", d / "theirs", "tmpfs", "mode=0700")
    try:
        (d / "theirs" / "keep").write_text("x")
        _dead_owner(led, dirs=[str(d)])
        out = mounts.recover_recorded(led)
        assert (d / "theirs" / "keep").exists() and str(d / "theirs") in mounts.mountpoints()
        assert any("kept" in x for x in out)
        assert [r["dirs"] for r in json.loads(led.read_text())["owners"].values()] == [[str(d)]]
    finally:
        mounts.umount(d / "theirs", mounts.MNT_DETACH)


def test_sigterm_while_the_session_finishes_does_not_cut_it_short(tmp_path):
    """All cases done, reports being written / xdist waiting for its workers: SIGTERM then only makes
    the exit status non-zero (it used to raise into xdist's teardown: a traceback and exit 1)."""
    (tmp_path / "conftest.py").write_text(CHILD_CONFTEST + textwrap.dedent("""
        import os, signal, time

        def pytest_sessionfinish(session):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # where the interrupt would land
            open("finished", "w").close()
    """))
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_ok.py"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert (tmp_path / "finished").exists() and "Traceback" not in p.stdout + p.stderr
    assert "1 passed" in p.stdout


# ---- the ledger's bookkeeping (no root) ---------------------------------------------------------
def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _dead_owner(led: Path, **kinds: list[str]) -> str:
    me = ledger.Owner.current()
    rec = {"pid": me.pid, "start": (me.start or 0) + 12345, "boot_id": me.boot, "pidns": me.pidns,
           **{k: kinds.get(k, []) for k in ledger.KINDS}}  # this pid, another start time: recycled
    with ledger.locked(led) as book:
        book.setdefault("owners", {})[f"{rec['pid']}:{rec['start']}"] = rec
    return f"{rec['pid']}:{rec['start']}"


def test_owner_identity_is_pid_start_time_and_boot():
    me = ledger.Owner.current()
    assert me.alive() and me.start and me.boot
    assert not ledger.Owner(me.pid, (me.start or 0) + 1, me.boot, me.pidns).alive()  # recycled pid
    assert not ledger.Owner(me.pid, me.start, "another-boot", me.pidns).alive()
    assert not ledger.Owner(_dead_pid(), 1, me.boot, me.pidns).alive()
    assert ledger.Owner(_dead_pid(), 1, me.boot, "pid:[1]").alive()  # another pid namespace: hands off
    assert ledger.holder_alive(f"{me.key}:tag") and not ledger.holder_alive(f"{me.pid}:1:tag")
    assert ledger.holder_alive(f"{me.pid}:tag")  # written before start times: the pid decides


def test_record_forget_and_recover_folders(tmp_path):
    led = tmp_path / "ledger.json"
    mine, theirs, dead = (tmp_path / n for n in ("kvm-harness-mnt.1.a", "kvm-harness-mnt.2.b", "kvm-harness-mnt.3.c"))
    for d in (mine, theirs, dead):
        d.mkdir()
    assert ledger.record("dirs", mine, led) and ledger.record("dirs", theirs, led)
    key = ledger.Owner.current().key
    assert ledger.owners(led)[key]["dirs"] == [str(mine), str(theirs)]
    ledger.forget([("dirs", str(theirs))], led)
    assert ledger.owners(led)[key]["dirs"] == [str(mine)]
    gone = _dead_owner(led, dirs=[str(dead)], mounts=[str(dead / "tmpfs")])
    with ledger.locked(led) as book:  # an owner of an earlier boot: its folders (say in /var/tmp) go
        book["owners"]["9:9"] = {"pid": 9, "start": 9, "boot_id": "old", "dirs": [str(theirs)]}
    out = mounts.recover_recorded(led)
    assert sorted(out) == sorted([str(dead), str(theirs)])
    assert mine.exists() and not dead.exists() and not theirs.exists()
    assert set(ledger.owners(led)) == {key} and gone not in ledger.owners(led)
    # the fallback scan skips folders the ledger names (their owner, alive or not, decides)
    dead_named = tmp_path / f"kvm-harness-mnt.{_dead_pid()}.zz"
    dead_named.mkdir()
    ledger.record("dirs", dead_named, led)
    assert mounts.cleanup_stale([str(tmp_path)], ledger_path=led) == []
    assert dead_named.exists()
    ledger.forget([("dirs", str(mine)), ("dirs", str(dead_named))], led)
    assert ledger.owners(led) == {}  # the last record took the owner's entry with it


def test_ledger_write_stays_readable_between_its_two_steps(tmp_path):
    led = tmp_path / "ledger.json"
    with ledger.locked(led) as book:
        book["owners"] = {"1:1": {"pid": 1, "dirs": ["/x" * 200]}}
    with ledger.locked(led) as book:
        book["owners"] = {}
        book.save()
        # the longer old text is padded out with blanks before the file is shortened
        assert json.loads(led.read_text()) == {"owners": {}}


def test_hugepage_holder_is_on_file_before_the_pool_grows(tmp_path):
    sysfs = tmp_path / "sys"
    d = sysfs / f"hugepages-{PAGE_2M // 1024}kB"
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text("0\n")
    led = tmp_path / "ledger.json"
    seen = []

    class P(HugepagePool):
        def write_nr(self, page_size: int, value: int) -> None:
            seen.append(json.loads(led.read_text())["pools"][str(page_size)]["holders"])
            super().write_nr(page_size, value)

    p = P(sysfs, led)
    assert p.key.startswith(ledger.Owner.current().key + ":")
    p.reserve(PAGE_2M, 2)
    assert seen == [{p.key: 2}]  # a kill during the growth leaves a holder the next run settles
    p.release_all()
    assert (d / "nr_hugepages").read_text().strip() == "0"


def test_pool_settles_a_recycled_pid(tmp_path):
    sysfs = tmp_path / "sys"
    d = sysfs / f"hugepages-{PAGE_2M // 1024}kB"
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text("5\n")
    led = tmp_path / "ledger.json"
    me = ledger.Owner.current()
    led.write_text(json.dumps({"boot_id": me.boot, "pools": {str(PAGE_2M): {
        "base": 2, "holders": {f"{me.pid}:{(me.start or 0) + 7}:dead": 3}}}}))
    assert prune_stale(sysfs, led) == [f"3 2 MiB hugepage(s) of {me.pid}:{(me.start or 0) + 7}:dead"]
    assert (d / "nr_hugepages").read_text().strip() == "2"


# ---- signals (each in its own interpreter) --------------------------------------------------------
def _py(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_sigterm_is_deferred_in_critical_sections_and_repeats_are_ignored():
    p = _py("""
        import os, signal
        from harness.memory import cleanup
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # nohup: left alone
        assert cleanup.install(grace=30)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        try:
            with cleanup.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(100000))
                print("finished the critical section", flush=True)
        except cleanup.Terminated as e:
            print("then raised", e.signum, isinstance(e, KeyboardInterrupt), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100000))
        print("second SIGTERM ignored", cleanup.terminating(), flush=True)
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["finished the critical section", "then raised 15 True",
                                     "second SIGTERM ignored 15"]


def test_install_nests_and_uninstall_restores():
    p = _py("""
        import signal
        from harness.memory import cleanup
        assert cleanup.install() and cleanup.install()      # pytest in-process inside pytest
        cleanup.uninstall()
        assert signal.getsignal(signal.SIGTERM) is cleanup._handler   # the outer one still holds
        cleanup.uninstall()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("ok")
    """)
    assert p.stdout.strip() == "ok", p.stderr


def test_last_resort_cleans_up_and_exits_143(tmp_path):
    flag = tmp_path / "cleaned"
    p = _py(f"""
        import os, signal, time
        from harness.memory import cleanup
        cleanup.install(grace=0.3)
        cleanup.register(lambda: open({str(flag)!r}, "w").close())
        with cleanup.critical():      # stuck where the interrupt cannot land
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(20)
        print("not reached")
    """)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, p.stdout, p.stderr)
    assert flag.exists() and "not reached" not in p.stdout
    assert "still running" in p.stderr
