"""Anonymous memory keeps its kind's page size on every kernel: `anon`, `anon-shared` and a VM's own
boot memory are MADV_NOHUGEPAGE ('nh' in smaps), `anon-thp` MADV_HUGEPAGE ('hg'), also after a remap
(the runner's Debian kernels have THP "always": without the advice `anon` got THPs there, not here)."""

from __future__ import annotations

import re

import pytest

from harness import memory
from harness.lib.guestvm import GuestVm


def _vmflags(addr: int) -> set[str]:
    with open("/proc/self/smaps") as f:
        text = f.read()
    for blk in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(x, 16) for x in blk.split(None, 1)[0].split("-"))
        if lo <= addr < hi:
            line = next(ln for ln in blk.splitlines() if ln.startswith("VmFlags:"))
            return set(line.split()[1:])
    raise AssertionError(f"{addr:#x} is not mapped")


@pytest.mark.parametrize(("kind", "flag"), [("anon", "nh"), ("anon-shared", "nh"), ("anon-thp", "hg")])
def test_anonymous_kinds_keep_their_page_size(kvm, kind, flag):
    with GuestVm(kvm, "memtouch") as vm:
        b = memory.create(kind, 4 << 20, vm=vm)
        try:
            assert flag in _vmflags(b.addr), f"{kind}: {_vmflags(b.addr)}"
            b.remap(2 << 20)
            assert flag in _vmflags(b.addr + (2 << 20)), f"{kind} after remap: {_vmflags(b.addr + (2 << 20))}"
        finally:
            b.close()


def test_a_vms_own_memory_has_small_pages(kvm):
    with GuestVm(kvm, "memtouch") as vm:
        assert "nh" in _vmflags(vm.boot.hva)
