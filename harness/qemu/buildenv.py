"""Where kvmbuild.py's steps run: a logged, bounded subprocess, a lock file, a Debian chroot.

- `StepLog`: one build's log file (every command's output) plus progress lines on the terminal;
  a failed step raises `BuildStepError` naming the step, why, the log's last lines and its path.
- `Lock`: an flock()ed file, so two builds of one key (or two users of one chroot) take turns.
- `Chroot`: `debootstrap --variant=minbase SUITE` under .cache/chroots/, entered with chroot(8) and
  a clean environment. Device nodes are made with mknod (as debootstrap does outside lxc), never
  bind-mounted. The one mount, /proc (objtool reads /proc/self/maps while building KVM: without it
  `read_stack_limit: fopen failed`), is made by `unshare --mount --pid --fork --mount-proc` in a
  private mount namespace of that one command: no other process sees it and it vanishes with the
  command, even when the command is killed at its timeout. Whatever debootstrap itself mounted and
  left behind (killed at its timeout) is unmounted before anything else happens under that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.kvm.errors import HarnessError

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
TAIL = 25  # log lines quoted in a failure


class KvmBuildError(HarnessError):
    """A rebuild's name or options are malformed, or what it needs is missing; the message says which."""


class BuildStepError(HarnessError):
    """A build step failed: which, why, the log's last lines and where the whole log is."""

    def __init__(self, step: str, reason: str, log: Path | None = None, tail: list[str] | None = None) -> None:
        self.step, self.reason, self.log = step, reason, log
        msg = f"step {step!r} failed: {reason}"
        if tail:
            msg += f"\n  last {len(tail)} lines of {log}:\n" + "\n".join(f"    {ln}" for ln in tail)
        if log is not None:
            msg += f"\n  full log: {log}"
        super().__init__(msg)


class StepLog:
    """A build's log (appended; every command's output goes there) and its progress lines."""

    def __init__(self, path: Path, say: Callable[[str], None] = print) -> None:
        self.path = path
        self.say = say
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, text: str) -> None:
        self._f.write(text if text.endswith("\n") else text + "\n")

    def progress(self, text: str) -> None:
        self.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}")
        self.say(f"kvm-build: {text}")

    def tail(self, n: int = TAIL) -> list[str]:
        self._f.flush()
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [ln[-200:] for ln in lines if not ln.startswith("==== ")][-n:]

    def fail(self, step: str, reason: str) -> BuildStepError:
        self.write(f"==== FAILED: {step}: {reason}")
        return BuildStepError(step, reason, self.path, self.tail())

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def run(self, step: str, cmd: list[str], timeout: float, cwd: Path | None = None,
            env: dict[str, str] | None = None, what: str | None = None, where: str = "") -> None:
        """Run cmd, its output into the log, bounded by timeout (its whole process group is killed at
        the bound); a non-zero exit or the timeout raises BuildStepError for `step`, naming the command
        as `what` (default: cmd itself)."""
        what = f"`{(what or ' '.join(cmd))[:300]}`{where}"
        self.write(f"==== $ {' '.join(cmd)}")
        self._f.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as e:
            _kill_group(proc)
            if isinstance(e, subprocess.TimeoutExpired):
                raise self.fail(step, f"{what} did not finish within {timeout:.0f} s (killed)") from None
            raise
        self.write(f"==== exit {rc} after {time.monotonic() - t0:.1f} s")
        if rc != 0:
            raise self.fail(step, f"{what} exited {rc}")


def _kill_group(proc: subprocess.Popen) -> None:
    """The process we started and its children (its own session), by its id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


class Lock:
    """An exclusive flock() on `path`, waiting up to `timeout` s (saying who holds it) before giving up."""

    def __init__(self, path: Path, what: str, say: Callable[[str], None] = print, timeout: float = 4 * 3600) -> None:
        self.path, self.what, self.say, self.timeout = path, what, say, timeout
        self._fd: int | None = None

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    self.say(f"kvm-build: {self.what} is busy (pid {holder}, lock {self.path}); waiting")
                    told = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise HarnessError(f"{self.what}: still locked by another build after {self.timeout:.0f} s "
                                       f"({self.path})") from None
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (deepest first), from /proc/self/mounts."""
    root = os.path.realpath(path)
    out = []
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        mp = parts[1].encode().decode("unicode_escape")  # \040 for a space
        if mp == root or mp.startswith(root + "/"):
            out.append(mp)
    return sorted(out, key=len, reverse=True)


