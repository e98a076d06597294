"""A VM ready to run a payload from guests/: boot slot, loaded ELF, GDT/TSS, page tables, vCPUs.

This is the "easy things easy" entry point: `vm_with_vcpus("checksum", mode="long64")` (or
`GuestVm(kvm, "checksum", Mode.LONG64)`) gives a VM whose vCPU 0 starts at the payload's `_start` in
the chosen mode (layout: guests/ABI.md). Its vCPUs are GuestVcpus: `vcpu.set_args(arg)`,
`vcpu.run_until_ucall()`.
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Any

from harness.kvm.checks import check_size, check_uint
from harness.kvm.errors import BadInput, HarnessError
from harness.kvm.system import Kvm
from harness.kvm.vcpu import Vcpu
from harness.kvm.vm import Memslot, Vm
from harness.lib import run
from harness.lib.guest import GuestImage, load_image
from harness.lib.ucall import UCALL_PORT, Ucall
from harness.unsupported import Unsupported
from harness.x86.modes import GDT_GPA, Mode, gdt_bytes, setup_sregs, unsupported_reason
from harness.x86.paging import PageTables

BOOT_SLOT = 0
BOOT_SLOT_SIZE = 16 << 20
PT_POOL = (0x10000, 0x100000)
STACK_TOP = 0x200000
STACK_SIZE = 0x8000
MAX_VCPUS = (STACK_TOP - 0x100000) // STACK_SIZE
SCRATCH = (0x800000, 0x1000000)
REAL_MODE_PAYLOAD_PREFIX = "real_"


class ModeUnsupported(Unsupported):
    """This host cannot run the requested guest mode; the message is the reason (cases skip on it)."""


class GuestVcpu(Vcpu):
    """A vCPU of a GuestVm: the guest ABI's argument register and the ucall run loop on top of Vcpu."""

    def __init__(self, vm: GuestVm, vcpu_id: int) -> None:
        self.console: list[str] = []  # GUEST_PRINTF output
        super().__init__(vm, vcpu_id)

    @property
    def vm(self) -> GuestVm:
        return super().vm  # type: ignore[return-value]  # a GuestVm makes its GuestVcpus

    def set_args(self, arg: int) -> None:
        """The argument guest_main(vcpu_id, arg) receives (guests/ABI.md: rsi; a 32-bit guest sees the
        low half). Set before the guest reads it, i.e. before its first run."""
        arg = check_uint("GuestVcpu.set_args", "arg", arg, 64)
        r = self.get_regs()
        r.rsi = arg
        self.set_regs(r)

    def absorb_out(self, *ports: int) -> None:
        """Vcpu.absorb_out, refusing the ucall port (ucalls must reach run_until_ucall)."""
        if UCALL_PORT in ports:
            raise BadInput("GuestVcpu.absorb_out", "ports", ports,
                           f"includes the ucall port {UCALL_PORT:#x}: the guest's ucalls would be lost")
        super().absorb_out(*ports)

    def run_until_ucall(
        self, timeout: float | None = None, *, on_exit: run.ExitHandler | None = None,
        stop_on_printf: bool = False, livelock_exits: int | None = run.DEFAULT_LIVELOCK_EXITS,
    ) -> Ucall:
        """Run until the guest's next ucall (harness.lib.run.run_until_ucall: failures, exits, bound)."""
        return run.run_until_ucall(self, timeout, on_exit=on_exit, stop_on_printf=stop_on_printf,
                                   livelock_exits=livelock_exits, console=self.console)

    def run_until_done(self, timeout: float | None = None, **kw: Any) -> list[Ucall]:
        """Run to GUEST_DONE, returning the SYNC ucalls met on the way."""
        return run.run_until_done(self, timeout, console=self.console, **kw)

    def _rip_note(self, rip: int) -> str | None:
        return f"rip is {self.vm.guest.symbolize(rip)}"


