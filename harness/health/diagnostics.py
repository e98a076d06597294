"""Hang diagnostics: what a stuck process was doing, collected when the watchdog fires.

`collect_hang(vcpu, reason)` is a watchdog collector (harness.kvm.watchdog.Watchdog.collectors): it runs
on the watchdog thread *before* the kick, while the vCPU thread is still inside KVM_RUN, and returns
text that becomes part of the VcpuTimeout failure (which adds the registers read after the kick).

Sources, cheapest and most reliable first:
* /proc/self/task/<tid>/{stat,wchan,syscall,stack} for every thread: state, where it sleeps in the
  kernel, the syscall it is in, and its kernel stack. A thread running guest code is on a CPU, and
  the kernel shows no stack for a running task, so for those
* the ptrace helper (harness.health.ptrace_helper), a separate process (a process cannot ptrace its
  own threads), interrupts the thread and reports its user-space registers and syscall;
* the Python stack of the stuck thread (sys._current_frames), i.e. which line of the case called run();
* KVM binary stats of the VM and the vCPU: their values since creation and their change over a
  short sampling interval (is the vCPU still exiting, halting, faulting?).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.kvm.vcpu import Vcpu
    from harness.kvm.vm import Vm

_RUNNER_FRAME = re.compile(r"/(_pytest|pluggy|pytest|xdist|execnet)/|^<frozen runpy>$")
STATS_SAMPLE_S = 0.1
HELPER_TIMEOUT_S = 5.0
MAX_STATS_LINES = 40

# Set by tests to check the helper path: "auto" (only threads whose kernel stack says nothing),
# "always", "never".
PTRACE_MODE = os.environ.get("KVM_HARNESS_PTRACE", "auto")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def native_tid(ident: int) -> int | None:
    """The kernel tid of the Python thread with this threading ident (what Vcpu.run_thread holds)."""
    for t in threading.enumerate():
        if t.ident == ident:
            return t.native_id
    return None


def thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def thread_state(tid: int, pid: int | None = None) -> dict[str, str]:
    """state, comm, wchan, syscall and kernel stack of one thread, as far as /proc shows them."""
    base = f"/proc/{pid or os.getpid()}/task/{tid}"
    out: dict[str, str] = {}
    stat = _read(f"{base}/stat")
    if stat:
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out["comm"] = comm
        out["state"] = fields[0]
        out["utime"], out["stime"] = fields[11], fields[12]
    out["wchan"] = _read(f"{base}/wchan") or "?"
    out["syscall"] = _read(f"{base}/syscall") or "?"
    stack = _read(f"{base}/stack")
    out["stack"] = stack if stack is not None else "(unreadable: needs root)"
    return out


def kernel_stack_useful(state: dict[str, str]) -> bool:
    s = state.get("stack", "")
    return bool(s) and not s.startswith("(unreadable")


def threads_report(stuck_tid: int | None) -> tuple[str, list[int]]:
    """Text for every thread of this process; returns the tids whose kernel stack says nothing."""
    from harness.health.ptrace_helper import describe_syscall

    names = thread_names()
    lines = []
    blind = []
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError as e:
        return f"threads: /proc/self/task unreadable ({e.strerror})", []
    me = threading.get_native_id()
    for tid in tids:
        st = thread_state(tid)
        tag = " <- stuck vCPU thread" if tid == stuck_tid else (" (watchdog, this report)" if tid == me else "")
        lines.append(f"thread {tid} {names.get(tid, st.get('comm', '?'))!r}{tag}: state {st.get('state', '?')}, "
                     f"wchan {st['wchan']}, utime {st.get('utime', '?')} stime {st.get('stime', '?')} ticks")
        if "vhost_task_fn" in st["stack"]:
            # A kernel worker in our thread group (KVM's NX-huge-page recovery): no user space.
            lines.append("  kernel worker thread (vhost task), idle" if st.get("state") == "S" else "")
            lines = [ln for ln in lines if ln]
            continue
        lines.append(f"  syscall: {describe_syscall(st['syscall'], os.getpid())}")
        if kernel_stack_useful(st):
            lines.extend("  " + ln for ln in st["stack"].splitlines())
        else:
            lines.append(f"  kernel stack: {st['stack'] or '(empty: the thread is running on a CPU)'}")
            if tid != me:
                blind.append(tid)
    return "\n".join(lines), blind


def ptrace_report(tids: list[int], timeout: float = HELPER_TIMEOUT_S) -> str:
    """Run the ptrace helper on these threads of this process (a child process does the tracing)."""
    if not tids:
        return ""
    cmd = [sys.executable, "-m", "harness.health.ptrace_helper", str(os.getpid()), *map(str, tids)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"ptrace helper: no answer within {timeout:g} s"
    except OSError as e:
        return f"ptrace helper: cannot start: {e}"
    took = time.monotonic() - t0
    text = p.stdout.strip() or "(no output)"
    if p.returncode or p.stderr.strip():
        text += f"\n(exit {p.returncode}) {p.stderr.strip()[-500:]}"
    return f"user-space state via ptrace (helper took {took:.2f} s):\n{text}"


def python_stack(ident: int | None) -> str:
    if ident is None:
        return ""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return ""
    # The test runner's own frames (pytest, pluggy, runpy) say nothing about the case: drop them.
    frames = [f for f in traceback.extract_stack(frame) if not _RUNNER_FRAME.search(f.filename)]
    return ("Python stack of the vCPU thread (innermost last):\n"
            + "".join(traceback.format_list(frames)).rstrip())


def prepare_vcpu(vcpu: Vcpu) -> None:
    """Watchdog register hook: open the vCPU's stats fd now. KVM_GET_STATS_FD is a vCPU ioctl and
    takes the vcpu mutex, which KVM_RUN holds: issued by the collector during a hang it would wait
    forever (and the watchdog with it). Reading an open stats fd takes no lock."""
    vcpu.stats()


def _scalar(v: int | tuple[int, ...]) -> bool:
    return isinstance(v, int)


def stats_report(vm: Vm | None, vcpu: Vcpu, sample: float = STATS_SAMPLE_S) -> str:
    """Non-zero KVM binary stats since creation and their change over `sample` seconds."""
    sources = []
    # Never vcpu.stats() here (see prepare_vcpu): only a stats fd that is already open.
    for label, st in (("vm", vm.stats() if vm is not None and not getattr(vm, "closed", False) else None),
                      (f"vcpu {vcpu.id}", vcpu._stats)):
        if st is None or st.fd < 0:
            continue
        try:
            sources.append((label, st, st.read()))
        except OSError as e:
            return f"KVM binary stats: unreadable ({e})"
    if not sources:
        return "KVM binary stats: no stats fd open for this vCPU"
    time.sleep(sample)
    lines = []
    for label, st, before in sources:
        try:
            after = st.read()
        except OSError as e:
            lines.append(f"{label}: stats read failed ({e})")
            continue
        nonzero = {k: v for k, v in after.items() if _scalar(v) and v}
        moving = {k: after[k] - before[k] for k in after
                  if _scalar(after[k]) and _scalar(before[k]) and after[k] != before[k]}
        if not nonzero:
            lines.append(f"{label}: all {len(after)} stats are zero (this KVM does not count them)")
            continue
        shown = sorted(nonzero.items())[:MAX_STATS_LINES]
        lines.append(f"{label} since creation: " + ", ".join(f"{k}={v}" for k, v in shown))
        lines.append(f"{label} change over {sample:g} s: "
                     + (", ".join(f"{k}{d:+d}" for k, d in sorted(moving.items())) or "none (no exits, no faults)"))
    return "KVM binary stats:\n" + "\n".join("  " + ln for ln in lines)


def collect_hang(vcpu: Vcpu, reason: str) -> str:
    """The watchdog collector: every section the report can get, each one failing on its own."""
    ident = vcpu.run_thread or None
    tid = native_tid(ident) if ident else None
    sections = [f"hang diagnostics (pid {os.getpid()}, vcpu {vcpu.id} thread {tid or 'not in KVM_RUN'}):"]

    timings = []

    def guarded(name: str, fn: object) -> None:
        t0 = time.monotonic()
        try:
            text = fn()  # type: ignore[operator]
        except Exception as e:  # a diagnostic must never hide the timeout
            text = f"{name}: failed ({e!r})"
        timings.append(f"{name} {time.monotonic() - t0:.2f} s")
        if text:
            sections.append(text)

    blind: list[int] = []

    def threads() -> str:
        text, b = threads_report(tid)
        blind.extend(b)
        return text

    guarded("threads", threads)
    if PTRACE_MODE != "never" and tid is not None:
        # Only the stuck thread: the others' kernel stacks already say where they wait.
        want = [tid] if PTRACE_MODE == "always" or tid in blind else []
        guarded("ptrace", lambda: ptrace_report(want))
    guarded("python stack", lambda: python_stack(ident))
    guarded("stats", lambda: stats_report(getattr(vcpu, "vm", None), vcpu))
    sections.append(f"(collected in: {', '.join(timings)})")
    return "\n".join(sections)
