"""A separate process that looks at stuck threads of another process through ptrace.

A process cannot ptrace its own threads, so the watchdog (a thread of the stuck process) runs
``python -m harness.health.ptrace_helper PID TID [TID...]``. For each thread it uses PTRACE_SEIZE +
PTRACE_INTERRUPT (not PTRACE_ATTACH: its SIGSTOP would group-stop every thread of the process and
leave them stopped after the detach), waits for the stop, reads the registers with python-ptrace,
reads /proc/<tid>/syscall, symbolizes rip and the return-address-looking words near rsp against
/proc/<pid>/maps, and detaches. A thread inside KVM_RUN leaves the ioctl with EINTR when interrupted;
the harness run loop treats that like any other signal.

Output: plain text, one block per thread, on stdout. Exit status 0 even when a thread could not be
examined (the reason is in the text): this is a diagnostic, not a check.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for threads too
STOP_WAIT_S = 1.0
STACK_WORDS = 64  # how far above rsp to look for return addresses

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 16: "ioctl", 23: "select", 35: "nanosleep", 61: "wait4",
                 202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 270: "pselect6", 271: "ppoll",
                 281: "epoll_pwait"}
KVM_IOCTLS = {0xAE80: "KVM_RUN"}


def _ptrace(req: int, tid: int, data: int = 0) -> None:
    if _libc.ptrace(req, tid, None, ctypes.c_void_p(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def load_maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of the mappings of pid."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def symbolize(addr: int, maps: list[tuple[int, int, str, str]]) -> str | None:
    """'libc.so.6+0xf5d6b' for an address in an executable file mapping, else None."""
    for lo, hi, perms, path in maps:
        if lo <= addr < hi and "x" in perms:
            name = os.path.basename(path) if path else "[anon]"
            # Offset relative to the lowest mapping of the same file, as addr2line wants it.
            base = min((m[0] for m in maps if m[3] == path), default=lo) if path else lo
            return f"{name}+{addr - base:#x}"
    return None


def describe_syscall(text: str, pid: int) -> str:
    """/proc/<tid>/syscall ("16 0x5 0xae80 ...") in words, with the fd's target."""
    parts = text.split()
    if not parts or not parts[0].lstrip("-").isdigit():
        return text  # "running" or "-1 sp pc" (not in a syscall)
    nr = int(parts[0])
    if nr < 0:
        return "not in a syscall"
    args = [int(a, 16) for a in parts[1:7]]
    name = SYSCALL_NAMES.get(nr, f"syscall {nr}")
    s = f"{name}({', '.join(hex(a) for a in args[:3])}, ...)"
    if name in ("ioctl", "read", "write", "poll") and args:
        try:
            s += f" fd {args[0]} -> {os.readlink(f'/proc/{pid}/fd/{args[0]}')}"
        except OSError:
            pass
        if name == "ioctl" and len(args) > 1 and args[1] in KVM_IOCTLS:
            s += f" [{KVM_IOCTLS[args[1]]}]"
    return s


def examine(pid: int, tid: int) -> str:
    from ptrace.binding import func as ptrace_func  # python-ptrace: registers and memory words

    lines = [f"thread {tid} (ptrace helper pid {os.getpid()}):"]
    try:
        _ptrace(PTRACE_SEIZE, tid)
    except OSError as e:
        return f"thread {tid}: PTRACE_SEIZE failed: {e.strerror} (needs CAP_SYS_PTRACE or ptrace_scope 0)"
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        end = time.monotonic() + STOP_WAIT_S
        while True:
            wpid, status = os.waitpid(tid, WALL | os.WNOHANG)
            if wpid == tid and os.WIFSTOPPED(status):
                break
            if wpid == tid:
                return f"thread {tid}: exited while being examined (status {status:#x})"
            if time.monotonic() > end:
                return f"thread {tid}: did not stop within {STOP_WAIT_S:g} s of PTRACE_INTERRUPT"
            time.sleep(0.005)
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                lines.append(f"  syscall: {describe_syscall(f.read().strip(), pid)}")
        except OSError as e:
            lines.append(f"  syscall: unreadable ({e.strerror})")
        regs = ptrace_func.ptrace_getregs(tid)
        maps = load_maps(pid)
        rip_sym = symbolize(regs.rip, maps) or "?"
        rax = regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
        lines.append(f"  rip={regs.rip:#x} ({rip_sym}) rsp={regs.rsp:#x} rbp={regs.rbp:#x} "
                     f"orig_rax={regs.orig_rax} rax={rax}")
        lines.append(f"  rdi={regs.rdi:#x} rsi={regs.rsi:#x} rdx={regs.rdx:#x}")
        # No unwinder for an interpreter built without frame pointers: list the stack words that
        # point into executable file mappings (likely return addresses), innermost first.
        found = []
        for i in range(STACK_WORDS):
            try:
                word = ptrace_func.ptrace_peekdata(tid, regs.rsp + 8 * i)
            except Exception:
                break
            word &= (1 << 64) - 1
            sym = symbolize(word, maps)
            if sym and not sym.startswith("[anon]"):
                found.append(f"[rsp+{8 * i:#x}] {sym}")
        lines.append("  stack scan: " + (", ".join(found[:12]) if found else "(no code addresses)"))
    except Exception as e:
        lines.append(f"  failed: {e!r}")
    finally:
        try:
            _ptrace(PTRACE_DETACH, tid)
        except OSError as e:
            lines.append(f"  PTRACE_DETACH failed: {e.strerror}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m harness.health.ptrace_helper PID TID [TID...]", file=sys.stderr)
        return 2
    pid = int(argv[0])
    for tid in argv[1:]:
        print(examine(pid, int(tid)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
