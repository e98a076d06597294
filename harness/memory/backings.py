"""Guest memory backings, one class per kind, behind one interface.

(Over 400 lines: one class per backing kind behind one interface, so a kind's differences sit side
by side; the pool, mounts and ledger are their own modules.)

Every backing offers: the host mapping (`addr`, `view()`), its fd where there is one, the page size
that backs it, `punch_hole(offset, length)` (release memory: reads give zeros afterwards),
`remap(offset, length)` (replace the host mapping in place, MAP_FIXED), `footprint()` (bytes the
kernel holds for it now, measured the most direct way the kind allows) and `features` (what it
supports). `Vm.add_memslot(gpa, size, backing=b)` binds any of them, guest_memfd included.
"""

from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.kvm.caps import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Cap
from harness.kvm.checks import check_size
from harness.kvm.errors import BadInput, HarnessError, KvmError
from harness.memory import hostmem, usage
from harness.memory.hugepages import PAGE_1G, PAGE_2M, size_name
from harness.memory.mounts import MountError, Mounts, default_mounts
from harness.unsupported import Unsupported

if TYPE_CHECKING:
    from harness.kvm.vm import Vm

PAGE_4K = 4096
MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26


class BackingUnavailable(Unsupported):
    """This kind of backing cannot be made here; the message is the reason (cases skip on it)."""


