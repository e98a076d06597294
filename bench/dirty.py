"""dirty_log_harvest / dirty_ring_harvest: dirty pages harvested per second, with a guest writing.

A VM runs the dirty_writer payload (guests/payloads/dirty_writer.c) in long mode over a 32 MiB slot
with KVM_MEM_LOG_DIRTY_PAGES (private anonymous memory at GPA 4 GiB, mapped at GVA 2^39 with 2 MiB
guest pages, as cases/test_dirty_log.py maps it). Each pass the guest writes one word into every
page of the slot (cmd 1 over the list 0..N-1), then the host harvests what KVM reports and hands
it back so the next pass dirties every page again (write-protect faults):

  dirty_log_harvest   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (MANUAL_PROTECT_ENABLE): KVM_GET_DIRTY_LOG,
                      the bitmap as page numbers, KVM_CLEAR_DIRTY_LOG of those pages (which
                      re-protects them) -- Vm.get_dirty_pages + Vm.clear_dirty_pages.
  dirty_ring_harvest  KVM_CAP_DIRTY_LOG_RING with a ring of at least 2N entries: walk the vCPU's
                      ring from the fetch index while entries are DIRTY, mark each RESET, then
                      KVM_RESET_DIRTY_RINGS (re-protects) -- DirtyRing.harvest +
                      Vm.reset_dirty_rings. Skipped, with the reason, where KVM has no dirty ring.

Pass 0 is untimed (its faults populate fresh memory); then `passes` timed passes. Rates: pages
harvested / time spent harvesting (the primary rate), and, secondary, pages the guest dirtied /
time from the command to its ucall (the guest's write-protect faults and KVM's logging: the
"dirty memory time" of dirty_log_perf_test). Every pass both sides check that the harvest holds
exactly the N pages written.

Step for step, harness side (left) and bench/dirty_harvest.c (right), per pass:

  Mailbox.call(1, gva, list, N, round, 0, 0, 0)  the 8 descriptor words, KVM_RUN to the ucall,
    (post + run_until_ucall + SYNC check)          check SYNC
  log:  vm.get_dirty_page_array(1): a fresh      calloc'd bitmap, KVM_GET_DIRTY_LOG, the set bits
        bitmap, KVM_GET_DIRTY_LOG, the set bits     into an array of page numbers
        as array('I') (walked in C)
        vm.clear_dirty_pages(1, got): a fresh     a fresh bitmap built from that array,
        bitmap from the array (in C), CLEAR         KVM_CLEAR_DIRTY_LOG(first 0, N pages)
  ring: ring.harvest_arrays(): entries while      the same walk into an array of (slot, offset),
        DIRTY, each set to RESET, into two          each entry's flags set to RESET
        arrays (walked in C)
        vm.reset_dirty_rings()                    KVM_RESET_DIRTY_RINGS
  check: N pages harvested (ring: N reset)        the same checks

The set-up (untimed) is the harness's GuestVm with nr_vcpus=0, the capability enabled before the
vCPU is added, the logged slot; the C side loads that VM's boot slot and registers (bench/image.py).
"""

from __future__ import annotations

import time
from array import array
from pathlib import Path

from bench import image
from bench.registry import BUILD_DIR, Bench, register
from harness.kvm.caps import KVM_MEM_LOG_DIRTY_PAGES, Cap
from harness.kvm.dirty import DIRTY_GFN_SIZE, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, PAGE, DirtyRing
from harness.kvm.system import Kvm
from harness.lib.guestvm import GuestVm
from harness.lib.mailbox import Mailbox
from harness.lib.ucall import SYNC

SLOT = 1
GPA = 1 << 32
GVA = 1 << 39
MIB = 32  # the logged slot
DESC_SIZE = 64  # struct dirty_desc
CMD_PASS = 1


def ring_entries(npages: int) -> int:
    """Ring entries for passes of npages: a power of two >= 2 * npages (well above the soft-full
    limit, so a pass never exits with KVM_EXIT_DIRTY_RING_FULL), at least 4096."""
    n = 4096
    while n < 2 * npages:
        n *= 2
    return n


def _vm(kvm: Kvm, method: str, mib: int, cls: type[GuestVm] = GuestVm) -> tuple[GuestVm, Mailbox, int]:
    npages = (mib << 20) // PAGE
    vm = cls(kvm, "dirty_writer", "long64", nr_vcpus=0)
    try:
        if method == "ring":
            vm.enable_dirty_ring(ring_entries(npages) * DIRTY_GFN_SIZE)  # before any vCPU (api.rst)
        else:
            vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        vm.add_vcpu()
        vm.add_memslot(GPA, mib << 20, slot=SLOT, flags=KVM_MEM_LOG_DIRTY_PAGES)
        vm.map_slot(SLOT, GVA)
        mb = Mailbox(vm, DESC_SIZE)
        lst = vm.alloc(8 * npages, 64)
        vm.write(lst, array("Q", range(npages)).tobytes())
    except BaseException:
        vm.close()
        raise
    return vm, mb, lst


