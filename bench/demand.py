"""demand_fault: pages/s a guest faults in on fresh anonymous memory (as
tools/testing/selftests/kvm/demand_paging_test.c measures it, without userfaultfd).

A VM runs the memtouch payload (guests/payloads/memtouch.c) in long mode with a fresh N MiB slot of
private anonymous memory (no madvise: with THP in "madvise" mode that is 4 KiB host pages; with
"always" the kernel may back it with 2 MiB pages on both sides alike) at GPA 4 GiB, mapped with
4 KiB guest pages at GVA 2^39 (host_pages() and the page-size argument below). One command, "write
one word into every 4 KiB page" (cmd 1, stride 4096), is timed from writing the command to the
guest's ucall: every page is a first touch, so each store is a guest page fault on memory neither
KVM nor the host has populated. Rate: pages / that time. A fresh VM and slot per round.

Step for step, harness side (left) and bench/demand_fault.c (right):

  GuestVm(kvm, "memtouch", "long64") + MemTouch   boot slot, image and registers from IMAGE_DIR
  vm.add_memslot(4 GiB, N MiB, slot=1)            mmap N MiB anonymous, KVM_SET_USER_MEMORY_REGION
  mt.map_slot(1, page_size=4096)                  (page tables are in the image)
  mt.read(gva, 0)  untimed: the vCPU's first      cmd 3 with length 0, run to SYNC (untimed)
    entry and the guest's boot
  -- timed --
  mt.write(gva, N MiB, pattern, stride=4096):     write the 5 descriptor words, KVM_RUN to the
    Mailbox.post + run_until_ucall + Result       ucall, check SYNC and count == pages
  -- end --
  check count == pages; mt.done(); vm.close()     cmd 0, run to DONE; close

The KVM and host work (the faults) is the same on both sides; what differs is the cost of one
command round trip, so the ratio should be close to 1 for any size worth measuring.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import image
from bench.registry import BUILD_DIR, Bench, register
from harness.kvm.system import Kvm
from harness.lib.guestvm import GuestVm
from harness.memory.memtouch import CMD_WRITE, DESC_SIZE, MemTouch

SLOT = 1
GPA = 1 << 32
PAGE = 4096
PATTERN = 0x5EED


def _vm(kvm: Kvm, mib: int, cls: type[GuestVm] = GuestVm) -> tuple[MemTouch, int]:
    mt = MemTouch(cls(kvm, "memtouch", "long64"))
    try:
        mt.vm.add_memslot(GPA, mib << 20, slot=SLOT)
        gva = mt.map_slot(SLOT, page_size=PAGE)
    except BaseException:
        mt.close()
        raise
    return mt, gva


def harness_demand_fault(mib: int) -> float:
    """Pages/s of one first-touch pass over a fresh `mib` MiB slot."""
    npages = (mib << 20) // PAGE
    kvm = Kvm()
    try:
        mt, gva = _vm(kvm, mib)
        try:
            mt.read(gva, 0)  # untimed: first KVM_RUN, guest start-up
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            res = mt.write(gva, mib << 20, PATTERN, stride=PAGE)
            t = time.clock_gettime(time.CLOCK_MONOTONIC) - t0
            if res.count != npages:
                raise RuntimeError(f"memtouch wrote {res.count} words, expected {npages}")
            mt.done()
        finally:
            mt.close()
    finally:
        kvm.close()
    return npages / t


def _make_image(mib: int, d: Path) -> None:
    kvm = Kvm()
    try:
        mt, gva = _vm(kvm, mib, image.RecordingGuestVm)
        try:
            image.dump(mt.vm, d, {"desc": mt.mailbox.gpa, "desc_size": DESC_SIZE, "gva": gva,
                                  "slot_gpa": GPA, "slot_size": mib << 20, "pattern": PATTERN,
                                  "cmd_write": CMD_WRITE})
        finally:
            mt.close()
    finally:
        kvm.close()


def c_cmd(mib: int) -> list[str]:
    d = image.cached_dir(("demand", mib), lambda d: _make_image(mib, d))
    return [str(BUILD_DIR / "demand_fault"), str(d)]


DEMAND_FAULT = register(Bench(
    name="demand_fault",
    label="demand faults on fresh anonymous memory (memtouch, 4 KiB stride)",
    c_cmd=c_cmd,
    c_rate_key="pages_per_s",
    py=harness_demand_fault,
    count_option="fault_mib",
    default_count=128,
    target=0.9,
    unit="pages/s",
    params={"guest_page": "4K", "stride": PAGE, "backing": "anonymous private"},
))
