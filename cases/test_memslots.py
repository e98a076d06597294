"""Memslot management: read-only slots, flag changes, move and delete while the guest is stopped,
resize, bad input refused with the documented errno (the table unchanged, in the harness and in the
kernel), and every slot up to KVM_CAP_NR_MEMSLOTS.

Errnos follow Documentation/virt/kvm/api.rst (4.35 KVM_SET_USER_MEMORY_REGION, 4.141
KVM_CREATE_GUEST_MEMFD, 4.140 KVM_SET_USER_MEMORY_REGION2): overlapping slots and overlapping
guest_memfd bindings are EEXIST; a slot may be moved or have its flags changed but not resized;
guest_memfd slots can only be deleted; everything else malformed is EINVAL (a bad fd EBADF).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from harness import memory
from harness.kvm.caps import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Cap,
)
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import cbuf, kvm_ioctl
from harness.memory import PAGE_4K, Feature
from harness.memory.hostmem import Mapping
from harness.memory.memtouch import MmioLog, host_check, host_fill, word
from harness.unsupported import Unsupported

SLOT = 1
GPA_A = 1 << 40
GPA_B = (1 << 36) + (1 << 30)



def _slot_size(kind: str) -> int:
    return max(2 << 20, memory.kind(kind).page_size)


def _stride(size: int) -> int:
    return max(8, size // 8192)


# ---- read-only slots ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", memory.names(require=Feature.READONLY_SLOT))
def test_readonly_slot(kvm, backings, memtouch, kind):
    """A guest write to a KVM_MEM_READONLY slot exits as MMIO with the exact GPA and value; reads
    work; the backing is unchanged."""
    vm = memtouch.vm
    size = _slot_size(kind)
    stride = max(4096, _stride(size))
    b = backings(kind, size, vm=vm)
    host_fill(b.view(0, size), 0xC0FFEE, stride)
    vm.add_memslot(GPA_A, size, slot=SLOT, backing=b, flags=KVM_MEM_READONLY)
    gva = memtouch.map_slot(SLOT)
    log = MmioLog()
    r = memtouch.write(gva, 0x4000, 0xBAD, 0x1000, on_exit=log)
    assert r.count == 4
    assert log.writes == [(GPA_A + o, word(0xBAD, o)) for o in range(0, 0x4000, 0x1000)], \
        f"MMIO write exits: {[(hex(g), hex(v)) for g, v in log.writes]}"
    assert host_check(b.view(0, size), 0xC0FFEE, stride) == (0, None), "a write to a read-only slot landed"
    r = memtouch.verify(gva, size, 0xC0FFEE, stride)
    assert (r.bad, r.first) == (0, None)
    assert not log.reads, "reads of a read-only slot must not exit"
    memtouch.done()


# ---- flags change, move, delete while the guest is stopped ---------------------------------------
@pytest.mark.parametrize("kind", memory.names())
def test_slot_changes_while_stopped(kvm, backings, memtouch, kind):
    """With the guest stopped at a ucall: toggle LOG_DIRTY_PAGES (dirty pages reported), move the slot
    (old GPA exits as MMIO, the new GPA sees the data), delete it (MMIO at its GPA, backing kept),
    add it back (data still there). guest_memfd slots refuse flag changes and moves (EINVAL) and
    keep working."""
    vm = memtouch.vm
    size = _slot_size(kind)
    stride = _stride(size)
    b = backings(kind, size, vm=vm)
    vm.add_memslot(GPA_A, size, slot=SLOT, backing=b)
    gva_a = memtouch.map_slot(SLOT)
    gva_b = memtouch.map(GPA_B, size, page_size=2 << 20)  # mapped now: shadow paging caches tables
    movable = b.supports(Feature.SLOT_CHANGES)
    assert memtouch.write(gva_a, size, 1, stride).bad == 0

    # flags only
    before = vm.memslot_snapshot()
    if movable:
        vm.set_memslot_flags(SLOT, KVM_MEM_LOG_DIRTY_PAGES)
        assert vm.memslots[SLOT].flags == KVM_MEM_LOG_DIRTY_PAGES
        for off in (0x2000, 0x5000):
            memtouch.write(gva_a + off, 8, 1 ^ off)  # the word already there: dirty all the same
        bitmap = int.from_bytes(vm.get_dirty_log(SLOT), "little")
        assert bitmap == (1 << 2) | (1 << 5), f"dirty log {bitmap:#x}, expected pages 2 and 5"
        vm.set_memslot_flags(SLOT, 0)
    else:
        _refused(vm, lambda: vm.set_memslot_flags(SLOT, KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES),
                 errno.EINVAL, before)

    # move
    log = MmioLog(lambda gpa, n: 0xDEAD0000 | (gpa & 0xFFFF))
    if movable:
        vm.move_memslot(SLOT, GPA_B)
        assert (vm.memslots[SLOT].gpa, vm.memslots[SLOT].size) == (GPA_B, size)
        r = memtouch.verify(gva_b, 4 * stride, 1, stride, on_exit=log)
        assert not log.exits and r.bad == 0, f"the moved slot lost data or exits: {r} {log.exits}"
        assert memtouch.read(gva_a + 0x1000, 0x3000, 0x1000, on_exit=log).count == 3
        assert log.reads == [GPA_A + 0x1000, GPA_A + 0x2000, GPA_A + 0x3000], \
            f"reads of the old GPA: {[hex(g) for g in log.reads]}"
        where, gva = GPA_B, gva_b
    else:
        _refused(vm, lambda: vm.move_memslot(SLOT, GPA_B), errno.EINVAL, before)
        assert memtouch.verify(gva_a, 4 * stride, 1, stride, on_exit=log).bad == 0 and not log.exits
        where, gva = GPA_A, gva_a
    log.clear()

    # delete
    vm.delete_memslot(SLOT)
    assert SLOT not in vm.memslots
    got = memtouch.read_word(gva + 0x10, on_exit=log)
    assert log.reads == [where + 0x10] and got == 0xDEAD0010, f"after delete: {log.exits}, read {got:#x}"
    assert host_check(b.view(0, size), 1, stride) == (0, None), "deleting the slot changed its memory"

    # and back
    vm.add_memslot(GPA_A, size, slot=SLOT, backing=b)
    r = memtouch.verify(gva_a, size, 1, stride)
    assert (r.bad, r.first) == (0, None)
    memtouch.done()


@pytest.mark.parametrize("kind", ["anon", "shmem", "guest_memfd"])
def test_resize(kvm, backings, memtouch, kind):
    """KVM refuses an in-place resize (EINVAL, table unchanged); Vm.resize_memslot deletes and adds
    again, and the guest sees the larger slot."""
    vm = memtouch.vm
    b = backings(kind, 4 << 20, vm=vm)
    m = vm.add_memslot(GPA_A, 2 << 20, slot=SLOT, backing=b)
    gva = memtouch.map(GPA_A, 4 << 20, page_size=2 << 20)
    host_fill(b.view(), 7, 4096)
    before = vm.memslot_snapshot()
    raw = (lambda: vm.set_user_memory_region2(SLOT, GPA_A, 4 << 20, m.hva, m.flags, m.guest_memfd, 0)) \
        if m.v2 else (lambda: vm.set_user_memory_region(SLOT, GPA_A, 4 << 20, m.hva, m.flags))
    _refused(vm, raw, errno.EINVAL, before)
    log = MmioLog()
    memtouch.read(gva + (3 << 20), 8, on_exit=log)
    assert log.reads == [GPA_A + (3 << 20)]
    vm.resize_memslot(SLOT, 4 << 20)
    assert vm.memslots[SLOT].size == 4 << 20 and vm.memslots[SLOT].backing is b
    log.clear()
    assert memtouch.verify(gva, 4 << 20, 7, 4096, on_exit=log).bad == 0 and not log.exits
    memtouch.done()


# ---- bad input ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    kvm: Any
    vm: Any
    mem: Mapping
    gm: memory.Backing | None  # None where this kernel has no (host-mappable) guest_memfd
    other_gm: memory.Backing | None
    memfd: int
    nr_slots: int
    address_spaces: int
    gmem_why: str | None = None  # why gm is None: the reason the guest_memfd cases skip with

    FREE = 7
    GPA_FREE = 1 << 34
    A = 0  # anon slot at 2^32, 2 MiB
    G = 1  # guest_memfd slot at 2^33, 2 MiB, gmem offset 0 (a plain slot of `mem` without guest_memfd)

    @property
    def gm_hva(self) -> int:
        """The guest_memfd's host mapping (user memory the plain cases may name either way)."""
        return self.gm.addr if self.gm is not None else self.mem.addr + (8 << 20)

    def v1(self, slot: int, gpa: int, size: int, hva: int | None = None, flags: int = 0) -> None:
        self.vm.set_user_memory_region(slot, gpa, size, self.mem.addr if hva is None else hva, flags)

    def v2(self, slot: int, gpa: int, size: int, flags: int = 0, fd: int | None = None, off: int = 0,
           hva: int | None = None) -> None:
        if fd is None:
            fd = self.gm.fd if self.gm is not None else 0  # ignored by KVM without KVM_MEM_GUEST_MEMFD
        self.vm.set_user_memory_region2(slot, gpa, size, self.gm_hva if hva is None else hva, flags, fd, off)

    def gmem(self, slot: int, gpa: int, size: int, off: int, fd: int | None = None, flags: int = 0) -> None:
        self.v2(slot, gpa, size, KVM_MEM_GUEST_MEMFD | flags, fd, off)


