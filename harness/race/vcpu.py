"""The guest side of a race: one thread per vCPU running race_toucher, answering its exits (ucalls,
MMIO, EFAULT retries, kicks) and counting the way the kernel refused an access."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from harness.kvm.errors import KvmError
from harness.kvm.exits import Intr, Io, MemoryFault, Mmio
from harness.lib.failures import UnexpectedExitError
from harness.lib.ucall import DONE, PRINTF, SYNC, UCALL_PORT, read_ucall
from harness.race import oracles as O
from harness.race import protocol as P

if TYPE_CHECKING:
    from harness.kvm.vcpu import Vcpu
    from harness.race.region import Region
    from harness.race.report import RaceReport

MMIO_POISON = P.MMIO_POISON  # what a read of a GPA with no usable memory returns ("mmio")


class VcpuThread:
    """vCPU `index` running race_toucher on its own thread until DONE, an error or its deadline."""

    def __init__(self, index: int, vcpu: Vcpu, mem: Region, report: RaceReport, *, bound: float,
                 cpu: int | None) -> None:
        self.index = index
        self.vcpu = vcpu
        self.mem = mem
        self.report = report  # stale reads the guest reports go there
        self.bound = bound  # seconds KVM_RUN may go on at all (the watchdog's deadline)
        self.cpu = cpu  # pin the thread here (bench), None: anywhere
        self.native_tid = 0
        self.efault = 0  # KVM_RUN -EFAULT (upstream's answer to a write to PROT_READ / unmapped hva)
        self.memory_faults = 0  # ... of which carried KVM_EXIT_MEMORY_FAULT
        self.stray_faults: list[str] = []  # memory-fault exits not at a page of the region (oracle)
        self.mmio_reads = 0  # kvm_pvm's answer (and a memslot gap's, everywhere)
        self.mmio_writes = 0
        self.intr = 0
        self.done = False
        self.error: BaseException | None = None
        self.counters: dict[str, int] = {}  # the guest's own, read from the control page after the race
        self._diag: str | None = None
        self._diag_event = threading.Event()
        self._diag_requested = False
        self.thread = threading.Thread(target=self._main, name=f"race-vcpu{index}", daemon=True)

    def exits(self) -> str:
        return f"efault {self.efault}, mmio r/w {self.mmio_reads}/{self.mmio_writes}, intr {self.intr}"

    def registers_after_kick(self, timeout: float = 2.0) -> str:
        """Kick the vCPU out of KVM_RUN; its thread dumps the guest state and runs on."""
        self._diag_event.clear()
        self._diag_requested = True
        self.vcpu.kick()
        if self._diag_event.wait(timeout):
            return self._diag or ""
        return f"(the vCPU thread did not come back from KVM_RUN within {timeout:g} s of the kick)"

    def _main(self) -> None:
        v = self.vcpu
        i = self.index
        self.native_tid = threading.get_native_id()
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # 0: this thread
        run = v.run
        bound = self.bound
        # MMIO exits (unusable memory on kvm_pvm, a memslot gap anywhere) are answered in C with the
        # poison word and counted there: folded into mmio_reads/mmio_writes when the thread ends
        v.absorb_mmio(0, (1 << 64) - 1, MMIO_POISON)
        try:
            with v.deadline(bound, f"race vcpu {i}: still running {bound:g} s after the start"):
                while True:
                    try:
                        ex = run()
                    except KvmError as e:
                        if e.errno != errno.EFAULT:
                            raise
                        # upstream: an access the host mapping forbids (PROT_READ, unmapped);
                        # retry: the disruptor restores it
                        self.efault += 1
                        continue
                    t = type(ex)
                    if t is MemoryFault:
                        # the same refusal with the exit filled in (KVM_RUN -EFAULT + MEMORY_FAULT)
                        self.efault += 1
                        self.memory_faults += 1
                        why = O.stray_fault(ex.gpa, ex.size, self.mem.windows())
                        if why:
                            self.stray_faults.append(f"vcpu {self.index}: {ex.describe()}: {why}")
                        continue
                    if t is Io and ex.port == UCALL_PORT:
                        uc = read_ucall(v, ex)
                        if uc.cmd == SYNC and uc.args and uc.args[0] == P.VIOLATION:
                            self._record_violation(uc.args)
                            continue
                        if uc.cmd == DONE:
                            self.done = True
                            return
                        if uc.cmd == PRINTF:
                            continue
                        uc.check(v)
                        raise UnexpectedExitError(v, ex, f"race_toucher sent {uc!r}")
                    if t is Mmio:
                        if ex.is_write:
                            self.mmio_writes += 1
                        else:
                            self.mmio_reads += 1
                            v.complete_mmio(MMIO_POISON)
                        continue
                    if t is Intr:
                        self.intr += 1
                        v.kvm_run.immediate_exit = 0
                        if self._diag_requested:
                            self._diag = v.dump_state()
                            self._diag_requested = False
                            self._diag_event.set()
                        continue
                    raise UnexpectedExitError(v, ex, "race_toucher only exits for ucalls and MMIO")
        except BaseException as e:
            self.error = e
        finally:
            self._fold_absorbed()

    def _fold_absorbed(self) -> None:
        if self.vcpu.closed:
            return
        got = self.vcpu.absorbed_exits()
        self.mmio_reads += got["mmio_reads"]
        self.mmio_writes += got["mmio_writes"]
        self.vcpu.absorb_mmio(0, 0)

    def _record_violation(self, args: tuple[int, ...]) -> None:
        """GUEST_SYNC(VIOLATION, page | loc << 32, seen, gentab[page], gva, ctrl seq)."""
        _, pl, seen, g1, gva, ops = (list(args) + [0] * 6)[:6]
        page, loc = pl & 0xFFFFFFFF, (pl >> 32) & 1
        rep = self.report
        rep.violation_count += 1
        if len(rep.violations) < O.MAX_DETAILS:
            m = self.mem
            gpa = m.gpa_of_loc(loc) + page * m.stride
            hva = m.hva + page * m.stride
            rep.violations.append(P.Violation(self.index, page, seen, g1, ops, gva, gpa, hva, loc))
