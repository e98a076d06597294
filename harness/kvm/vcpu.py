"""A vCPU: its fd, the shared kvm_run page, registers, and run() bounded by the watchdog.

The ucall loop on top of run() (run_until_ucall, livelock detection) is harness.lib.run's.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from harness.kvm import exits
from harness.kvm._cffi import ffi, lib
from harness.kvm.caps import KVM_COALESCED_MMIO_PAGE_OFFSET
from harness.kvm.checks import check_seconds, check_uint, closed_class
from harness.kvm.cpuid import Cpuid
from harness.kvm.errors import BadInput, ClosedError, HarnessError, KvmError, VcpuTimeout
from harness.kvm.exits import CoalescedMmio, Exit
from harness.kvm.ioctl import kvm_ioctl
from harness.kvm.stats import Stats
from harness.kvm.watchdog import WATCHDOG, kick_thread

_get_ident = threading.get_ident
_kh_run_fast = lib.kh_run_fast
_decode = exits.decode
_Io = exits.Io
# struct kvm_run up to the io member: exit_reason at 8; io.{direction, size, port, count,
# data_offset} at 32 (offsets pinned against ffi.offsetof in tests/test_binding.py)
KVM_RUN_IO_HEAD = struct.Struct("<8xI20xBBHIQ")
_IO_HEAD = KVM_RUN_IO_HEAD.unpack_from
_EINTR = -errno.EINTR
_EFAULT = -errno.EFAULT
_EHWPOISON = -133  # EHWPOISON (Linux; Python's errno module lacks it)
_MEMORY_FAULT = exits.ExitReason.MEMORY_FAULT


class OwningVm(Protocol):
    """What a vCPU uses of the VM that made it (harness.kvm.vm.Vm, which imports this module)."""

    fd: int
    closed: bool
    kvm: Any  # the Kvm: vcpu_mmap_size

    def read(self, gpa: int, size: int) -> bytes: ...

    def _closed_what(self) -> str: ...


class Vcpu:
    # After close() (its own or its VM's) the object is switched to closed_class(type(self)): every
    # public method raises ClosedError, with no check in run(), and fd is -1. It holds its VM weakly
    # (`vm`), so a dropped VM is freed by reference counting alone and closes its vCPUs.
    _USABLE_WHEN_CLOSED = ("in_run", "vm")  # state the watchdog and the race engine read

    def __init__(self, vm: OwningVm, vcpu_id: int) -> None:
        self.closed = True  # until fd and mapping exist: a half-made vCPU has nothing to close
        if vm.closed:
            raise ClosedError(vm._closed_what(), f"Vcpu(vm, {vcpu_id})")
        vcpu_id = check_uint("KVM_CREATE_VCPU", "vcpu_id", vcpu_id, 32)
        self._vm = weakref.ref(vm)
        self._vm_fd = vm.fd
        self.id = vcpu_id
        size = vm.kvm.vcpu_mmap_size
        fd = kvm_ioctl(vm.fd, "KVM_CREATE_VCPU", vcpu_id, lambda: f"id={vcpu_id}")
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except Exception:
            os.close(fd)
            raise
        self.fd = fd
        self._run_buf = ffi.from_buffer(self._mm)
        self.kvm_run: Any = ffi.cast("struct kvm_run *", self._run_buf)
        self._run = self.kvm_run
        self._buf = ffi.buffer(self._run_buf)
        # the fast path's state (kh_run_fast): every run() goes through it; with nothing to absorb
        # it returns after one KVM_RUN, as a plain ioctl would
        self._fast: Any = ffi.new("struct kh_vcpu_fast *")
        self._fast.fd = fd
        self._fast.run = self._run
        # the watchdog's interface (harness.kvm.watchdog.Bounded), read from its own thread
        self.run_thread = 0
        self.expired: str | None = None
        self.deadline_at: float | None = None
        self.deadline_reason = ""
        self.exit_count = 0
        self._stats: Stats | None = None
        self.closed = False
        WATCHDOG.register(self)

    @property
    def vm(self) -> OwningVm:
        """The VM (held weakly: the VM holds its vCPUs, and a cycle would need the collector)."""
        vm = self._vm()
        if vm is None:
            raise ClosedError(self._closed_what(), "vm", "its VM was dropped without close(), which closed "
                              "its vCPUs: keep a reference to the Vm while its vCPUs are in use")
        return vm

    # ---- running -------------------------------------------------------------------------------
    @property
    def in_run(self) -> bool:
        """A thread is inside (or entering) this vCPU's KVM_RUN now; races measure overlap with it."""
        return self.run_thread != 0

    def run(self) -> Exit:
        """One KVM_RUN; returns the decoded exit (Intr after a signal). Bounded by the watchdog.

        KVM_EXIT_MEMORY_FAULT, the one exit that comes with an error (-1, errno EFAULT or
        EHWPOISON), is returned as a MemoryFault like any other exit; every other error raises
        KvmError."""
        if self.expired is not None:
            raise self._timeout()
        self.run_thread = _get_ident()
        rc = _kh_run_fast(self._fast)
        self.run_thread = 0
        self.exit_count += 1
        if rc:
            if rc == _EINTR:
                if self.expired is not None:
                    raise self._timeout()
                return exits._INTR
            if rc in (_EFAULT, _EHWPOISON) and self._run.exit_reason == _MEMORY_FAULT:
                f = self._run.memory_fault
                return exits.MemoryFault(f.flags, f.gpa, f.size, -rc)
            raise KvmError(-rc, "KVM_RUN", f"vcpu={self.id}")
        # PIO (ucalls, the benchmark loop) is the hot exit: one struct unpack of the mapping costs
        # less than five cffi field reads through the union
        reason, direction, size, port, count, off = _IO_HEAD(self._mm)
        if reason == 2:
            n = size * count
            return _Io(direction, size, port, count, self._mm[off : off + n])
        return _decode(self._run, self._buf)

    def _timeout(self) -> VcpuTimeout:
        return VcpuTimeout(self.id, self.expired or "", self.dump_state())

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now (or refuse to enter it) with EINTR."""
        self._run.immediate_exit = 1
        kick_thread(self.run_thread)

    # ---- the fast path: exits absorbed in C -------------------------------------------------------
    def absorb_out(self, *ports: int) -> None:
        """OUT to these ports no longer leaves run(): KVM_RUN is re-entered in C and the exit counted
        (`absorbed_exits()`: "pio_out", and "last_out" the last value). Replaces the set (up to 8);
        no ports: off. (GuestVcpu refuses the ucall port: a ucall must reach Python.)"""
        if len(ports) > len(self._fast.sink_ports):
            raise BadInput("Vcpu.absorb_out", "ports", ports, f"has more than {len(self._fast.sink_ports)} ports")
        for i, p in enumerate(ports):
            self._fast.sink_ports[i] = check_uint("Vcpu.absorb_out", "port", p, 16)
        self._fast.nsink = len(ports)

    def absorb_mmio(self, lo: int, hi: int, read_value: int = 0) -> None:
        """MMIO exits at GPAs in [lo, hi) complete in C: writes are counted, reads return
        `read_value` (little-endian, cut to the access's length) and are counted. lo == hi: off."""
        lo = check_uint("Vcpu.absorb_mmio", "lo", lo, 64)
        hi = check_uint("Vcpu.absorb_mmio", "hi", hi, 64)
        if hi < lo:
            raise BadInput("Vcpu.absorb_mmio", "hi", hi, f"is below lo={lo:#x}")
        self._fast.mmio_read_value = check_uint("Vcpu.absorb_mmio", "read_value", read_value, 64)
        self._fast.mmio_lo, self._fast.mmio_hi = lo, hi

    def absorbed_exits(self) -> dict[str, int]:
        """What the fast path absorbed since run_absorbing() last reset it, and KVM_RUN returns in all."""
        f = self._fast
        return {"absorbed": f.absorbed, "pio_out": f.pio_out, "last_out": f.last_out,
                "mmio_reads": f.mmio_reads, "mmio_writes": f.mmio_writes, "kvm_run_returns": f.exits}

    def run_absorbing(self, budget: int) -> Exit:
        """run(), returning after `budget` absorbed exits at the latest (that last one is returned,
        an Io or Mmio exit: the caller sees it as the C loop did); the counters restart at 0."""
        f = self._fast
        f.budget = check_uint("Vcpu.run_absorbing", "budget", budget, 64)
        f.absorbed = f.pio_out = f.mmio_reads = f.mmio_writes = 0
        try:
            return self.run()
        finally:
            f.budget = 0

    @property
    def in_run_flag(self) -> Any:
        """`int32_t *`, 1 exactly while this vCPU's thread is inside KVM_RUN (for C loops that
        measure overlap without the GIL); valid while the vCPU is open."""
        return ffi.addressof(self._fast, "in_run")

    def reset_watchdog(self) -> None:
        """Clear an expiry so the vCPU can run again (after a deliberate timeout)."""
        self.expired = None
        self._run.immediate_exit = 0

    def complete_io(self, data: bytes | int) -> None:
        """Supply the data a port-IN exit returns to the guest."""
        io = self._run.io
        n = io.size * io.count
        if isinstance(data, int):
            if not 0 <= data < 1 << (8 * n):
                raise BadInput("Vcpu.complete_io", "data", data, f"does not fit the exit's {n} byte(s)")
            data = data.to_bytes(n, "little")
        off = io.data_offset
        self._buf[off : off + n] = data[:n].ljust(n, b"\0")

    def complete_mmio(self, data: bytes | int) -> None:
        """Supply the data an MMIO read exit returns to the guest."""
        m = self._run.mmio
        n = m.len
        if isinstance(data, int):
            data = (data & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        ffi.memmove(m.data, data[:n].ljust(n, b"\0"), n)

    def deadline(self, seconds: float, reason: str) -> _Deadline:
        """`with vcpu.deadline(5, "why"):` bounds every run() inside the block."""
        return _Deadline(self, check_seconds("Vcpu.deadline", "seconds", seconds), reason)

    def coalesced_mmio(self) -> list[CoalescedMmio]:
        """Drain the coalesced MMIO ring: the writes KVM recorded in registered coalesced zones
        without exiting, oldest first (KVM_REGISTER_COALESCED_MMIO; api.rst "coalesced_mmio")."""
        off = KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if len(self._mm) < off + mmap.PAGESIZE:
            raise HarnessError(f"vcpu {self.id}: the vCPU mapping ({len(self._mm):#x} bytes) has no coalesced "
                               f"MMIO ring page at {off:#x}")
        ring = ffi.cast("struct kvm_coalesced_mmio_ring *", ffi.cast("char *", self._run_buf) + off)
        cap = (mmap.PAGESIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof(
            "struct kvm_coalesced_mmio")
        out = []
        first, last = ring.first, ring.last
        while first != last:
            e = ring.coalesced_mmio[first]
            out.append(CoalescedMmio(e.phys_addr, e.len, bytes(ffi.buffer(e.data)), e.pad))
            first = (first + 1) % cap
        ring.first = first  # hand the slots back to KVM
        return out

    # ---- state ---------------------------------------------------------------------------------
    def get_regs(self) -> Any:
        r = ffi.new("struct kvm_regs *")
        kvm_ioctl(self.fd, "KVM_GET_REGS", r, self._desc)
        return r

    def set_regs(self, r: Any) -> None:
        kvm_ioctl(self.fd, "KVM_SET_REGS", r, self._desc)

    def get_sregs(self) -> Any:
        s = ffi.new("struct kvm_sregs *")
        kvm_ioctl(self.fd, "KVM_GET_SREGS", s, self._desc)
        return s

    def set_sregs(self, s: Any) -> None:
        kvm_ioctl(self.fd, "KVM_SET_SREGS", s, self._desc)

    def get_fpu(self) -> Any:
        f = ffi.new("struct kvm_fpu *")
        kvm_ioctl(self.fd, "KVM_GET_FPU", f, self._desc)
        return f

    def get_events(self) -> Any:
        e = ffi.new("struct kvm_vcpu_events *")
        kvm_ioctl(self.fd, "KVM_GET_VCPU_EVENTS", e, self._desc)
        return e

    def set_cpuid(self, cpuid: Cpuid) -> None:
        c, _keep = cpuid.to_cdata()
        kvm_ioctl(self.fd, "KVM_SET_CPUID2", c, lambda: f"vcpu={self.id}, nent={len(cpuid.entries)}")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = [check_uint("KVM_GET_MSRS", "index", i, 32) for i in indices]
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(idx) * ffi.sizeof("struct kvm_msr_entry"))
        m = ffi.cast("struct kvm_msrs *", raw)
        m.nmsrs = len(idx)
        for i, x in enumerate(idx):
            m.entries[i].index = x
        n = kvm_ioctl(self.fd, "KVM_GET_MSRS", m, lambda: f"vcpu={self.id}, msrs={[hex(i) for i in idx]}")
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        items = [(check_uint("KVM_SET_MSRS", "index", k, 32), check_uint("KVM_SET_MSRS", f"msr {k:#x} value", v, 64))
                 for k, v in values.items()]
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(items) * ffi.sizeof("struct kvm_msr_entry"))
        m = ffi.cast("struct kvm_msrs *", raw)
        m.nmsrs = len(items)
        for i, (k, v) in enumerate(items):
            m.entries[i].index = k
            m.entries[i].data = v
        n = kvm_ioctl(self.fd, "KVM_SET_MSRS", m,
                      lambda: f"vcpu={self.id}, msrs={ {hex(k): hex(v) for k, v in items} }")
        if n != len(items):
            bad = items[n][0]
            detail = f"vcpu={self.id}, msr {bad:#x} refused ({n} of {len(items)} set)"
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", detail)
        return n

    def get_mp_state(self) -> int:
        s = ffi.new("struct kvm_mp_state *")
        kvm_ioctl(self.fd, "KVM_GET_MP_STATE", s, self._desc)
        return s.mp_state

    def translate(self, gva: int) -> tuple[int, bool] | None:
        """KVM_TRANSLATE: (gpa, writeable) or None if the GVA does not map."""
        t = ffi.new("struct kvm_translation *")
        t.linear_address = check_uint("KVM_TRANSLATE", "gva", gva, 64)
        kvm_ioctl(self.fd, "KVM_TRANSLATE", t, lambda: f"vcpu={self.id}, gva={gva:#x}")
        return (t.physical_address, bool(t.writeable)) if t.valid else None

    def kvmclock_ctrl(self) -> None:
        kvm_ioctl(self.fd, "KVM_KVMCLOCK_CTRL", 0, self._desc)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        c = enable_cap_struct("Vcpu.enable_cap", cap, args, flags)
        kvm_ioctl(self.fd, "KVM_ENABLE_CAP", c, lambda: f"vcpu={self.id}, cap={int(cap)}, args={list(args)}")

    def stats(self) -> Stats:
        if self._stats is None:
            self._stats = Stats(kvm_ioctl(self.fd, "KVM_GET_STATS_FD", 0, self._desc))
        return self._stats

    def _desc(self) -> str:
        return f"vcpu={self.id}"

    def dump_state(self) -> str:
        """Registers and segment state, for failure reports."""
        try:
            r = self.get_regs()
            s = self.get_sregs()
        except KvmError as e:
            return f"(registers unavailable: {e})"
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
        lines = [f"rip={r.rip:#018x} rflags={r.rflags:#x}"]
        for i in range(0, 16, 4):
            lines.append(" ".join(f"{n}={getattr(r, n):#x}" for n in names[i : i + 4]))
        lines.append(
            f"cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} "
            f"cs={s.cs.selector:#x}(l={s.cs.l},db={s.cs.db}) ss={s.ss.selector:#x}"
        )
        note = self._rip_note(r.rip)
        if note:
            lines.append(note)
        return "\n".join(lines)

    def _rip_note(self, rip: int) -> str | None:
        """A line on where rip is, for dump_state (harness.lib's GuestVcpu names the payload symbol)."""
        return None

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap kvm_run, close the stats fd and the vCPU fd (idempotent; Vm.close() does it for all
        its vCPUs). The object stays as a closed shell: fd is -1 and every method raises ClosedError."""
        if self.closed:
            return
        self._close("")

    def _close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        fd, self._fd_was, self.fd = self.fd, self.fd, -1
        self._closed_why = why
        self.__class__ = closed_class(type(self))
        stats, mm = self._stats, self._mm
        self._buf = None
        self._fast = None
        self._run = self.kvm_run = None
        self._run_buf = None
        self._mm = None
        try:
            if stats is not None:
                stats.close()
        finally:
            try:
                mm.close()
            except BufferError:
                pass  # a cdata view still exports it: unmapped when that goes; the fd close still drops it
            os.close(fd)

    def _closed_what(self) -> str:
        d = self.__dict__  # also for a half-made vCPU
        return f"Vcpu(id={d.get('id', '?')}, fd={d.get('_fd_was', d.get('fd', '?'))}) of Vm(fd={d.get('_vm_fd', '?')})"

    def __del__(self) -> None:
        # dropped without close() (a vCPU its VM does not list): release the fd and the mapping now
        if self.__dict__.get("closed") is False:
            with contextlib.suppress(Exception):
                self._close("dropped without close()")

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self.__dict__.get("closed") is False else " (closed)"
        return f"<Vcpu {self.id} of vm fd {self.__dict__.get('_vm_fd', '?')}{state}>"


def enable_cap_struct(where: str, cap: int, args: tuple[int, ...], flags: int) -> Any:
    """struct kvm_enable_cap for KVM_ENABLE_CAP (u32 cap and flags, up to four u64 args)."""
    if len(args) > 4:
        raise BadInput(where, "args", args, "has more than the 4 values struct kvm_enable_cap holds")
    c = ffi.new("struct kvm_enable_cap *")
    c.cap = check_uint(where, "cap", cap, 32)
    c.flags = check_uint(where, "flags", flags, 32)
    for i, a in enumerate(args):
        c.args[i] = check_uint(where, f"args[{i}]", a, 64)
    return c


class _Deadline:
    """Vcpu.deadline(): the innermost, earliest bound wins; leaving restores the outer one."""

    def __init__(self, vcpu: Vcpu, seconds: float, reason: str) -> None:
        self.vcpu = vcpu
        self.seconds = seconds
        self.reason = reason

    def __enter__(self) -> _Deadline:
        self._prev = (self.vcpu.deadline_at, self.vcpu.deadline_reason)
        end = time.monotonic() + self.seconds
        if self._prev[0] is None or end < self._prev[0]:
            self.vcpu.deadline_at = end
            self.vcpu.deadline_reason = self.reason
        return self

    def __exit__(self, *exc: object) -> None:
        self.vcpu.deadline_at, self.vcpu.deadline_reason = self._prev