class Feature(enum.Flag):
    NONE = 0
    FD = enum.auto()  # has a file descriptor
    SHARED = enum.auto()  # MAP_SHARED: other mappings of the object see the same pages
    REMAP_KEEPS_DATA = enum.auto()  # remap() maps the same object again: contents survive
    HUGE = enum.auto()  # backed by pages larger than 4 KiB (THP or hugetlb)
    HUGETLB = enum.auto()  # takes pages from a hugetlb pool (reserve them first)
    GUEST_MEMFD = enum.auto()  # bound with KVM_MEM_GUEST_MEMFD (KVM_SET_USER_MEMORY_REGION2)
    NEEDS_VM = enum.auto()  # created through a VM fd
    READONLY_SLOT = enum.auto()  # may back a KVM_MEM_READONLY slot
    SLOT_CHANGES = enum.auto()  # its slot may be moved and have its flags changed
    FILE = enum.auto()  # a named file on a filesystem
    # convertible (harness.memory.private): a guest_memfd private side and a shared side; needs a VM
    # type with private memory, so names() leaves it out unless asked for
    PRIVATE = enum.auto()
    DAX = enum.auto()  # persistent memory mapped through DAX (harness.memory.dax): ZONE_DEVICE pages, no page cache
    # a device's own fixed memory (devdax): nothing to punch or truncate (fallocate: ENODEV), no
    # read(2) (EINVAL); the memory never goes back to the kernel, the mapping is the only view
    DEVICE = enum.auto()


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Backing:
    """Base of all kinds. Subclasses set the class attributes and make `addr`/`fd` in __init__."""

    kind: ClassVar[str] = ""
    page_size: int = PAGE_4K
    features: ClassVar[Feature] = Feature.READONLY_SLOT | Feature.SLOT_CHANGES
    punch_method: ClassVar[str] = ""
    footprint_method: ClassVar[str] = ""

    # KVM_MEM_GUEST_MEMFD binding (only GuestMemfdBacking sets these)
    guest_memfd: int = -1
    guest_memfd_offset: int = 0

    def __init__(self, size: int) -> None:
        self.closed = True  # a size refused below leaves nothing for __del__ to close
        size = check_size(type(self).__name__, "size", size)
        self.length = _round_up(size, self.page_size)
        self.addr = 0
        self.fd = -1
        self.path: Path | None = None
        self.closed = False
        self._mapping: hostmem.Mapping | None = None

    # ---- host view -----------------------------------------------------------------------------
    @property
    def buf(self) -> Any:
        return self.view()

    @property
    def mapping(self) -> hostmem.Mapping | None:
        """The host mapping (flags, fd offset) when the harness made one; None otherwise."""
        return self._mapping

    def view(self, offset: int = 0, length: int | None = None) -> Any:
        """A writable buffer over [offset, offset+length) of the host mapping."""
        n = self.length - offset if length is None else length
        self._check_range(offset, n)
        return hostmem.view(self.addr + offset, n)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.view(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        self.view(offset, len(data))[:] = data

    # ---- operations ----------------------------------------------------------------------------
    def punch_hole(self, offset: int, length: int) -> None:
        """Release [offset, offset+length): the memory goes back to the kernel, reads give zeros."""
        self._check_range(offset, length)
        hostmem.punch_hole(self.fd, offset, length)

    def remap(self, offset: int = 0, length: int | None = None) -> None:
        """Replace the host mapping of [offset, offset+length) in place (MAP_FIXED, same address)."""
        n = self.length - offset if length is None else length
        self._check_range(offset, n)
        m = self._mapping
        assert m is not None
        hostmem.mmap(n, m.prot, m.flags | hostmem.MAP_FIXED, m.fd, m.offset + offset, self.addr + offset)

    def footprint(self) -> int:
        """Bytes the kernel holds for this backing now (see footprint_method for how)."""
        return usage.allocated_bytes(self.fd)

    def supports(self, feature: Feature) -> bool:
        return feature in self.features

    # ---- lifetime ------------------------------------------------------------------------------
    def _map(self, flags: int, fd: int = -1, addr: int = 0) -> None:
        self._mapping = hostmem.Mapping(self.length, flags=flags, fd=fd, addr=addr)
        self.addr = self._mapping.addr

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        self.addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def describe(self) -> str:
        s = f"{self.kind} {self.length:#x} bytes at {self.addr:#x}, {size_name(self.page_size)} pages"
        if self.fd >= 0:
            s += f", fd {self.fd}"
        if self.path is not None:
            s += f", {self.path}"
        return s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def _check_range(self, offset: int, length: int) -> None:
        ints = isinstance(offset, int) and isinstance(length, int)
        if not ints or offset < 0 or length < 0 or offset + length > self.length:
            shown = f"{offset:#x}+{length:#x}" if ints else f"{offset!r}+{length!r}"
            raise BadInput(f"{self.kind} backing", "range", shown,
                           f"is outside the {self.kind} backing of {self.length:#x} bytes")
        if self.closed:  # its address is 0 now: a view would fault the process
            raise HarnessError(f"the {self.kind} backing is closed: its memory is unmapped")


# ---- anonymous memory ----------------------------------------------------------------------------
class AnonBacking(Backing):
    """MAP_PRIVATE | MAP_ANONYMOUS: the default memory of most VMMs."""

    kind = "anon"
    features = Feature.READONLY_SLOT | Feature.SLOT_CHANGES
    punch_method = "madvise(MADV_DONTNEED)"
    footprint_method = "mincore (resident pages of the mapping)"
    _flags = hostmem.MAP_PRIVATE | hostmem.MAP_ANONYMOUS
    _punch_advice = hostmem.MADV_DONTNEED

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._map(self._flags)
        self._small_pages(0, self.length)

    def _small_pages(self, offset: int, length: int) -> None:
        # 4 KiB pages on every kernel: with THP "always" (Debian's kernels, the runner's guests) a
        # plain anonymous range got THPs, so `anon` was `anon-thp` there and not here (madvise)
        hostmem.madvise(self.addr + offset, length, hostmem.MADV_NOHUGEPAGE)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        hostmem.madvise(self.addr + offset, length, self._punch_advice)

    def remap(self, offset: int = 0, length: int | None = None) -> None:
        """A fresh anonymous mapping: the old pages go, the range reads zeros."""
        super().remap(offset, length)
        self._small_pages(offset, self.length - offset if length is None else length)

    def footprint(self) -> int:
        return usage.resident_bytes(self.addr, self.length)


class AnonSharedBacking(AnonBacking):
    """MAP_SHARED | MAP_ANONYMOUS (shmem underneath; MADV_DONTNEED would not free it, MADV_REMOVE does)."""

    kind = "anon-shared"
    features = AnonBacking.features | Feature.SHARED
    punch_method = "madvise(MADV_REMOVE)"
    _flags = hostmem.MAP_SHARED | hostmem.MAP_ANONYMOUS
    _punch_advice = hostmem.MADV_REMOVE


class AnonThpBacking(AnonBacking):
    """Private anonymous memory, 2 MiB aligned, madvise(MADV_HUGEPAGE) so faults get THPs."""

    kind = "anon-thp"
    features = AnonBacking.features | Feature.HUGE
    page_size = PAGE_2M
    footprint_method = "mincore (resident pages; anon_huge_bytes() tells how much is THP)"
    THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

    def __init__(self, size: int) -> None:
        mode = _bracketed(self.THP_ENABLED)
        if mode is None:
            raise BackingUnavailable(f"no transparent hugepages on this kernel ({self.THP_ENABLED} missing)")
        if mode == "never":
            raise BackingUnavailable(f"transparent hugepages are disabled ({self.THP_ENABLED} = never)")
        Backing.__init__(self, size)
        # over-map, keep a 2 MiB aligned window, give the slack back
        raw = hostmem.mmap(self.length + PAGE_2M)
        start = _round_up(raw, PAGE_2M)
        if start > raw:
            hostmem.munmap(raw, start - raw)
        tail = raw + self.length + PAGE_2M - (start + self.length)
        if tail:
            hostmem.munmap(start + self.length, tail)
        self._mapping = hostmem.Mapping(self.length, flags=self._flags | hostmem.MAP_FIXED, addr=start)
        self.addr = start
        hostmem.madvise(self.addr, self.length, hostmem.MADV_HUGEPAGE)

    def remap(self, offset: int = 0, length: int | None = None) -> None:
        super().remap(offset, length)
        n = self.length - offset if length is None else length
        hostmem.madvise(self.addr + offset, n, hostmem.MADV_HUGEPAGE)

    def thp_bytes(self) -> int:
        return usage.anon_huge_bytes(self.addr, self.length)


def _bracketed(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else text.strip()


# ---- shared file-backed memory ------------------------------------------------------------------
class _FdBacking(Backing):
    features = (Feature.FD | Feature.SHARED | Feature.REMAP_KEEPS_DATA | Feature.READONLY_SLOT
                | Feature.SLOT_CHANGES)
    punch_method = "fallocate(PUNCH_HOLE|KEEP_SIZE)"
    footprint_method = "st_blocks of the file"

    def _adopt(self, fd: int) -> None:
        self.fd = fd
        try:
            os.ftruncate(fd, self.length)
            self._map(hostmem.MAP_SHARED, fd)
        except BaseException:
            self.close()
            raise

    def read_fd(self, offset: int, length: int) -> bytes:
        """Read through the file (pread), not the mapping: a second view of the same pages."""
        return os.pread(self.fd, length, offset)


class ShmemBacking(_FdBacking):
    """memfd_create(2): shmem, what QEMU's memory-backend-memfd uses."""

    kind = "shmem"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._adopt(os.memfd_create(f"kvm-harness-{self.kind}", MFD_CLOEXEC))


class _MountedFileBacking(_FdBacking):
    features = _FdBacking.features | Feature.FILE

    def _open_in(self, directory: Path, mounts: Mounts) -> None:
        self.path = mounts.new_file(directory, self.kind)
        self._adopt(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


class TmpfsBacking(_MountedFileBacking):
    """A file on a private tmpfs mount."""

    kind = "tmpfs"

    def __init__(self, size: int, mounts: Mounts | None = None) -> None:
        super().__init__(size)
        m = mounts or default_mounts()
        try:
            d = m.tmpfs()
        except MountError as e:
            raise BackingUnavailable(str(e)) from e
        self._open_in(d, m)


class HugetlbBacking(_FdBacking):
    """memfd_create(MFD_HUGETLB | MFD_HUGE_<size>): hugetlb pages, reserved at mmap time."""

    kind = "hugetlb"
    features = _FdBacking.features | Feature.HUGE | Feature.HUGETLB
    footprint_method = "st_blocks of the file (the pool's free_hugepages moves with it)"

    def __init__(self, size: int, page_size: int = PAGE_2M) -> None:
        self.page_size = page_size
        self.kind = f"hugetlb-{_short(page_size)}"
        super().__init__(size)
        flags = MFD_CLOEXEC | MFD_HUGETLB | (page_size.bit_length() - 1) << MFD_HUGE_SHIFT
        try:
            fd = os.memfd_create(f"kvm-harness-{self.kind}", flags)
        except OSError as e:
            raise BackingUnavailable(f"memfd_create(MFD_HUGETLB, {size_name(page_size)}): {e}") from e
        self._adopt_huge(fd)

    def _adopt_huge(self, fd: int) -> None:
        try:
            self._adopt(fd)
        except OSError as e:
            free = _free_pages(self.page_size)
            raise BackingUnavailable(
                f"mapping {self.length // self.page_size} {size_name(self.page_size)} hugepages failed "
                f"({e}); the pool has {free} free (reserve them with the hugepages fixture)") from e

    def pool_free(self) -> int:
        return _free_pages(self.page_size)


class HugetlbfsBacking(HugetlbBacking):
    """A file on a private hugetlbfs mount with pagesize=<size>."""

    kind = "hugetlbfs"
    features = HugetlbBacking.features | Feature.FILE

    def __init__(self, size: int, page_size: int = PAGE_2M, mounts: Mounts | None = None) -> None:
        self.page_size = page_size
        self.kind = f"hugetlbfs-{_short(page_size)}"
        Backing.__init__(self, size)
        m = mounts or default_mounts()
        try:
            d = m.hugetlbfs(page_size)
        except MountError as e:
            raise BackingUnavailable(str(e)) from e
        self.path = m.new_file(d, self.kind)
        self._adopt_huge(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _short(page_size: int) -> str:
    return "1g" if page_size == PAGE_1G else f"{page_size >> 20}m"


def _free_pages(page_size: int) -> int | str:
    try:
        return usage.hugepage_counter(page_size, "free_hugepages")
    except OSError:
        return "?"


class FileBacking(_MountedFileBacking):
    """MAP_SHARED on a regular file of a disk filesystem: ext4 on a loop device, or the host's own fs."""

    kind = "file"
    footprint_method = "st_blocks of the file (blocks on disk; mincore for the page cache)"

    def __init__(self, size: int, mounts: Mounts | None = None, where: str = "ext4-loop") -> None:
        super().__init__(size)
        m = mounts or default_mounts()
        try:
            d = m.ext4() if where == "ext4-loop" else m.hostfs()
        except MountError as e:
            raise BackingUnavailable(str(e)) from e
        self.where = where
        self._open_in(d, m)

    def cached(self) -> int:
        return usage.resident_bytes(self.addr, self.length)


class HostFileBacking(FileBacking):
    kind = "file-hostfs"

    def __init__(self, size: int, mounts: Mounts | None = None) -> None:
        super().__init__(size, mounts, where="hostfs")


# ---- guest_memfd ---------------------------------------------------------------------------------
class GuestMemfdBacking(Backing):
    """KVM_CREATE_GUEST_MEMFD on a VM, mapped by the host (GUEST_MEMFD_FLAG_MMAP, and INIT_SHARED so
    the host may write it), bound to slots with KVM_MEM_GUEST_MEMFD via KVM_SET_USER_MEMORY_REGION2
    with the mapping as userspace_addr."""

    kind = "guest_memfd"
    features = Feature.FD | Feature.SHARED | Feature.REMAP_KEEPS_DATA | Feature.GUEST_MEMFD | Feature.NEEDS_VM
    punch_method = "fallocate(PUNCH_HOLE|KEEP_SIZE) on the guest_memfd"
    footprint_method = "mincore of the mapping (st_blocks of a guest_memfd stays 0)"

    def __init__(self, size: int, vm: Vm, flags: int | None = None, mmap: bool = True) -> None:
        super().__init__(size)
        self.vm = vm
        if not vm.check_extension(Cap.GUEST_MEMFD):
            raise BackingUnavailable("KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel")
        offered = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
        if flags is None:
            flags = offered & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        if mmap and not (flags & GUEST_MEMFD_FLAG_MMAP and flags & GUEST_MEMFD_FLAG_INIT_SHARED):
            raise BackingUnavailable(
                f"guest_memfd cannot be mapped and written by the host here (KVM_CAP_GUEST_MEMFD_FLAGS = "
                f"{offered:#x}; needs MMAP|INIT_SHARED = 0x3)")
        self.flags = flags
        try:
            self.fd = vm.create_guest_memfd(self.length, flags)
        except KvmError as e:
            raise BackingUnavailable(f"KVM_CREATE_GUEST_MEMFD failed: {e}") from e
        self.guest_memfd = self.fd
        if mmap:
            try:
                self._map(hostmem.MAP_SHARED, self.fd)
            except BaseException:
                self.close()
                raise

    def footprint(self) -> int:
        if not self.addr:
            raise HarnessError("an unmapped guest_memfd has no measurable footprint here")
        return usage.resident_bytes(self.addr, self.length)

    def close(self) -> None:
        super().close()
        self.guest_memfd = -1

    def describe(self) -> str:
        return super().describe() + f", flags={self.flags:#x}"