@pytest.fixture
def ctx(kvm, backings):
    """Two VMs, 16 MiB of anonymous memory (slot A), a memfd; a guest_memfd per VM and slot G bound to
    this VM's where the kernel has guest_memfd, else slot G is plain memory and gm is None (the
    guest_memfd cases skip with ctx.gmem_why; the plain ones run everywhere)."""
    vm = kvm.create_vm()
    other = kvm.create_vm()
    mem = Mapping(16 << 20)
    memfd = os.memfd_create("not-a-guest-memfd", 1)
    try:
        os.ftruncate(memfd, 8 << 20)
        gm = other_gm = None
        why = None
        try:
            gm = backings("guest_memfd", 8 << 20, vm=vm)
            other_gm = backings("guest_memfd", 8 << 20, vm=other)
        except Unsupported as e:
            gm = other_gm = None  # all or nothing (what was made is closed with the `backings`)
            why = str(e)
        c = Ctx(kvm, vm, mem, gm, other_gm, memfd, vm.check_extension(Cap.NR_MEMSLOTS),
                max(1, vm.check_extension(Cap.MULTI_ADDRESS_SPACE)), why)
        vm.add_memslot(1 << 32, 2 << 20, slot=Ctx.A, backing=mem)
        if gm is not None:
            vm.add_memslot(1 << 33, 2 << 20, slot=Ctx.G, backing=gm)
        else:
            vm.add_memslot(1 << 33, 2 << 20, slot=Ctx.G, backing=mem, offset=4 << 20)
        yield c
    finally:
        vm.close()
        other.close()
        mem.close()
        os.close(memfd)


