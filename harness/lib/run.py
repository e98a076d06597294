"""The run loop on top of Vcpu.run(): run to the guest's next ucall, with guest failures raised as
such, unhandled exits as UnexpectedExitError and an MMIO livelock detected.

Cases call these through GuestVcpu (`vcpu.run_until_ucall()`); the functions take any Vcpu.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from harness.kvm import exits
from harness.kvm.checks import check_seconds
from harness.kvm.exits import Exit, Io, Mmio
from harness.kvm.vcpu import Vcpu
from harness.lib.failures import Livelock, UnexpectedExitError
from harness.lib.ucall import DONE, PRINTF, UCALL_PORT, Ucall, read_ucall

DEFAULT_UCALL_TIMEOUT = 10.0
# run_until_ucall reports a livelock after this many consecutive identical MMIO exits (same GPA,
# length, direction and written data) at the same RIP without a ucall: a fraction of a second of
# exits, far more than any case's device polling needs. livelock_exits=None allows endless polling.
DEFAULT_LIVELOCK_EXITS = 10_000

ExitHandler = Callable[[Vcpu, Exit], bool | None]


def run_until_ucall(
    vcpu: Vcpu, timeout: float | None = None, *, on_exit: ExitHandler | None = None,
    stop_on_printf: bool = False, livelock_exits: int | None = DEFAULT_LIVELOCK_EXITS,
    console: list[str] | None = None,
) -> Ucall:
    """Run until the guest makes a ucall and return it (SYNC, DONE, or PRINTF if asked).

    A failed GUEST_ASSERT or an unhandled guest exception raises with the guest's own report.
    Other exits go to on_exit (return True when handled); unhandled ones raise
    UnexpectedExitError. Bounded by `timeout` (default DEFAULT_UCALL_TIMEOUT).
    `livelock_exits` identical handled MMIO exits in a row at the same RIP, with no ucall in
    between, raise Livelock (RIP, GPA, exit count); None disables the check.
    GUEST_PRINTF text is appended to `console`.
    """
    t = DEFAULT_UCALL_TIMEOUT if timeout is None else check_seconds("Vcpu.run_until_ucall", "timeout", timeout)
    # Livelock state, touched only on handled MMIO exits (Vcpu.run() stays as cheap as it was).
    last_key: tuple[int, int, bool, bytes | None] | None = None
    streak = 0
    rip0 = -1
    with vcpu.deadline(t, f"vcpu {vcpu.id}: no ucall within {t:g} s"):
        while True:
            ex = vcpu.run()  # looked up each time: a close() from another thread must raise ClosedError
            if type(ex) is Io and ex.port == UCALL_PORT:
                uc = read_ucall(vcpu, ex)
                if uc.cmd == PRINTF:
                    if console is not None:
                        console.append(uc.text)
                    last_key, streak = None, 0  # a ucall is progress
                    if not stop_on_printf:
                        continue
                uc.check(vcpu)
                return uc
            if ex is exits._INTR:
                continue
            if on_exit is not None and on_exit(vcpu, ex):
                if livelock_exits and type(ex) is Mmio:
                    key = (ex.phys_addr, ex.len, ex.is_write, ex.data if ex.is_write else None)
                    if key != last_key:
                        last_key, streak = key, 1
                    else:
                        streak += 1
                        if streak == 2:
                            rip0 = vcpu.get_regs().rip  # one KVM_GET_REGS per run of repeats
                        elif streak >= livelock_exits:  # (so the first check is at >= 3)
                            rip0, streak = _check_livelock(vcpu, ex, rip0, streak)
                continue
            raise UnexpectedExitError(vcpu, ex)


def _check_livelock(vcpu: Vcpu, ex: Mmio, rip0: int, count: int) -> tuple[int, int]:
    """count identical MMIO exits since rip0 was sampled: raise if the RIP is still rip0,
    else start counting again from the new RIP."""
    rip = vcpu.get_regs().rip
    if rip == rip0:
        raise Livelock(
            vcpu, rip, count,
            f"the same MMIO {'write' if ex.is_write else 'read'} of {ex.len} bytes at gpa "
            f"{ex.phys_addr:#x} each time, handled by on_exit, and the guest never moved on",
            gpa=ex.phys_addr, last_exit=ex)
    return rip, 2


def run_until_done(vcpu: Vcpu, timeout: float | None = None, **kw: Any) -> list[Ucall]:
    """Run to GUEST_DONE, returning the SYNC ucalls met on the way (kw: as run_until_ucall's)."""
    syncs = []
    t = DEFAULT_UCALL_TIMEOUT if timeout is None else check_seconds("Vcpu.run_until_done", "timeout", timeout)
    end = time.monotonic() + t
    while True:
        uc = run_until_ucall(vcpu, max(0.001, end - time.monotonic()), **kw)
        if uc.cmd == DONE:
            return syncs
        syncs.append(uc)