class GuestVm(Vm):
    _vcpu_class = GuestVcpu
    vcpus: list[GuestVcpu]  # type: ignore[assignment]

    def __init__(self, kvm: Kvm, payload: str, mode: Mode | str = Mode.LONG64, *, nr_vcpus: int = 1,
                 arg: int = 0, vm_type: int = 0, identity_map: int = 1 << 30,
                 boot_backing: Any = None) -> None:
        # arguments first: nothing is loaded, created or mapped for a call that cannot work
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise BadInput("GuestVm", "mode", mode, f"is not one of {[m.value for m in Mode]}") from None
        try:
            n = operator.index(nr_vcpus)
        except TypeError:
            raise BadInput("GuestVm", "nr_vcpus", nr_vcpus, "must be an int") from None
        # 0 is allowed: VM-wide set-up first (dirty ring, manual protect), then add_vcpu()
        if not 0 <= n <= MAX_VCPUS:
            raise BadInput("GuestVm", "nr_vcpus", nr_vcpus,
                           f"must be in [0, {MAX_VCPUS}] (at most {MAX_VCPUS} vCPUs fit the boot slot's stack area; "
                           "0: add them with add_vcpu())")
        arg = check_uint("GuestVm", "arg", arg, 64)  # every vCPU's argument (GuestVcpu.set_args)
        identity_map = check_size("GuestVm", "identity_map", identity_map)
        reason = unsupported_reason(self.mode, kvm.supported_cpuid)
        if reason:
            raise ModeUnsupported(reason)
        # Load the image first: a missing build must not leave a half-made VM behind.
        bits = 16 if self.mode is Mode.REAL else self.mode.bits
        self.guest: GuestImage = load_image(payload, bits)
        super().__init__(kvm, vm_type)
        try:
            self.boot: Memslot = self.add_memslot(0, BOOT_SLOT_SIZE, slot=BOOT_SLOT, backing=boot_backing)
            self._load(self.guest)
            self.write(GDT_GPA, gdt_bytes())
            self._pt_next = PT_POOL[0]
            self._scratch_next = SCRATCH[0]
            self.pt: PageTables | None = None
            paging = self.mode.paging
            if paging is not None:
                # weak references: a GuestVm <-> PageTables cycle would keep a dropped VM's fds
                # open until the garbage collector ran
                self.pt = PageTables(weakref.proxy(self), _weak_alloc(self), paging, maxphyaddr=kvm.maxphyaddr)
                big = 1 << 21
                self.pt.map(0, 0, _round_up(identity_map, big), big)
            self.arg = arg
            for _ in range(n):
                self.add_vcpu(arg)
        except BaseException:
            self.close()
            raise

    # ---- set-up --------------------------------------------------------------------------------
    def _load(self, img: GuestImage) -> None:
        for seg in img.segments:
            if not self.boot.contains(seg.paddr, seg.memsz):
                raise HarnessError(f"{img.name}: segment at {seg.paddr:#x}+{seg.memsz:#x} is outside the boot slot")
            self.write(seg.paddr, seg.data + bytes(seg.memsz - len(seg.data)))

    def _alloc_pt_page(self) -> int:
        gpa = self._pt_next
        if gpa >= PT_POOL[1]:
            raise HarnessError("page-table pool of the boot slot is exhausted")
        self._pt_next += 0x1000
        self.write(gpa, bytes(0x1000))
        return gpa

    def add_vcpu(self, arg: int | None = None) -> GuestVcpu:
        """A vCPU that starts at the payload's entry with rdi = its index and rsi = arg (the VM's
        `arg` when None)."""
        if arg is not None:
            arg = check_uint("GuestVm.add_vcpu", "arg", arg, 64)
        if len(self.vcpus) >= MAX_VCPUS:
            raise BadInput("GuestVm.add_vcpu", "vcpu index", len(self.vcpus),
                           f"has no stack: {MAX_VCPUS} vCPUs fill the boot slot's stack area")
        v: GuestVcpu = self.create_vcpu()  # type: ignore[assignment]  # _vcpu_class
        v.set_cpuid(self.kvm.supported_cpuid)  # MAXPHYADDR follows the host only with SET_CPUID2
        s = v.get_sregs()
        setup_sregs(s, self.mode, self.pt.root if self.pt else 0)
        v.set_sregs(s)
        r = v.get_regs()
        r.rip = self.guest.entry
        r.rflags = 0x2
        r.rsp = STACK_TOP - v.id * STACK_SIZE
        r.rdi = v.id
        v.set_regs(r)
        v.set_args(self.arg if arg is None else arg)
        return v

    # ---- what cases use ------------------------------------------------------------------------
    @property
    def vcpu(self) -> GuestVcpu:
        """vCPU 0."""
        return self.vcpus[0]

    def map(self, gva: int, gpa: int, size: int, page_size: int = 4096, **perm: Any) -> None:
        """Map [gva, gva+size) to gpa in the guest's page tables (see PageTables.map)."""
        if self.pt is None:
            raise HarnessError(f"mode {self.mode.value} has no paging to map {gva:#x} with")
        self.pt.map(gva, gpa, size, page_size, **perm)

    def alloc(self, size: int, align: int = 8) -> int:
        """Memory from the boot slot's scratch area (identity-mapped, so GVA == GPA)."""
        size = check_size("GuestVm.alloc", "size", size, zero_ok=True)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise BadInput("GuestVm.alloc", "align", align, "must be a power of two >= 1")
        gpa = _round_up(self._scratch_next, align)
        if gpa + size > SCRATCH[1]:
            raise HarnessError(f"scratch area exhausted ({size:#x} bytes asked)")
        self._scratch_next = gpa + size
        return gpa

    def sym(self, name: str) -> int:
        return self.guest.sym(name)

    def read_sym(self, name: str, size: int | None = None) -> bytes:
        return self.read(self.sym(name), size or self.guest.sizes.get(name) or 8)

    def write_sym(self, name: str, data: bytes) -> None:
        self.write(self.sym(name), data)


def _weak_alloc(vm: GuestVm) -> Any:
    ref = weakref.ref(vm)

    def alloc() -> int:
        v = ref()
        if v is None:
            raise HarnessError("page-table allocation for a GuestVm that no longer exists")
        return v._alloc_pt_page()

    return alloc


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def vm_with_vcpus(payload: str, mode: Mode | str = Mode.LONG64, *, backing: Any = None, nr_vcpus: int = 1,
                  arg: int = 0, kvm: Kvm | None = None) -> GuestVm:
    """A GuestVm running `payload` in `mode` with nr_vcpus vCPUs (the selftests'
    vm_create_with_one_vcpu): `vm.vcpu` is vCPU 0. `backing` is the boot slot's memory (a
    harness.memory backing; anonymous when None). Without `kvm` it opens the KVM device
    ($KVM_HARNESS_DEV, else /dev/kvm) and the VM closes it with itself."""
    if kvm is not None:
        return GuestVm(kvm, payload, mode, nr_vcpus=nr_vcpus, arg=arg, boot_backing=backing)
    own = Kvm(os.environ.get("KVM_HARNESS_DEV", "/dev/kvm"))
    try:
        vm = GuestVm(own, payload, mode, nr_vcpus=nr_vcpus, arg=arg, boot_backing=backing)
    except BaseException:
        own.close()
        raise
    vm.own(own)  # closed by vm.close(), after the VM fd
    return vm