E, X = errno.EINVAL, errno.EEXIST
GM, RO, LOG = KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY, KVM_MEM_LOG_DIRTY_PAGES
_2M, _4M = 2 << 20, 4 << 20  # gm[4M, 6M) is free for new bindings

BAD: list[tuple[str, Callable[[Ctx], Any], int, str]] = [
    ("gpa-unaligned", lambda c: c.v1(c.FREE, c.GPA_FREE + 0x800, PAGE_4K), E, "gpa must be page aligned"),
    ("size-unaligned", lambda c: c.v1(c.FREE, c.GPA_FREE, 0x1800), E, "size must be page aligned"),
    ("hva-unaligned", lambda c: c.v1(c.FREE, c.GPA_FREE, PAGE_4K, c.mem.addr + 8), E, "hva page aligned"),
    ("hva-not-user", lambda c: c.v1(c.FREE, c.GPA_FREE, PAGE_4K, 0xFFFF800000000000), E, "user memory"),
    ("gpa-wraps", lambda c: c.v1(c.FREE, (1 << 64) - PAGE_4K, 2 * PAGE_4K), E, "gpa + size wraps"),
    ("gpa-beyond-52-bits", lambda c: c.v1(c.FREE, 1 << 52, PAGE_4K), E, "beyond the largest gfn"),
    ("overlap-create", lambda c: c.v1(c.FREE, (1 << 32) + (1 << 20), _2M), X, "slots may not overlap"),
    ("overlap-by-move", lambda c: c.v1(c.A, (1 << 33) + (1 << 20), _2M), X, "slots may not overlap"),
    ("overlap-gmem-gpa", lambda c: c.gmem(c.FREE, 1 << 32, _2M, 4 << 20), X, "slots may not overlap"),
    ("slot-id-nr-memslots", lambda c: c.v1(c.nr_slots, c.GPA_FREE, PAGE_4K), E, "id < KVM_CAP_NR_MEMSLOTS"),
    ("slot-id-0x7fff", lambda c: c.v1(0x7FFF, c.GPA_FREE, PAGE_4K), E, "id < KVM_CAP_NR_MEMSLOTS"),
    ("address-space-beyond", lambda c: c.v1(c.address_spaces << 16 | c.FREE, c.GPA_FREE, PAGE_4K), E,
     "as_id < KVM_CAP_MULTI_ADDRESS_SPACE"),
    ("flags-bit3-v1", lambda c: c.v1(c.FREE, c.GPA_FREE, PAGE_4K, flags=1 << 3), E, "unknown flag"),
    ("flags-bit31-v1", lambda c: c.v1(c.FREE, c.GPA_FREE, PAGE_4K, flags=1 << 31), E, "unknown flag"),
    ("flags-bit3-v2", lambda c: c.v2(c.FREE, c.GPA_FREE, PAGE_4K, 1 << 3, hva=c.mem.addr), E, "unknown flag"),
    ("v1-guest-memfd-flag", lambda c: c.v1(c.FREE, c.GPA_FREE, _2M, c.gm_hva, GM), E,
     "KVM_MEM_GUEST_MEMFD is a v2 flag"),
    ("resize-in-place", lambda c: c.v1(c.A, 1 << 32, 4 << 20), E, "a slot may not be resized"),
    ("change-hva", lambda c: c.v1(c.A, 1 << 32, _2M, c.mem.addr + _2M), E, "userspace_addr is fixed"),
    ("toggle-readonly", lambda c: c.v1(c.A, 1 << 32, _2M, flags=RO), E, "READONLY cannot change"),
    ("delete-missing", lambda c: c.v1(c.FREE, c.GPA_FREE, 0), E, "memory_size 0 on a missing slot"),
    ("gmem-create-size-0", lambda c: c.vm.create_guest_memfd(0, 0), E, "size > 0"),
    ("gmem-create-size-unaligned", lambda c: c.vm.create_guest_memfd(PAGE_4K + 1, 0), E, "size page aligned"),
    ("gmem-create-flags-unknown", lambda c: c.vm.create_guest_memfd(PAGE_4K, 1 << 2), E, "unknown flag"),
    ("gmem-create-flags-bit63", lambda c: c.vm.create_guest_memfd(PAGE_4K, 1 << 63), E, "unknown flag"),
    ("gmem-offset-unaligned", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, 0x800), E, "offset page aligned"),
    ("gmem-offset-at-end", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, 8 << 20), E, "range inside the file"),
    ("gmem-range-past-end", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, 7 << 20), E, "range inside the file"),
    ("gmem-offset-wraps-loff_t", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, (1 << 63) - _2M), E,
     "range inside the file (offset + size is 2^63)"),
    ("gmem-fd-is-kvm-fd", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, c.kvm.fd), E, "not a guest_memfd"),
    ("gmem-fd-is-vm-fd", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, c.vm.fd), E, "not a guest_memfd"),
    ("gmem-fd-is-memfd", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, c.memfd), E, "not a guest_memfd"),
    ("gmem-fd-closed", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, 0x7FFF_FFF0), errno.EBADF,
     "not an open fd"),
    ("gmem-of-other-vm", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, 0, c.other_gm.fd), E,
     "a guest_memfd of this VM"),
    ("gmem-binding-overlap", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, 1 << 20), X,
     "a guest_memfd range may be bound to one slot only"),
    ("gmem-readonly", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, flags=RO), E, "no READONLY gmem slot"),
    ("gmem-log-dirty", lambda c: c.gmem(c.FREE, c.GPA_FREE, _2M, _4M, flags=LOG), E, "no dirty log on gmem"),
    ("gmem-move", lambda c: c.gmem(c.G, c.GPA_FREE, _2M, 0), E, "gmem slots only delete"),
    ("gmem-flags-change", lambda c: c.gmem(c.G, 1 << 33, _2M, 0, flags=LOG), E, "gmem slots only delete"),
    ("gmem-drop-flag", lambda c: c.v1(c.G, 1 << 33, _2M, c.gm.addr, 0), E, "gmem slots only delete"),
]



