"""Stateful property test: random add / delete / move / flag / resize requests through both ioctls,
checked against harness.memory.model.MemslotModel (what KVM must accept, and with which errno), with
the guest probing random GPAs of the window between steps: a GPA inside a slot reads (and writes)
the backing at the slot's hva offset, a read-only slot turns writes into MMIO exits, a GPA outside
every slot exits as MMIO with its exact address, and LOG_DIRTY_PAGES slots report the written page.

Deterministic by default (same examples every run, for bisecting); KVM_HARNESS_HYPOTHESIS_RANDOM=1
explores new ones.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from harness.kvm.caps import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Cap
from harness.kvm.errors import KvmError
from harness.memory.memtouch import MASK, MemTouch, MmioLog, host_fill, word
from harness.memory.model import MemslotModel, SlotReq

PAGE = 4096
WINDOW = 1 << 36  # test slots live in [WINDOW, WINDOW + WINDOW_SIZE)
WINDOW_SIZE = 64 << 20
WINDOW_PAGES = WINDOW_SIZE // PAGE
BACKING_SIZE = 16 << 20
BOOT_GPA_INSIDE = 0x800000  # inside the boot slot: a request there must be EEXIST
LOG, RO = KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY


def _sentinel(gpa: int, n: int) -> int:
    return (0x5E47_1E00_0000_0000 | gpa) & MASK


class MemslotMachine(RuleBasedStateMachine):
    kvm = None
    backing = None

    def __init__(self) -> None:
        super().__init__()
        self.mt = MemTouch.open(self.kvm)
        self.vm = self.mt.vm
        nr = self.vm.check_extension(Cap.NR_MEMSLOTS)
        self.nr = nr
        self.model = MemslotModel(nr, self.vm.check_extension(Cap.MULTI_ADDRESS_SPACE))
        boot = self.vm.memslots[0]
        self.model.apply(SlotReq(0, boot.gpa, boot.size, boot.hva, boot.flags))
        self.gva = self.mt.map(WINDOW, WINDOW_SIZE, page_size=2 << 20)  # before the first run
        self.log = MmioLog(_sentinel)

    def teardown(self) -> None:
        self.mt.close()

    # ---- requests ------------------------------------------------------------------------------
    def _submit(self, req: SlotReq, v2: bool) -> None:
        want = self.model.predict(req, v2)
        got = 0
        try:
            if v2:
                self.vm.set_user_memory_region2(req.slot, req.gpa, req.size, req.hva, req.flags,
                                                backing=self.backing)
            else:
                self.vm.set_user_memory_region(req.slot, req.gpa, req.size, req.hva, req.flags,
                                               backing=self.backing)
        except KvmError as e:
            got = e.errno
        assert got == want, (f"{'v2' if v2 else 'v1'} {req}: kernel {errno.errorcode.get(got, 'OK')}, "
                             f"model {errno.errorcode.get(want, 'OK')}")
        if got == 0:
            self.model.apply(req)

    @initialize(pages=st.lists(st.integers(0, WINDOW_PAGES // 1024 - 1), min_size=3, max_size=3, unique=True),
                flags=st.lists(st.sampled_from([0, LOG, RO]), min_size=3, max_size=3), v2=st.booleans())
    def some_slots(self, pages: list[int], flags: list[int], v2: bool) -> None:
        """Three 2 MiB slots at distinct 4 MiB-aligned places, so probes have memory to find."""
        for i, (p, f) in enumerate(zip(pages, flags, strict=True)):
            self._submit(SlotReq(i + 1, WINDOW + p * 1024 * PAGE, 2 << 20,
                                 self.backing.addr + i * (4 << 20), f), v2)

    @rule(slot=st.integers(1, 8), page=st.one_of(st.integers(0, WINDOW_PAGES - 1), st.integers(0, 63)),
          npages=st.sampled_from([1, 2, 3, 16, 512]), hva_page=st.integers(0, BACKING_SIZE // PAGE - 512),
          flags=st.sampled_from([0, 0, LOG, RO, RO | LOG]), v2=st.booleans())
    def create(self, slot: int, page: int, npages: int, hva_page: int, flags: int, v2: bool) -> None:
        """A new slot (on an existing id: a change of hva/size, which KVM refuses)."""
        gpa = WINDOW + page * PAGE
        size = min(npages * PAGE, WINDOW + WINDOW_SIZE - gpa)
        self._submit(SlotReq(slot, gpa, size, self.backing.addr + hva_page * PAGE, flags), v2)

    @rule(what=st.sampled_from(["last-id", "id-limit", "address-space", "boot-overlap", "bad-flag",
                                "resize", "unaligned-gpa", "hva-change"]),
          slot=st.integers(1, 8), v2=st.booleans())
    def odd_request(self, what: str, slot: int, v2: bool) -> None:
        """The requests KVM must refuse (and one it must take: the last valid id)."""
        old = self.model.slots.get(slot)
        base = old or SlotReq(slot, WINDOW + WINDOW_SIZE - PAGE, PAGE, self.backing.addr)
        req = {
            "last-id": SlotReq(self.nr - 1, WINDOW + WINDOW_SIZE - PAGE, PAGE, self.backing.addr),
            "id-limit": SlotReq(self.nr, WINDOW, PAGE, self.backing.addr),
            "address-space": SlotReq(1 << 16 | slot, WINDOW, PAGE, self.backing.addr),
            "boot-overlap": SlotReq(slot, BOOT_GPA_INSIDE, base.size, base.hva, base.flags),
            "bad-flag": SlotReq(slot, base.gpa, base.size, base.hva, base.flags | 1 << 3),
            "resize": SlotReq(slot, base.gpa, base.size + PAGE, base.hva, base.flags),
            "unaligned-gpa": SlotReq(slot, base.gpa + 8, base.size, base.hva, base.flags),
            "hva-change": SlotReq(slot, base.gpa, base.size, base.hva + PAGE, base.flags),
        }[what]
        self._submit(req, v2)

    @rule(slot=st.integers(1, 9), v2=st.booleans())
    def delete(self, slot: int, v2: bool) -> None:
        old = self.model.slots.get(slot)
        req = SlotReq(slot, old.gpa if old else WINDOW, 0, old.hva if old else self.backing.addr,
                      old.flags if old else 0)
        self._submit(req, v2)

    @rule(slot=st.integers(1, 8), page=st.integers(0, WINDOW_PAGES - 1), v2=st.booleans())
    def move(self, slot: int, page: int, v2: bool) -> None:
        old = self.model.slots.get(slot)
        if old is None:
            return
        gpa = WINDOW + page * PAGE
        if gpa + old.size > WINDOW + WINDOW_SIZE:
            gpa = WINDOW + WINDOW_SIZE - old.size
        self._submit(SlotReq(slot, gpa, old.size, old.hva, old.flags), v2)

    @rule(slot=st.integers(1, 8), flags=st.sampled_from([0, LOG, RO, RO | LOG]), v2=st.booleans())
    def set_flags(self, slot: int, flags: int, v2: bool) -> None:
        old = self.model.slots.get(slot)
        if old is None:
            return
        self._submit(SlotReq(slot, old.gpa, old.size, old.hva, flags), v2)

    # ---- the guest probes ----------------------------------------------------------------------
    def _target(self, data: st.DataObject) -> tuple[int, int]:
        """(gpa, gva) of a word to probe: usually inside a slot of the window, else anywhere in it."""
        inside = [m for m in self.model.slots.values() if m.gpa >= WINDOW]
        if inside and data.draw(st.integers(0, 3), label="pick") > 0:
            m = data.draw(st.sampled_from(sorted(inside, key=lambda m: m.slot)), label="slot")
            gpa = m.gpa + data.draw(st.integers(0, m.size // 8 - 1), label="word") * 8
        else:
            gpa = WINDOW + data.draw(st.integers(0, WINDOW_SIZE // 8 - 1), label="word") * 8
        return gpa, self.gva + (gpa - WINDOW)

    @rule(data=st.data())
    def guest_reads(self, data: st.DataObject) -> None:
        gpa, gva = self._target(data)
        s = self.model.slot_at(gpa)
        self.log.clear()
        seen = self.mt.read_word(gva, on_exit=self.log)
        if s is None:
            assert self.log.reads == [gpa], f"read of unbacked {gpa:#x}: exits {self.log.exits}"
            assert seen == _sentinel(gpa, 8)
        else:
            off = s.hva - self.backing.addr + (gpa - s.gpa)
            want = int.from_bytes(self.backing.read(off, 8), "little")
            assert not self.log.exits, f"read of {gpa:#x} in slot {s}: exits {self.log.exits}"
            assert seen == want, f"guest read {seen:#x} at {gpa:#x} (slot {s.slot}), backing has {want:#x}"

    @rule(data=st.data(), pattern=st.integers(0, MASK))
    def guest_writes(self, data: st.DataObject, pattern: int) -> None:
        gpa, gva = self._target(data)
        value = word(pattern, 0)
        s = self.model.slot_at(gpa)
        off = None if s is None else s.hva - self.backing.addr + (gpa - s.gpa)
        old = None if off is None else self.backing.read(off, 8)
        self.log.clear()
        self.mt.write(gva, 8, pattern, on_exit=self.log)
        if s is None or s.flags & KVM_MEM_READONLY:
            assert self.log.writes == [(gpa, value)], f"write to {gpa:#x} ({s}): exits {self.log.exits}"
            if old is not None:
                assert self.backing.read(off, 8) == old, f"a write to read-only slot {s.slot} landed"
        else:
            assert not self.log.exits, f"write to {gpa:#x} in slot {s}: exits {self.log.exits}"
            assert int.from_bytes(self.backing.read(off, 8), "little") == value
            if s.flags & KVM_MEM_LOG_DIRTY_PAGES:
                bitmap = int.from_bytes(self.vm.get_dirty_log(s.slot), "little")
                page_in_slot = (gpa - s.gpa) // PAGE
                assert bitmap >> page_in_slot & 1, f"slot {s.slot} page {page_in_slot} written, not dirty"

    # ---- the tables agree ----------------------------------------------------------------------
    @invariant()
    def tables_agree(self) -> None:
        have = {k: (m.gpa, m.size, m.hva, m.flags) for k, m in self.vm.memslots.items()}
        want = {k: (m.gpa, m.size, m.hva, m.flags) for k, m in self.model.slots.items()}
        assert have == want


@pytest.mark.requires_cap(Cap.USER_MEMORY2)  # it mixes in KVM_SET_USER_MEMORY_REGION2 (6.8+)
@pytest.mark.shard_weight(45)  # 30 examples x 30 steps: ~30 s under TCG
def test_memslot_state_machine(kvm, backings):
    b = backings("shmem", BACKING_SIZE)
    host_fill(b.view(), 0x57A7E, 8)
    MemslotMachine.kvm = kvm
    MemslotMachine.backing = b
    random_run = os.environ.get("KVM_HARNESS_HYPOTHESIS_RANDOM") == "1"
    try:
        run_state_machine_as_test(MemslotMachine, settings=settings(
            max_examples=30, stateful_step_count=30, deadline=None, derandomize=not random_run,
            database=None if not random_run else settings.default.database,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        MemslotMachine.kvm = MemslotMachine.backing = None


def test_model_knows_the_boot_slot_overlap(kvm):
    """Sanity of the model against the kernel for the one fixed slot every GuestVm has."""
    mt = MemTouch.open(kvm)
    try:
        boot = mt.vm.memslots[0]
        model = MemslotModel(mt.vm.check_extension(Cap.NR_MEMSLOTS))
        model.apply(SlotReq(0, boot.gpa, boot.size, boot.hva))
        req = SlotReq(3, BOOT_GPA_INSIDE, PAGE, boot.hva)
        assert model.predict(req) == errno.EEXIST
        with pytest.raises(KvmError) as ei:
            mt.vm.set_user_memory_region(3, BOOT_GPA_INSIDE, PAGE, boot.hva)
        assert ei.value.errno == errno.EEXIST
    finally:
        mt.close()