def unmount_under(path: Path, log: StepLog | None = None) -> list[str]:
    """Unmount what is mounted under path (left by a debootstrap we started and killed); returns what
    is still mounted afterwards."""
    for mp in mounts_under(path):
        r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True, timeout=60)
        if log:
            log.write(f"==== umount -l {mp}: exit {r.returncode} {r.stderr.strip()}")
    return mounts_under(path)


def safe_rmtree(path: Path, log: StepLog | None = None) -> None:
    """rmtree, but never through a mount point (a /proc or /dev left mounted inside a chroot)."""
    if not path.exists() and not path.is_symlink():
        return
    left = unmount_under(path, log)
    if left:
        raise HarnessError(f"refusing to remove {path}: still mounted under it: {', '.join(left)}")
    shutil.rmtree(path)


class Chroot:
    """A minbase Debian chroot at `root` (made by debootstrap), run as plain chroot(8)."""

    def __init__(self, root: Path, suite: str) -> None:
        self.root, self.suite = root, suite
        self.ready = root.with_name(root.name + ".ready")  # outside the tree: debootstrap finished
        self.lock_path = root.with_name(root.name + ".lock")

    def create(self, mirror: str, log: StepLog, timeout: float = 1800) -> bool:
        """debootstrap unless done before; False when it already existed. A half-made tree (no
        .ready: interrupted) is removed and made again: debootstrap does not resume."""
        if self.ready.exists() and (self.root / "usr/bin/apt-get").exists():
            self.devices()
            return False
        if not shutil.which("debootstrap"):
            raise log.fail("chroot", "no debootstrap on this machine (apt-get install -y --no-install-recommends "
                                     "debootstrap)")
        safe_rmtree(self.root, log)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        try:
            log.run("chroot", ["debootstrap", "--variant=minbase", self.suite, str(self.root), mirror],
                    timeout=timeout)
        finally:
            left = unmount_under(self.root, log)  # debootstrap unmounts on exit, unless it was killed
            if left:
                log.write(f"==== still mounted under {self.root}: {left}")
        self.devices()
        self.ready.write_text(f"{self.suite} {mirror} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        return True

    def devices(self) -> None:
        """The device nodes builds need (make and gcc open /dev/null): mknod, not a bind mount."""
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        for name, (major, minor) in DEVICES.items():
            p = dev / name
            if p.is_symlink() or (p.exists() and not stat.S_ISCHR(p.lstat().st_mode)):
                p.unlink()
            if not p.exists():
                os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(major, minor))
                os.chmod(p, 0o666)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, step: str, argv: list[str], log: StepLog, timeout: float, cwd: str = "/",
            env: dict[str, str] | None = None, nice: int = 10) -> None:
        """argv inside the chroot with a clean environment and its own /proc, at lowered CPU priority."""
        clean = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                 **(env or {})}
        if not shutil.which("unshare"):
            raise log.fail(step, "no unshare(1) (util-linux) on this machine: needed to give the chroot a /proc "
                                 "of its own without mounting one on the host")
        (self.root / "proc").mkdir(exist_ok=True)
        cmd = ["nice", "-n", str(nice), "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
               f"--mount-proc={self.root / 'proc'}", "chroot", str(self.root), "/usr/bin/env", "-i",
               *(f"{k}={v}" for k, v in clean.items()), "sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        log.run(step, cmd, timeout=timeout, what=" ".join(argv), where=f" (in the {self.suite} chroot)")

    def output(self, argv: list[str], timeout: float = 60) -> str:
        """A short command's stdout inside the chroot ("" when it fails)."""
        try:
            r = subprocess.run(["chroot", str(self.root), "/usr/bin/env", "-i", f"PATH={CHROOT_PATH}", *argv],
                               capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout if r.returncode == 0 else ""


@contextlib.contextmanager
def timed(times: dict[str, float], step: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        times[step] = times.get(step, 0.0) + time.monotonic() - t0