# What a BAD case needs beyond a VM and plain memory (the rest run on every kernel):
#   "gmem": a host-mappable guest_memfd (ctx.gm) or KVM_CREATE_GUEST_MEMFD itself;
#   "v2":   KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2, 6.8+).
NEEDS = {name: "gmem" for name, *_ in BAD if name.startswith("gmem-")}
NEEDS.update({"overlap-gmem-gpa": "gmem", "flags-bit3-v2": "v2"})


def _bad_params() -> list:
    out = []
    for name, fn, want, why in BAD:
        # kernel bugs these catch are recorded in known-issues.toml (strict xfail where they apply)
        out.append(pytest.param(fn, want, why, NEEDS.get(name, ""), id=name))
    return out


def _raw_v1(vm, slot: int, gpa: int, size: int, hva: int, flags: int) -> None:
    r = cbuf("struct kvm_userspace_memory_region")
    r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
    kvm_ioctl(vm.fd, "KVM_SET_USER_MEMORY_REGION", r, f"slot={slot} (re-issued unchanged)")


def assert_kernel_table(vm, before: dict, touched: set[int], probe_hva: int) -> None:
    """The harness table is `before`, and the kernel agrees: each plain slot re-issued unchanged is a
    no-op (any difference would be a move or EINVAL); each guest_memfd slot still occupies its GPA
    range (EEXIST); the ids a refused request named do not exist (deleting them is EINVAL)."""
    assert vm.memslots == before, f"slot table changed: {vm.memslots} != {before}"
    for m in before.values():
        if m.flags & KVM_MEM_GUEST_MEMFD:
            with pytest.raises(KvmError) as ei:
                _raw_v1(vm, 0x7000, m.gpa, PAGE_4K, probe_hva, 0)
            assert ei.value.errno == errno.EEXIST, f"guest_memfd slot {m.slot} is gone from the kernel"
        else:
            _raw_v1(vm, m.slot, m.gpa, m.size, m.hva, m.flags)
    for sid in touched - set(before):
        if 0 <= sid & 0xFFFF < 0x7000 and sid >> 16 == 0:
            with pytest.raises(KvmError) as ei:
                _raw_v1(vm, sid, 0, 0, 0, 0)
            assert ei.value.errno == errno.EINVAL, f"slot {sid} exists in the kernel after a refused add"


