"""Unit tests of harness.memory's pure parts: the memtouch word/checksum contract, the memslot model,
the registry, the hugepage ledger (against a fake sysfs), mount bookkeeping, and host-only backings."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from harness import memory
from harness.kvm.caps import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from harness.kvm.errors import HarnessError
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K, Feature, hugepages, mounts, usage
from harness.memory.hugepages import HugepagePool, HugepagesUnavailable
from harness.memory.ledger import start_time
from harness.memory.memtouch import (
    MASK,
    MIX,
    NONE,
    Result,
    checksum,
    host_check,
    host_fill,
    host_nonzero,
    offsets,
    word,
    words,
)
from harness.memory.model import MemslotModel, SlotReq

# ---- memtouch contract --------------------------------------------------------------------------


def test_word_is_a_bijection_of_pattern_xor_offset():
    assert word(0, 0) == 0
    assert word(1, 0) == MIX
    assert word(5, 8) == ((5 ^ 8) * MIX) & MASK
    assert word(3, 3) == 0  # the one zero: tests pick patterns that are not offsets
    assert len({word(7, o) for o in range(0, 1 << 16, 8)}) == 1 << 13


def test_offsets_match_the_guest_loop():
    assert list(offsets(32, 8)) == [0, 8, 16, 24]
    assert list(offsets(33, 16)) == [0, 16]
    assert list(offsets(7, 8)) == []
    assert list(offsets(8, 4096)) == [0]


def test_words_and_checksum():
    w = words(9, 64, 16, base=32)
    assert list(w) == [word(9, 32 + o) for o in (0, 16, 32, 48)]
    assert checksum([1, 2, 3]) == (1 * 31 + 2) * 31 + 3
    assert checksum([MASK, MASK]) == (MASK * 31 + MASK) & MASK


def test_host_fill_and_check_round_trip():
    buf = bytearray(4096)
    host_fill(buf, 0x1234, 64)
    assert host_check(buf, 0x1234, 64) == (0, None)
    assert int.from_bytes(buf[128:136], "little") == word(0x1234, 128)
    assert buf[8:64] == bytes(56)  # only every stride
    buf[256:264] = bytes(8)
    buf[512:520] = bytes(8)
    assert host_check(buf, 0x1234, 64) == (2, 256)
    assert host_nonzero(bytearray(64), 8) == (0, None)
    assert host_nonzero(bytearray(16) + b"\1" + bytearray(15), 8) == (1, 16)


def test_host_check_with_base_is_a_subrange():
    buf = bytearray(1024)
    host_fill(buf, 77, 8)
    assert host_check(memoryview(buf)[512:], 77, 8, base=512) == (0, None)
    assert host_check(memoryview(buf)[512:], 77, 8)[0] > 0
    with pytest.raises(HarnessError):
        host_fill(buf, 1, 12)


def test_result_from_guest_args():
    r = Result.from_args((5, 0, NONE, 10, 2))
    assert (r.checksum, r.bad, r.first, r.count, r.cmd) == (5, 0, None, 10, 2)
    assert Result.from_args((0, 3, 64, 10, 3)).first == 64
    with pytest.raises(HarnessError):
        Result.from_args((1, 2))


# ---- the memslot model --------------------------------------------------------------------------
H = 0x7F00_0000_0000


def _model() -> MemslotModel:
    m = MemslotModel(nr_memslots=32764)
    assert m.submit(SlotReq(0, 1 << 32, 2 << 20, H)) == 0
    return m


@pytest.mark.parametrize(("req", "v2", "want"), [
    (SlotReq(1, 1 << 33, 4096, H), False, 0),
    (SlotReq(1, (1 << 32) + 4096, 4096, H), False, errno.EEXIST),
    (SlotReq(1, (1 << 32) - 4096, 8192, H), False, errno.EEXIST),
    (SlotReq(1, (1 << 32) - 4096, 4096, H), False, 0),  # touching is not overlapping
    (SlotReq(1, 1 << 33, 4096, H, 1 << 3), False, errno.EINVAL),
    (SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD, 5), False, errno.EINVAL),  # v1 has no gmem flag
    (SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD, 5), True, 0),
    (SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, 5), True, errno.EINVAL),
    (SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES, 5), True, errno.EINVAL),
    (SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD, 5, 0x800), True, errno.EINVAL),
    (SlotReq(1, 1 << 33, 0x1800, H), False, errno.EINVAL),
    (SlotReq(1, (1 << 33) + 8, 4096, H), False, errno.EINVAL),
    (SlotReq(1, 1 << 33, 4096, H + 8), False, errno.EINVAL),
    (SlotReq(1, 1 << 33, 4096, 0xFFFF_8000_0000_0000), False, errno.EINVAL),
    (SlotReq(32764, 1 << 33, 4096, H), False, errno.EINVAL),
    (SlotReq(32763, 1 << 33, 4096, H), False, 0),
    (SlotReq(1 << 16 | 1, 1 << 33, 4096, H), False, errno.EINVAL),
    (SlotReq(1, (1 << 64) - 4096, 8192, H), False, errno.EINVAL),
    (SlotReq(1, 1 << 52, 4096, H), False, errno.EINVAL),
    (SlotReq(1, 1 << 48, 4096, H), False, 0),  # beyond MAXPHYADDR is fine for a memslot
    (SlotReq(1, 1 << 33, 0, H), False, errno.EINVAL),  # delete a missing slot
    (SlotReq(0, 1 << 32, 0, H), False, 0),  # delete
    (SlotReq(0, 1 << 32, 4 << 20, H), False, errno.EINVAL),  # resize
    (SlotReq(0, 1 << 32, 2 << 20, H + 4096), False, errno.EINVAL),  # new hva
    (SlotReq(0, 1 << 32, 2 << 20, H, KVM_MEM_READONLY), False, errno.EINVAL),
    (SlotReq(0, 1 << 32, 2 << 20, H, KVM_MEM_LOG_DIRTY_PAGES), False, 0),
    (SlotReq(0, 1 << 34, 2 << 20, H), True, 0),  # move
    (SlotReq(0, 1 << 32, 2 << 20, H), False, 0),  # identical: nothing to do
])
def test_model_predictions(req, v2, want):
    assert _model().predict(req, v2) == want


def test_model_moves_and_guest_memfd_is_immutable():
    m = _model()
    assert m.submit(SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD, 5), True) == 0
    assert m.predict(SlotReq(1, 1 << 33, 4096, H, KVM_MEM_GUEST_MEMFD, 5), True) == errno.EINVAL
    assert m.predict(SlotReq(1, 1 << 34, 4096, H, KVM_MEM_GUEST_MEMFD, 5), True) == errno.EINVAL
    assert m.predict(SlotReq(1, 1 << 33, 4096, H, 0), True) == errno.EINVAL
    assert m.submit(SlotReq(1, 1 << 33, 0, H, KVM_MEM_GUEST_MEMFD, 5), True) == 0
    assert m.submit(SlotReq(0, 1 << 40, 2 << 20, H), False) == 0
    assert m.slot_at(1 << 40).slot == 0 and m.slot_at(1 << 32) is None
    # a moved slot no longer blocks its old range
    assert m.predict(SlotReq(2, 1 << 32, 4096, H), False) == 0
    assert "gpa=0x10000000000" in repr(m.slots[0])


def test_model_without_readonly_support():
    m = MemslotModel(10, readonly=False)
    assert m.predict(SlotReq(1, 0, 4096, H, KVM_MEM_READONLY)) == errno.EINVAL


# ---- registry -----------------------------------------------------------------------------------
def test_registry_has_every_kind_with_its_page_size():
    assert memory.names() == ["anon", "anon-shared", "anon-thp", "shmem", "tmpfs", "hugetlb-2m", "hugetlb-1g",
                              "hugetlbfs-2m", "hugetlbfs-1g", "guest_memfd", "file", "file-hostfs", "devdax", "fsdax"]
    assert memory.kind("hugetlb-1g").page_size == PAGE_1G
    assert memory.kind("anon-thp").page_size == PAGE_2M
    assert memory.kind("shmem").page_size == PAGE_4K
    for k in memory.KINDS.values():
        assert k.cls.punch_method and k.cls.footprint_method, k.name


def test_registry_filters():
    assert "guest_memfd" not in memory.names(require=Feature.READONLY_SLOT)
    assert memory.names(require=Feature.GUEST_MEMFD) == ["guest_memfd"]
    assert set(memory.names(require=Feature.HUGETLB)) == {"hugetlb-2m", "hugetlb-1g", "hugetlbfs-2m",
                                                          "hugetlbfs-1g"}
    assert "anon-thp" not in memory.names(exclude=Feature.HUGE)
    assert memory.names(page_sizes=(PAGE_1G,)) == ["hugetlb-1g", "hugetlbfs-1g"]
    assert set(memory.names(require=Feature.FILE)) == {"tmpfs", "hugetlbfs-2m", "hugetlbfs-1g", "file",
                                                       "file-hostfs", "fsdax"}


def test_kind_hugepage_needs_and_sizes():
    assert memory.kind("hugetlb-2m").hugepages(5 << 20) == (PAGE_2M, 3)
    assert memory.kind("hugetlbfs-1g").hugepages(4096) == (PAGE_1G, 1)
    assert memory.kind("anon").hugepages(1 << 30) is None
    assert memory.kind("hugetlb-1g").min_size(4096) == PAGE_1G
    assert memory.kind("anon").min_size(4096) == 4096
    with pytest.raises(HarnessError, match="unknown backing"):
        memory.kind("nope")
    with pytest.raises(HarnessError, match="pass vm="):
        memory.create("guest_memfd", 4096)


# ---- host-only backings -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["anon", "anon-shared", "shmem"])
def test_punch_hole_releases_and_zeroes(name):
    with memory.create(name, 1 << 20) as b:
        host_fill(b.view(), 3, 8)
        assert b.footprint() == 1 << 20
        b.punch_hole(0x10000, 0x20000)
        assert b.footprint() == (1 << 20) - 0x20000
        assert host_nonzero(b.view(0x10000, 0x20000)) == (0, None)
        assert host_check(b.view(0, 0x10000), 3) == (0, None)
        with pytest.raises(HarnessError, match="outside"):
            b.punch_hole(1 << 20, 4096)
    assert b.closed and b.addr == 0


def test_folio_at_is_the_same_folio_from_each_of_its_pages():
    """usage.folio_at (pagemap + kpageflags): the folio around a mapped page, found the same from each of
    its pages; a hugepage-advised anonymous range gives a THP (2 MiB) or, with none to be had, 4 KiB."""
    with memory.create("anon-thp", PAGE_2M) as b:
        host_fill(b.view(), 5, PAGE_4K)
        f = usage.folio_at(b.addr + 0x5123)
        assert f.size in (PAGE_4K, PAGE_2M) and f.addr <= b.addr + 0x5000 < f.end, f.describe(b.addr)
        assert f.addr % f.size == 0 and f.large == (f.size > PAGE_4K)
        assert all(usage.folio_at(a) == f for a in (f.addr, f.end - PAGE_4K))
        assert f.has(usage.KPF_COMPOUND_HEAD) == f.large and f.describe(b.addr).startswith("[0x")
    with memory.create("anon", PAGE_4K) as b, pytest.raises(OSError, match="no PFN"):
        usage.folio_at(b.addr)  # never touched: nothing mapped


def test_remap_keeps_or_drops_data():
    with memory.create("shmem", 64 << 10) as s, memory.create("anon", 64 << 10) as a:
        for b in (s, a):
            b.write(0, b"x" * 8)
            b.remap()
        assert s.read(0, 8) == b"x" * 8 and s.read_fd(0, 8) == b"x" * 8
        assert a.read(0, 8) == bytes(8)
        assert s.supports(Feature.REMAP_KEEPS_DATA) and not a.supports(Feature.REMAP_KEEPS_DATA)


def test_backing_sizes_round_to_pages():
    with memory.create("anon", 100) as b:
        assert b.length == PAGE_4K
        assert "anon 0x1000 bytes" in b.describe()
    with pytest.raises(ValueError):
        memory.create("anon", 0)


# ---- hugepage ledger ----------------------------------------------------------------------------
class FakeSysfs:
    """nr_hugepages files that grant at most `limit` pages per size."""

    def __init__(self, root: Path, limit: dict[int, int] | None = None) -> None:
        self.root = root
        self.limit = limit or {}
        for ps in (PAGE_2M, PAGE_1G):
            d = root / f"hugepages-{ps // 1024}kB"
            d.mkdir(parents=True)
            (d / "nr_hugepages").write_text("0\n")
            (d / "free_hugepages").write_text("0\n")

    def pool(self, ledger: Path) -> HugepagePool:
        fake = self

        class P(HugepagePool):
            def write_nr(self, page_size: int, value: int) -> None:
                super().write_nr(page_size, min(value, fake.limit.get(page_size, 1 << 20)))

        return P(self.root, ledger)

    def nr(self, ps: int) -> int:
        return int((self.root / f"hugepages-{ps // 1024}kB" / "nr_hugepages").read_text())


def test_pool_grows_and_restores(tmp_path):
    fs = FakeSysfs(tmp_path / "sys")
    (tmp_path / "sys/hugepages-2048kB/nr_hugepages").write_text("3\n")
    led = tmp_path / "ledger.json"
    a, b = fs.pool(led), fs.pool(led)
    a.reserve(PAGE_2M, 4)
    b.reserve(PAGE_2M, 2)
    assert fs.nr(PAGE_2M) == 9
    assert a.holders(PAGE_2M) == {a.key: 4, b.key: 2}
    a.release_all()
    assert fs.nr(PAGE_2M) == 5
    b.release_all()
    assert fs.nr(PAGE_2M) == 3  # the old size, exactly
    assert json.loads(led.read_text())["pools"] == {}


def test_pool_shortfall_undoes_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(hugepages, "GIGANTIC_RETRY", 0.1)
    fs = FakeSysfs(tmp_path / "sys", {PAGE_1G: 1})
    p = fs.pool(tmp_path / "ledger.json")
    with pytest.raises(HugepagesUnavailable, match=r"2 more 1 GiB hugepages, it found 1"):
        p.reserve(PAGE_1G, 2)
    assert fs.nr(PAGE_1G) == 0 and not p.held
    p.reserve(PAGE_1G, 1)
    assert fs.nr(PAGE_1G) == 1
    p.release_all()
    assert fs.nr(PAGE_1G) == 0


def test_a_1g_shortfall_is_tried_again_a_2m_one_is_not(tmp_path, monkeypatch):
    """A 1 GiB page needs a whole contiguous range emptied: the first attempt can miss a page the
    previous case freed a moment ago (seen in the runner's guests); 2 MiB pages are never that."""
    fs = FakeSysfs(tmp_path / "sys", {PAGE_1G: 0, PAGE_2M: 0})
    p = fs.pool(tmp_path / "ledger.json")
    attempts = []

    def sleep(s: float) -> None:
        attempts.append(s)
        fs.limit[PAGE_1G] = fs.limit[PAGE_2M] = 2  # the range is free by the next attempt

    monkeypatch.setattr(hugepages.time, "sleep", sleep)
    with pytest.raises(HugepagesUnavailable, match=r"1 more 2 MiB hugepages, it found 0"):
        p.reserve(PAGE_2M, 1)
    assert attempts == [] and fs.nr(PAGE_2M) == 0
    fs.limit[PAGE_2M] = 0
    try:
        p.reserve(PAGE_1G, 2)
    except HugepagesUnavailable as e:  # an Unsupported: uncaught, the plugin would make it a skip
        pytest.fail(f"the 1 GiB shortfall was not tried again: {e}")
    assert len(attempts) == 1 and fs.nr(PAGE_1G) == 2 and p.held == {PAGE_1G: 2}
    p.release_all()
    assert fs.nr(PAGE_1G) == 0


def test_pool_waits_for_other_holders(tmp_path, monkeypatch):
    fs = FakeSysfs(tmp_path / "sys", {PAGE_1G: 1})
    led = tmp_path / "ledger.json"
    a, b = fs.pool(led), fs.pool(led)
    a.reserve(PAGE_1G, 1)
    with pytest.raises(HugepagesUnavailable, match="1 held by other"):
        b.reserve(PAGE_1G, 1, wait=0.2)
    monkeypatch.setattr(hugepages.time, "sleep", lambda s: a.release_all())
    b.reserve(PAGE_1G, 1, wait=5)
    assert b.held == {PAGE_1G: 1}
    b.release_all()
    assert fs.nr(PAGE_1G) == 0


def test_pool_drops_dead_holders_and_old_boots(tmp_path):
    fs = FakeSysfs(tmp_path / "sys")
    led = tmp_path / "ledger.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / "sys/hugepages-2048kB/nr_hugepages").write_text("7\n")  # 5 from a killed run
    boot = hugepages._boot_id()
    led.write_text(json.dumps({"boot_id": boot, "pools": {str(PAGE_2M): {"base": 2,
                                                                          "holders": {f"{dead}:x": 5}}}}))
    p = fs.pool(led)
    assert p.holders(PAGE_2M) == {}
    assert fs.nr(PAGE_2M) == 2  # the killed run's pages came off, the old size is back
    led.write_text(json.dumps({"boot_id": "another-boot", "pools": {str(PAGE_2M): {"base": 9,
                                                                                    "holders": {"1:x": 1}}}}))
    assert p.holders(PAGE_2M) == {}
    assert fs.nr(PAGE_2M) == 2


def test_pool_unavailable_reasons(tmp_path):
    p = HugepagePool(tmp_path, tmp_path / "l.json")
    assert "no 2 MiB hugepage pool" in p.unavailable_reason(PAGE_2M)
    with pytest.raises(HugepagesUnavailable, match="no 1 GiB hugepage pool"):
        p.reserve(PAGE_1G, 1)
    p.reserve(PAGE_1G, 0)  # nothing asked, nothing checked


# ---- mounts -------------------------------------------------------------------------------------
def test_mountpoints_parse_escapes():
    text = ("36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3 /dev/root rw\n"
            "37 35 0:5 / /tmp/kvm-harness-mnt.1.x/tmpfs rw - tmpfs none rw\n")
    assert mounts.mountpoints(text) == ["/mnt with space", "/tmp/kvm-harness-mnt.1.x/tmpfs"]


def test_owner_pid_and_stale_cleanup(tmp_path):
    assert mounts.owner_pid("/tmp/kvm-harness-mnt.1234.abcd") == 1234
    assert mounts.owner_pid("/tmp/other") is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"kvm-harness-mnt.{dead}.zz"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f"kvm-harness-mnt.{mounts.os.getpid()}.zz"
    live.mkdir()
    # (a ledger of its own: the machine's one is for real runs)
    assert mounts.cleanup_stale([str(tmp_path)], ledger_path=tmp_path / "ledger.json") == [str(stale)]
    assert not stale.exists() and live.exists()


def test_words_type():
    assert isinstance(words(1, 16), array)



def test_pool_parks_released_pages_for_the_keeper(tmp_path):
    """Released pages of a pool made with park=<keeper> stay in the pool; the next reservation takes
    them without growing it; unpark() takes them off and the old size is back."""
    fs = FakeSysfs(tmp_path / "sys")
    (tmp_path / "sys/hugepages-1048576kB/nr_hugepages").write_text("1\n")
    led = tmp_path / "ledger.json"
    keeper = f"{os.getpid()}:{start_time(os.getpid())}:keeper"
    a = fs.pool(led)
    a.park = keeper
    a.reserve(PAGE_1G, 2)
    assert fs.nr(PAGE_1G) == 3
    a.release_all()
    assert fs.nr(PAGE_1G) == 3 and a.holders(PAGE_1G) == {}  # parked: free, in use by nobody
    entry = json.loads(led.read_text())["pools"][str(PAGE_1G)]
    assert entry["parked"] == {keeper: 2} and entry["holders"] == {keeper: 0}  # the leak check sees a keeper
    b, c = fs.pool(led), fs.pool(led)
    b.reserve(PAGE_1G, 1)
    c.reserve(PAGE_1G, 2)  # one parked page left: the pool grows by one
    assert fs.nr(PAGE_1G) == 4 and b.holders(PAGE_1G) == {b.key: 1, c.key: 2}
    b.release_all()  # back to the keeper it came from
    assert fs.nr(PAGE_1G) == 4
    c.release_all()  # its parked page back, its own growth off (c parks nothing)
    assert fs.nr(PAGE_1G) == 3
    b.reserve(PAGE_1G, 1)
    assert hugepages.unpark(keeper, fs.root, led) == 1 and fs.nr(PAGE_1G) == 2
    b.release_all()  # the keeper is done: the borrowed page comes off
    assert fs.nr(PAGE_1G) == 1 and json.loads(led.read_text())["pools"] == {}


def test_pool_pages_of_a_dead_keeper_come_off(tmp_path):
    fs = FakeSysfs(tmp_path / "sys")
    led = tmp_path / "ledger.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    p = fs.pool(led)
    p.park = f"{dead}:1:keeper"
    p.reserve(PAGE_1G, 1)
    p.release_all()  # a keeper that is gone keeps nothing
    assert fs.nr(PAGE_1G) == 0 and json.loads(led.read_text())["pools"] == {}
    (tmp_path / "sys/hugepages-1048576kB/nr_hugepages").write_text("2\n")
    led.write_text(json.dumps({"boot_id": hugepages._boot_id(), "pools": {str(PAGE_1G): {
        "base": 0, "holders": {f"{dead}:1:keeper": 0}, "parked": {f"{dead}:1:keeper": 2}}}}))
    assert p.holders(PAGE_1G) == {} and fs.nr(PAGE_1G) == 0  # the next ledger access took them off
    assert json.loads(led.read_text())["pools"] == {}