def harness_dirty(method: str, passes: int, mib: int = MIB) -> dict[str, float]:
    npages = (mib << 20) // PAGE
    clock = time.clock_gettime
    mono = time.CLOCK_MONOTONIC
    kvm = Kvm()
    try:
        vm, mb, lst = _vm(kvm, method, mib)
        ring = DirtyRing(vm.vcpu, ring_entries(npages)) if method == "ring" else None
        try:
            t_write = t_harvest = 0.0
            for rnd in range(1, passes + 2):  # round 1: untimed first touch
                t0 = clock(mono)
                uc = mb.call(CMD_PASS, GVA, lst, npages, rnd, 0, 0, 0)
                t1 = clock(mono)
                if ring is not None:
                    _, got = ring.harvest_arrays()
                    reset = vm.reset_dirty_rings()
                else:
                    got = vm.get_dirty_page_array(SLOT)
                    vm.clear_dirty_pages(SLOT, got)
                    reset = len(got)
                t2 = clock(mono)
                if uc.cmd != SYNC or uc.args[:2] != (npages, rnd):
                    raise RuntimeError(f"dirty_writer answered {uc!r} to pass {rnd}")
                if len(got) != npages or reset != npages:
                    raise RuntimeError(f"{method} pass {rnd}: harvested {len(got)}, reset {reset}, "
                                       f"the guest wrote {npages} pages")
                if rnd > 1:
                    t_write += t1 - t0
                    t_harvest += t2 - t1
        finally:
            if ring is not None:
                ring.close()
            vm.close()
    finally:
        kvm.close()
    return {"harvest_pages_per_s": passes * npages / t_harvest, "dirty_pages_per_s": passes * npages / t_write}


def _make_image(method: str, mib: int, d: Path) -> None:
    kvm = Kvm()
    try:
        vm, mb, lst = _vm(kvm, method, mib, image.RecordingGuestVm)
        try:
            npages = (mib << 20) // PAGE
            image.dump(vm, d, {"desc": mb.gpa, "list": lst, "npages": npages, "gva": GVA, "slot_gpa": GPA,
                               "slot_size": mib << 20, "ring_entries": ring_entries(npages)})
        finally:
            vm.close()
    finally:
        kvm.close()


def _c_cmd(method: str, mib: int = MIB):
    def argv(passes: int) -> list[str]:
        d = image.cached_dir(("dirty", method, mib), lambda d: _make_image(method, mib, d))
        return [str(BUILD_DIR / "dirty_harvest"), str(d), method, str(passes)]

    return argv


def _unavailable(method: str, mib: int = MIB):
    def reason() -> str | None:
        kvm = Kvm()
        try:
            if method == "ring":
                need = ring_entries((mib << 20) // PAGE) * DIRTY_GFN_SIZE
                have = kvm.check_extension(Cap.DIRTY_LOG_RING)
                if not have:
                    return "KVM_CAP_DIRTY_LOG_RING is 0: this KVM has no dirty ring"
                if have < need:
                    return f"KVM_CAP_DIRTY_LOG_RING allows {have} bytes per ring, the benchmark needs {need}"
            elif not kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2):
                return "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is 0: no KVM_CLEAR_DIRTY_LOG"
        finally:
            kvm.close()
        return None

    return reason


DIRTY_LOG_HARVEST = register(Bench(
    name="dirty_log_harvest",
    label="dirty log: GET_DIRTY_LOG + CLEAR_DIRTY_LOG (manual protect), 32 MiB",
    c_cmd=_c_cmd("log"),
    c_rate_key="harvest_pages_per_s",
    py=lambda n: harness_dirty("log", n),
    count_option="dirty_passes",
    default_count=5,
    target=0.5,
    secondary=("dirty_pages_per_s",),
    unit="pages/s",
    unavailable=_unavailable("log"),
    params={"slot_mib": MIB, "guest_page": "2M"},
))

DIRTY_RING_HARVEST = register(Bench(
    name="dirty_ring_harvest",
    label="dirty ring: harvest + KVM_RESET_DIRTY_RINGS, 32 MiB",
    c_cmd=_c_cmd("ring"),
    c_rate_key="harvest_pages_per_s",
    py=lambda n: harness_dirty("ring", n),
    count_option="dirty_passes",
    default_count=5,
    target=0.5,
    secondary=("dirty_pages_per_s",),
    unit="pages/s",
    unavailable=_unavailable("ring"),
    params={"slot_mib": MIB, "guest_page": "2M", "ring_entries": ring_entries((MIB << 20) // PAGE)},
))