def _refused(vm, call: Callable[[], Any], want: int, before: dict) -> KvmError:
    with pytest.raises(KvmError) as ei:
        call()
    e = ei.value
    assert e.errno == want, f"{e} (expected {errno.errorcode[want]})"
    assert vm.memslots == before, "a refused call changed the harness's slot table"
    return e


def _require(ctx: Ctx, need: str) -> None:
    if need == "gmem" and ctx.gm is None:
        raise Unsupported(ctx.gmem_why or "no guest_memfd on this kernel")
    if need == "v2" and ctx.vm.check_extension(Cap.USER_MEMORY2) < 1:
        raise Unsupported(f"KVM_CAP_USER_MEMORY2 is {ctx.vm.check_extension(Cap.USER_MEMORY2)} on this kernel "
                          "(needs >= 1): no KVM_SET_USER_MEMORY_REGION2")


@pytest.mark.parametrize(("call", "want", "why", "need"), _bad_params())
def test_bad_input(ctx, call, want, why, need):
    """A malformed request gets a KvmError naming the ioctl and the errno the API documents, and
    neither the harness's table nor the kernel's changes."""
    _require(ctx, need)
    before = ctx.vm.memslot_snapshot()
    with pytest.raises(KvmError) as ei:
        call(ctx)
    e = ei.value
    assert e.errno == want, f"{why}: kernel said {errno.errorcode.get(e.errno, e.errno)}, " \
                            f"expected {errno.errorcode[want]} ({e})"
    assert e.ioctl in str(e) and errno.errorcode[want] in str(e)
    assert_kernel_table(ctx.vm, before, {Ctx.FREE, ctx.nr_slots, 0x7FFF}, ctx.mem.addr)


