"""Guest memory backings and their registry: a case names a kind and gets it.

    from harness import memory
    b = memory.create("hugetlb-2m", 4 << 20)            # or with vm= for guest_memfd
    vm.add_memslot(1 << 40, 4 << 20, backing=b)

    @pytest.mark.parametrize("kind", memory.names())     # every backing
    @pytest.mark.parametrize("kind", memory.names(require=Feature.READONLY_SLOT))

Kinds: anon, anon-shared, anon-thp, shmem, tmpfs, hugetlb-2m, hugetlb-1g (memfd MFD_HUGETLB),
hugetlbfs-2m, hugetlbfs-1g (file on a hugetlbfs mount), guest_memfd (KVM_CREATE_GUEST_MEMFD with
MMAP|INIT_SHARED), file (ext4 on a loop device), file-hostfs (the machine's own filesystem), devdax and
fsdax (persistent memory through DAX: harness.memory.dax; skip without pmem), and
private (harness.memory.private: a guest_memfd private side + anonymous shared side, for
SW-protected VMs; names() lists it only with require=Feature.PRIVATE).
Pytest fixtures that reserve hugepages and skip with the reason live in harness.pytest.memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.kvm.checks import check_size
from harness.kvm.errors import HarnessError
from harness.memory.backings import (
    PAGE_4K,
    AnonBacking,
    AnonSharedBacking,
    AnonThpBacking,
    Backing,
    BackingUnavailable,
    Feature,
    FileBacking,
    GuestMemfdBacking,
    HostFileBacking,
    HugetlbBacking,
    HugetlbfsBacking,
    ShmemBacking,
    TmpfsBacking,
)
from harness.memory.dax import DevDaxBacking, FsDaxBacking
from harness.memory.hugepages import PAGE_1G, PAGE_2M, HugepagePool, HugepagesUnavailable, pages_for
from harness.memory.mounts import Mounts
from harness.memory.private import PrivateMemory

if TYPE_CHECKING:
    from harness.kvm.vm import Vm

__all__ = [
    "KINDS", "PAGE_1G", "PAGE_2M", "PAGE_4K", "Backing", "BackingKind", "BackingUnavailable", "Feature",
    "HugepagePool", "HugepagesUnavailable", "Mounts", "create", "kind", "names",
]


@dataclass(frozen=True)
class BackingKind:
    """What the registry knows about a kind without making one."""

    name: str
    cls: type[Backing]
    page_size: int
    features: Feature
    make: Callable[[int, Vm | None, Mounts | None], Backing]

    def hugepages(self, size: int) -> tuple[int, int] | None:
        """(page size, pages) this kind takes from a hugetlb pool for `size` bytes, or None."""
        if Feature.HUGETLB not in self.features:
            return None
        return self.page_size, pages_for(size, self.page_size)

    def min_size(self, size: int) -> int:
        """The backing size for a slot of `size` bytes (whole pages of this kind)."""
        return max(size, self.page_size)

    def supports(self, feature: Feature) -> bool:
        return feature in self.features


def _needs_vm(name: str, vm: Vm | None) -> Vm:
    if vm is None:
        raise HarnessError(f"backing {name!r} is created through a VM: pass vm=")
    return vm


KINDS: dict[str, BackingKind] = {
    k.name: k
    for k in (
        BackingKind("anon", AnonBacking, PAGE_4K, AnonBacking.features, lambda s, v, m: AnonBacking(s)),
        BackingKind("anon-shared", AnonSharedBacking, PAGE_4K, AnonSharedBacking.features,
                    lambda s, v, m: AnonSharedBacking(s)),
        BackingKind("anon-thp", AnonThpBacking, PAGE_2M, AnonThpBacking.features,
                    lambda s, v, m: AnonThpBacking(s)),
        BackingKind("shmem", ShmemBacking, PAGE_4K, ShmemBacking.features, lambda s, v, m: ShmemBacking(s)),
        BackingKind("tmpfs", TmpfsBacking, PAGE_4K, TmpfsBacking.features,
                    lambda s, v, m: TmpfsBacking(s, m)),
        BackingKind("hugetlb-2m", HugetlbBacking, PAGE_2M, HugetlbBacking.features,
                    lambda s, v, m: HugetlbBacking(s, PAGE_2M)),
        BackingKind("hugetlb-1g", HugetlbBacking, PAGE_1G, HugetlbBacking.features,
                    lambda s, v, m: HugetlbBacking(s, PAGE_1G)),
        BackingKind("hugetlbfs-2m", HugetlbfsBacking, PAGE_2M, HugetlbfsBacking.features,
                    lambda s, v, m: HugetlbfsBacking(s, PAGE_2M, m)),
        BackingKind("hugetlbfs-1g", HugetlbfsBacking, PAGE_1G, HugetlbfsBacking.features,
                    lambda s, v, m: HugetlbfsBacking(s, PAGE_1G, m)),
        BackingKind("guest_memfd", GuestMemfdBacking, PAGE_4K, GuestMemfdBacking.features,
                    lambda s, v, m: GuestMemfdBacking(s, _needs_vm("guest_memfd", v))),
        BackingKind("private", PrivateMemory, PAGE_4K, PrivateMemory.features,
                    lambda s, v, m: PrivateMemory(_needs_vm("private", v), s)),
        BackingKind("file", FileBacking, PAGE_4K, FileBacking.features, lambda s, v, m: FileBacking(s, m)),
        BackingKind("file-hostfs", HostFileBacking, PAGE_4K, HostFileBacking.features,
                    lambda s, v, m: HostFileBacking(s, m)),
        BackingKind("devdax", DevDaxBacking, PAGE_2M, DevDaxBacking.features, lambda s, v, m: DevDaxBacking(s)),
        BackingKind("fsdax", FsDaxBacking, PAGE_4K, FsDaxBacking.features, lambda s, v, m: FsDaxBacking(s, m)),
    )
}


def names(*, require: Feature = Feature.NONE, exclude: Feature = Feature.NONE,
          page_sizes: tuple[int, ...] | None = None) -> list[str]:
    """Registered kinds that have every `require` feature, none of `exclude`, and (if given) one of
    `page_sizes` as their page size. PRIVATE kinds (a SW-protected VM's convertible memory) only
    when `require` names PRIVATE: an ordinary case's VM cannot use them."""
    if Feature.PRIVATE not in require:
        exclude |= Feature.PRIVATE
    return [
        k.name for k in KINDS.values()
        if require in k.features and not (exclude & k.features)
        and (page_sizes is None or k.page_size in page_sizes)
    ]


def kind(name: str) -> BackingKind:
    try:
        return KINDS[name]
    except KeyError:
        raise HarnessError(f"unknown backing {name!r} (known: {', '.join(KINDS)})") from None


def create(name: str, size: int, *, vm: Vm | None = None, mounts: Mounts | None = None) -> Backing:
    """A backing of kind `name` with at least `size` bytes (whole pages of the kind).

    Raises BackingUnavailable with the reason when this machine cannot make it (no hugepages in the
    pool, no guest_memfd mmap, no loop device...). Hugetlb kinds need their pages reserved first
    (harness.pytest.memory does that)."""
    k = kind(name)
    size = check_size(f"memory.create({name!r})", "size", size)
    return k.make(k.min_size(size), vm, mounts)
