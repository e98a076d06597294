"""Private guest memory (seed 001): SW-protected VMs, KVM_SET_MEMORY_ATTRIBUTES, guest_memfd as the
private side, and the conversions between private and shared.

A SW-protected VM (KVM_X86_SW_PROTECTED_VM) decides per gfn, by its memory attribute, whether a guest
access goes to the slot's guest_memfd (PRIVATE) or to its userspace_addr (shared). Oracles:
- an access KVM cannot serve as the attribute says (PRIVATE on a slot without guest_memfd) is a
  KVM_EXIT_MEMORY_FAULT with the exact page GPA, size and the PRIVATE flag, and the access
  succeeds once the host converts the range;
- the two sides never leak into each other: what the guest wrote while private is never in the
  host's shared memory nor visible after a conversion to shared, and the shared side's data is
  never what the guest reads after a conversion to private (api.rst does not promise either side's
  content survives a conversion; it promises the sides stay apart);
- the host cannot map a guest_memfd made without GUEST_MEMFD_FLAG_MMAP, and a mapped one without
  INIT_SHARED refuses host access to its (private) pages;
- bad KVM_SET_MEMORY_ATTRIBUTES input gets the errno of virt/kvm/kvm_main.c
  (kvm_vm_ioctl_set_mem_attributes): EINVAL for flags, unknown or unsupported attribute bits, size 0,
  a wrapping range, an unaligned address or size; ENOTTY where the kernel has no memory attributes.

SW-protected VMs exist only in kernels built with CONFIG_KVM_SW_PROTECTED_VM=y: in the kernel runner,
`debian:7.3.4+KVM_SW_PROTECTED_VM=y` (docs/kernel-runner.md). Elsewhere these cases skip with the
reason; the guest_memfd file cases run wherever guest_memfd exists.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from harness.kvm.caps import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Cap, MemoryAttributes, VmType
from harness.kvm.errors import KvmError
from harness.kvm.exits import Exit, MemoryFault
from harness.memory import hostmem, usage
from harness.memory.memtouch import MemTouch, host_check, host_fill
from harness.memory.private import PrivateMemory, private_memory_reason
from harness.unsupported import Unsupported

SLOT = 1
GPA = 1 << 32  # above the boot slot, below any MAXPHYADDR
SIZE = 2 << 20
PAGE = 4096
SHARED_PATTERN = 0x5AA5_0001
PRIVATE_PATTERN = 0x9111_7A7E


@dataclass
class Faults:
    """An on_exit handler: records memory-fault exits; `convert` says what the host does about one
    (None: nothing, the case wants the exit itself)."""

    convert: str | None = None  # "shared" | "private" | None (raise _Stop)
    vm: object = None
    seen: list[MemoryFault] = field(default_factory=list)

    def __call__(self, vcpu, ex: Exit) -> bool:
        if not isinstance(ex, MemoryFault):
            return False
        self.seen.append(ex)
        if self.convert is None:
            raise _Stop(ex)
        if len(self.seen) > 64:
            raise AssertionError(f"64 memory-fault exits and the access still fails; last {ex.describe()}")
        want = MemoryAttributes.PRIVATE if self.convert == "private" else MemoryAttributes.SHARED
        self.vm.set_memory_attributes(ex.gpa, ex.size, want)  # exactly the range the exit names
        return True


class _Stop(Exception):
    def __init__(self, ex: MemoryFault) -> None:
        super().__init__(ex.describe())
        self.exit = ex


@pytest.fixture
def pvm(kvm) -> Iterator[MemTouch]:
    """memtouch in a SW-protected VM, or a skip saying why this kernel has none."""
    why = private_memory_reason(kvm)
    if why:
        raise Unsupported(why)
    mt = MemTouch.open(kvm, vm_type=VmType.SW_PROTECTED)
    try:
        yield mt
    finally:
        mt.close()


def _private_slot(mt: MemTouch) -> tuple[PrivateMemory, int]:
    mem = PrivateMemory(mt.vm, SIZE)
    mt.vm.own(mem)
    mt.vm.add_memslot(GPA, SIZE, slot=SLOT, backing=mem)
    return mem, mt.map_slot(SLOT)


# ---- the memory-fault exit -------------------------------------------------------------------------
@pytest.mark.parametrize("access", ["read", "write"])
def test_private_attribute_without_guest_memfd_exits(pvm, access):
    """PRIVATE on a slot with no guest_memfd: the guest's access is a KVM_EXIT_MEMORY_FAULT for
    exactly that page (gpa, size 4 KiB, flags PRIVATE, EFAULT), the pages before it work, and once
    the host converts the page back to shared the same access completes on the shared page."""
    vm = pvm.vm
    vm.add_memslot(GPA, SIZE, slot=SLOT)
    gva = pvm.map_slot(SLOT)
    buf = vm.memslots[SLOT].hva
    host_fill(hostmem.view(buf, SIZE), SHARED_PATTERN)
    page = 37
    vm.set_private(GPA + page * PAGE, PAGE)
    # the guest walks pages 0..page: the first 37 are shared and fine, page 37 exits
    f = Faults(convert="shared", vm=vm)
    n = (page + 1) * PAGE
    if access == "read":
        r = pvm.verify(gva, n, SHARED_PATTERN, on_exit=f)
        assert r.bad == 0, f"after the conversion to shared the guest read {r.bad} words that are not the host's"
    else:
        pvm.write(gva, n, PRIVATE_PATTERN, on_exit=f)
        bad, first = host_check(hostmem.view(buf, n), PRIVATE_PATTERN)
        assert bad == 0, (f"{bad} of the guest's writes are not in the host's shared pages (first at +{first:#x}) "
                          "after the conversion")
    assert [e.describe() for e in f.seen] == [MemoryFault(MemoryFault.FLAG_PRIVATE, GPA + page * PAGE, PAGE,
                                                          errno.EFAULT).describe()], \
        f"expected one MEMORY_FAULT at page {page} (gpa {GPA + page * PAGE:#x}), got {[e.describe() for e in f.seen]}"
    pvm.done()


def test_memory_fault_exit_converted_on_demand(pvm):
    """A VMM's loop: every page the guest touches that is PRIVATE without guest_memfd exits once,
    the host converts exactly [gpa, gpa+size) the exit names, and the guest completes. 16 scattered
    pages: 16 exits, each at its own page."""
    vm = pvm.vm
    vm.add_memslot(GPA, SIZE, slot=SLOT)
    gva = pvm.map_slot(SLOT)
    host_fill(hostmem.view(vm.memslots[SLOT].hva, SIZE), SHARED_PATTERN)
    pages = sorted({(i * 97 + 5) % (SIZE // PAGE) for i in range(16)})
    for p in pages:
        vm.set_private(GPA + p * PAGE, PAGE)
    f = Faults(convert="shared", vm=vm)  # no guest_memfd here: shared is the only way to serve it
    r = pvm.verify(gva, SIZE, SHARED_PATTERN, on_exit=f)
    assert r.bad == 0
    got = [(e.gpa - GPA) // PAGE for e in f.seen]
    assert got == pages, f"memory-fault exits at pages {got}, the private pages were {pages}"
    assert all(e.size == PAGE and e.private for e in f.seen), [e.describe() for e in f.seen]


# ---- the two sides stay apart ----------------------------------------------------------------------
def test_conversions_keep_the_sides_apart(pvm):
    """shared -> private -> shared -> private on a guest_memfd slot: the guest sees the host's data
    while shared; after the conversion to private it never sees the shared data (fresh guest_memfd
    pages read zero); its private writes never reach the host's memory or the guest's shared view;
    back to private it sees its own private data again (guest_memfd keeps the page until a punch)
    or zeros, never the shared data; after a punch of the private side it reads zeros."""
    vm = pvm.vm
    mem, gva = _private_slot(pvm)
    host_fill(mem.view(0, SIZE), SHARED_PATTERN)
    n = SIZE // 8
    # 1. shared (the default): the host's data
    assert pvm.verify(gva, SIZE, SHARED_PATTERN).bad == 0
    # 2. private: a fresh guest_memfd, zeros, never the shared side's words
    vm.set_private(GPA, SIZE)
    r = pvm.read(gva, SIZE)
    assert r.bad == 0, (f"after shared->private the guest read {r.bad} non-zero words of {n} "
                        f"(first at +{r.first:#x}); fresh guest_memfd memory reads zero")
    pvm.write(gva, SIZE, PRIVATE_PATTERN)
    assert pvm.verify(gva, SIZE, PRIVATE_PATTERN).bad == 0
    bad, first = host_check(mem.view(0, SIZE), SHARED_PATTERN)
    assert bad == 0, (f"the guest's private writes changed {bad} words of the host's shared memory "
                      f"(first at +{first:#x}): private data leaked to the shared side")
    # 3. shared again: the host's data, none of the private writes
    vm.set_shared(GPA, SIZE)
    r = pvm.verify(gva, SIZE, SHARED_PATTERN)
    assert r.bad == 0, (f"after private->shared {r.bad} of {n} words are not the host's shared data "
                        f"(first at +{r.first:#x})")
    # 4. private again: the private data (kept) — and certainly not the shared side's
    vm.set_private(GPA, SIZE)
    r = pvm.verify(gva, SIZE, SHARED_PATTERN)
    assert r.bad == n, f"after shared->private {n - r.bad} words read as the shared side's data"
    r = pvm.verify(gva, SIZE, PRIVATE_PATTERN)
    assert r.bad == 0, (f"after private->shared->private {r.bad} of {n} private words changed "
                        f"(first at +{r.first:#x}); guest_memfd keeps its pages across attribute changes")
    # 5. punch the private side: zeros
    mem.punch_hole(0, SIZE // 2)
    r = pvm.read(gva, SIZE // 2)
    assert r.bad == 0, f"{r.bad} non-zero words in the punched half of the private side"
    r = pvm.verify(gva, SIZE, PRIVATE_PATTERN)
    assert (r.bad, r.first) == (n // 2, 0), (f"after punching the first half {r.bad} words differ from the "
                                              f"private data (first at +{r.first:#x}); expected exactly the "
                                              f"{n // 2} punched words")
    pvm.done()


def test_partial_conversion_is_per_page(pvm):
    """Pages of one slot converted one by one: each shows its own side, the neighbours of a
    converted page keep theirs. (memtouch words are relative to the GVA a command starts at, so
    each page is filled and checked on its own.)"""
    vm = pvm.vm
    mem, gva = _private_slot(pvm)
    npages = SIZE // PAGE
    for p in range(npages):
        host_fill(mem.view(p * PAGE, PAGE), SHARED_PATTERN)
    vm.set_private(GPA, SIZE)
    sample = range(0, npages, 7)
    for p in sample:
        pvm.write(gva + p * PAGE, PAGE, PRIVATE_PATTERN)
    shared = {p for p in range(npages) if p % 3 == 1}
    for p in sorted(shared):
        vm.set_shared(GPA + p * PAGE, PAGE)
    wrong = []
    for p in sample:
        want = SHARED_PATTERN if p in shared else PRIVATE_PATTERN
        r = pvm.verify(gva + p * PAGE, PAGE, want)
        if r.bad:
            wrong.append((p, "shared" if p in shared else "private", r.bad))
    assert not wrong, f"pages reading the wrong side (page, expected side, bad words): {wrong}"
    pvm.done()


def test_punch_frees_private_memory(pvm):
    """The private side's memory is the kernel's to account: 32 MiB the guest wrote while private
    shows in /proc/meminfo Unevictable (guest_memfd mappings are inaccessible, hence unevictable),
    and a punch of the guest_memfd gives at least 90% of it back, while KVM still maps the pages.
    (A system-wide figure: in the kernel runner this VM is the machine's only user of it.)"""
    vm = pvm.vm
    size = 32 << 20
    mem = PrivateMemory(vm, size)
    vm.own(mem)
    vm.add_memslot(GPA, size, slot=SLOT, backing=mem)
    gva = pvm.map_slot(SLOT)
    vm.set_private(GPA, size)
    u0 = usage.meminfo()["Unevictable"]
    pvm.write(gva, size, PRIVATE_PATTERN, PAGE)
    u1 = usage.meminfo()["Unevictable"]
    assert u1 - u0 >= size * 9 // 10, (f"the guest wrote {size >> 20} MiB of private memory, Unevictable grew by "
                                       f"{(u1 - u0) >> 20} MiB: the private side is not guest_memfd memory?")
    mem.punch_hole(0, size)
    u2 = usage.meminfo()["Unevictable"]
    assert u1 - u2 >= size * 9 // 10, (f"punching the {size >> 20} MiB private side gave back {(u1 - u2) >> 20} MiB "
                                       f"(Unevictable {u1 >> 20} -> {u2 >> 20} MiB): KVM or someone kept the pages")
    r = pvm.read(gva, size, PAGE)
    assert r.bad == 0, f"{r.bad} pages still hold data after the punch (first at +{r.first:#x})"
    pvm.done()