def test_guest_memfd_of_another_vm_still_binds_its_own(ctx):
    """The refusal above is about ownership, not the fd: the other VM binds its guest_memfd fine."""
    _require(ctx, "gmem")
    other = ctx.other_gm.vm
    other.add_memslot(1 << 32, 2 << 20, slot=0, backing=ctx.other_gm)
    assert other.memslots[0].flags & KVM_MEM_GUEST_MEMFD


# ---- every slot ---------------------------------------------------------------------------------
# ~65k memslot ioctls, each waiting for an SRCU grace period: 6 s here, 135 s in the 7.3.4 runner
# (TCG), where the default 60 s bound on the test stopped it half-way through (a bound, not a hang)
@pytest.mark.kvm_timeout(600)
@pytest.mark.shard_weight(120)  # (the bound above says why: 83-135 s under TCG)
def test_every_slot_up_to_the_limit(kvm, memtouch):
    """Fill the VM with KVM_CAP_NR_MEMSLOTS slots (boot slot included), one 4 KiB page each; one
    more id is EINVAL, an overlapping one EEXIST; the guest reads the first, a middle and the last
    slot; then delete them all."""
    vm = memtouch.vm
    nr = vm.check_extension(Cap.NR_MEMSLOTS)
    assert nr > 1
    npages = 64
    mem = vm.own(Mapping(npages * PAGE_4K))
    for i in range(npages):
        mem.buf[i * PAGE_4K : i * PAGE_4K + 8] = (0xA110C000 + i).to_bytes(8, "little")
    base = 1 << 36

    def gpa(i: int) -> int:
        return base + 2 * i * PAGE_4K  # a hole between neighbours

    probes = [1, nr // 2, nr - 1]
    gvas = {i: memtouch.map(gpa(i), PAGE_4K) for i in probes}
    for i in range(1, nr):
        vm.set_user_memory_region(i, gpa(i), PAGE_4K, mem.addr + (i % npages) * PAGE_4K)
    assert len(vm.memslots) == nr
    before = vm.memslot_snapshot()
    _refused(vm, lambda: vm.set_user_memory_region(nr, gpa(nr), PAGE_4K, mem.addr), errno.EINVAL, before)
    _refused(vm, lambda: vm.set_user_memory_region(1, gpa(2), PAGE_4K, mem.addr + PAGE_4K), errno.EEXIST,
             before)
    for i in probes:
        assert memtouch.read_word(gvas[i]) == 0xA110C000 + i % npages, f"slot {i}"
    for i in range(1, nr):
        vm.delete_memslot(i)
    assert list(vm.memslots) == [0]
    log = MmioLog()
    memtouch.read_word(gvas[nr - 1], on_exit=log)
    assert log.reads == [gpa(nr - 1)]
    memtouch.done()


@pytest.mark.requires_cap(Cap.USER_MEMORY2)  # it mixes in KVM_SET_USER_MEMORY_REGION2 (6.8+)
def test_slot_table_follows_random_v1_v2_mix(kvm, backings):
    """Slots made through either ioctl are changed through the same one and tracked alike."""
    vm = kvm.create_vm()
    try:
        b = backings("shmem", 8 << 20)
        rng = random.Random(5)
        for i in range(8):
            vm.add_memslot((1 << 32) + i * (1 << 20), 1 << 20, slot=i, backing=b, offset=i << 20,
                           v2=rng.random() < 0.5)
        for i in range(8):
            vm.move_memslot(i, (1 << 34) + i * (1 << 20))
            vm.set_memslot_flags(i, KVM_MEM_LOG_DIRTY_PAGES)
        assert {m.backing_offset for m in vm.memslots.values()} == {i << 20 for i in range(8)}
        assert all(m.gpa == (1 << 34) + i * (1 << 20) for i, m in vm.memslots.items())
        assert_kernel_table(vm, vm.memslot_snapshot(), set(), b.addr)
    finally:
        vm.close()