# ---- guest_memfd without host access ---------------------------------------------------------------
def _gmem_vm(kvm):
    if not kvm.check_extension(Cap.GUEST_MEMFD):
        raise Unsupported("KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel")
    return kvm.create_vm()


def test_guest_memfd_without_mmap_flag_cannot_be_mapped(kvm):
    """A guest_memfd made without GUEST_MEMFD_FLAG_MMAP refuses mmap (ENODEV): the host has no way
    to map private memory."""
    with _gmem_vm(kvm) as vm:
        fd = vm.create_guest_memfd(SIZE, 0)
        try:
            for flags in (hostmem.MAP_SHARED, hostmem.MAP_PRIVATE):
                with pytest.raises(OSError) as ei:
                    hostmem.mmap(SIZE, hostmem.PROT_READ | hostmem.PROT_WRITE, flags, fd, 0)
                assert ei.value.errno == errno.ENODEV, f"mmap(flags={flags:#x}) of a guest_memfd without " \
                    f"MMAP: {errno.errorcode.get(ei.value.errno)}, expected ENODEV"
        finally:
            os.close(fd)


def _touch_in_child(addr: int, write: bool) -> int | None:
    """Touch one byte at addr in a forked child; the signal that killed it, or None if it lived."""
    pid = os.fork()
    if pid == 0:  # the child: touch, and leave without running any Python clean-up
        faulthandler.disable()  # the expected SIGBUS is the answer, not a crash to report
        try:
            if write:
                ctypes.memset(addr, 0x5A, 1)
            else:
                ctypes.string_at(addr, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


@pytest.mark.parametrize("access", ["read", "write"])
def test_guest_memfd_mmap_without_init_shared_refuses_host_access(kvm, access):
    """GUEST_MEMFD_FLAG_MMAP without INIT_SHARED: the mapping is made, but the pages are private and
    a host access is SIGBUS; with INIT_SHARED the same access works (the control)."""
    with _gmem_vm(kvm) as vm:
        offered = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
        if not offered & GUEST_MEMFD_FLAG_MMAP:
            raise Unsupported(f"KVM_CAP_GUEST_MEMFD_FLAGS = {offered:#x}: no GUEST_MEMFD_FLAG_MMAP")
        results = {}
        for flags in (GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED):
            if flags & ~offered:
                continue
            try:
                fd = vm.create_guest_memfd(SIZE, flags)
            except KvmError as e:
                results[flags] = f"create: {e}"
                continue
            try:
                m = hostmem.Mapping(SIZE, flags=hostmem.MAP_SHARED, fd=fd)
                try:
                    results[flags] = _touch_in_child(m.addr + 5 * PAGE, access == "write")
                finally:
                    m.close()
            finally:
                os.close(fd)
        assert results.get(GUEST_MEMFD_FLAG_MMAP) == signal.SIGBUS, \
            f"host {access} of a MMAP-only guest_memfd page: {results}, expected SIGBUS"
        if GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED in results:
            assert results[GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED] is None, \
                f"the control (MMAP|INIT_SHARED) failed too: {results}"


# ---- bad input -------------------------------------------------------------------------------------
def _attrs_errno(vm, gpa: int, size: int, attributes: int, flags: int = 0) -> int:
    try:
        vm.set_memory_attributes(gpa, size, attributes, flags)
    except KvmError as e:
        return e.errno
    return 0


BAD_ATTRS = {
    # id: (gpa, size, attributes, flags)
    "flags": (GPA, PAGE, MemoryAttributes.PRIVATE, 1),
    "unknown-bit": (GPA, PAGE, 1 << 0, 0),
    "high-bit": (GPA, PAGE, 1 << 63, 0),
    "size-zero": (GPA, 0, MemoryAttributes.PRIVATE, 0),
    "wraps": (2**64 - PAGE, 2 * PAGE, MemoryAttributes.PRIVATE, 0),
    "gpa-unaligned": (GPA + 8, PAGE, MemoryAttributes.PRIVATE, 0),
    "size-unaligned": (GPA, PAGE + 8, MemoryAttributes.PRIVATE, 0),
}


@pytest.mark.parametrize("case", list(BAD_ATTRS))
def test_bad_memory_attributes(pvm, case):
    """Each malformed KVM_SET_MEMORY_ATTRIBUTES is EINVAL on a SW-protected VM, and the page keeps
    its attribute (the guest still reads the shared data there)."""
    vm = pvm.vm
    mem, gva = _private_slot(pvm)
    host_fill(mem.view(0, SIZE), SHARED_PATTERN)
    got = _attrs_errno(vm, *BAD_ATTRS[case])
    assert got == errno.EINVAL, f"{case}: {BAD_ATTRS[case]} -> {errno.errorcode.get(got, got)}, expected EINVAL"
    r = pvm.verify(gva, 2 * PAGE, SHARED_PATTERN)
    assert r.bad == 0, f"{case}: a refused KVM_SET_MEMORY_ATTRIBUTES changed the first pages ({r.bad} bad words)"


def test_attributes_outside_any_memslot(pvm):
    """Attributes are per gfn, not per slot (kvm_vm_ioctl_set_mem_attributes checks no memslot): a
    range with no slot takes them, and a slot added there later starts private."""
    vm = pvm.vm
    away = GPA + (1 << 30)
    assert _attrs_errno(vm, away, SIZE, MemoryAttributes.PRIVATE) == 0
    mem = PrivateMemory(vm, SIZE)
    vm.own(mem)
    host_fill(mem.view(0, SIZE), SHARED_PATTERN)
    vm.add_memslot(away, SIZE, slot=SLOT, backing=mem)
    gva = pvm.map_slot(SLOT)
    r = pvm.verify(gva, SIZE, SHARED_PATTERN)
    assert r.bad == r.count, (f"a slot added where the attributes said PRIVATE showed {r.count - r.bad} "
                              f"words of the shared side")
    pvm.done()


def test_private_attribute_on_default_vm(kvm):
    """A default VM has no private memory: KVM_CAP_MEMORY_ATTRIBUTES is 0 on its fd and PRIVATE is
    EINVAL; where the kernel has no memory attributes at all, the ioctl is ENOTTY."""
    with kvm.create_vm() as vm:
        system_attrs = kvm.check_extension(Cap.MEMORY_ATTRIBUTES)
        vm_attrs = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
        got = _attrs_errno(vm, GPA, PAGE, MemoryAttributes.PRIVATE)
        if not system_attrs:
            assert got == errno.ENOTTY, (f"KVM_CAP_MEMORY_ATTRIBUTES is 0 on /dev/kvm, yet "
                                         f"KVM_SET_MEMORY_ATTRIBUTES answered {errno.errorcode.get(got, got)}")
            return
        assert vm_attrs & MemoryAttributes.PRIVATE == 0, f"a default VM offers attributes {vm_attrs:#x}"
        assert got == errno.EINVAL, f"PRIVATE on a default VM: {errno.errorcode.get(got, got)}, expected EINVAL"
