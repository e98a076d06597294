"""harness/vhost without a vhost device: the uapi (struct sizes, ioctl numbers) pinned against
upstream's include/uapi/linux/vhost.h, vhost_types.h, virtio_ring.h and virtio_vsock.h (and, where
this host has those headers and a C compiler, against them too), the split-ring layout and the
driver's bookkeeping on a simulated device, and the oracles, including that they fail when one
vhost write is dropped. (Named test_vhost_uapi.py, not test_vhost.py: tests/ and cases/ have no
__init__.py, so under pytest's default import mode two test_vhost.py basenames cannot be collected
in one run, "import file mismatch"; tests/test_xen_uapi.py is named so for the same reason.)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.vhost import uapi
from harness.vhost.device import MemRegion, VhostUnavailable, VhostVsock, pack_mem_table, regions_from_memslots
from harness.vhost.oracle import (
    Decoder,
    page_images,
    partial_copy,
    region_contents,
    rx_headers,
    rx_stream,
    stream,
    stream_offset,
    zero_or_expected,
)
from harness.vhost.vring import Seg, SplitVring, VringError, VringLayout
from harness.vhost.vsock import HDR_SIZE, RxBuffer, RxPacket, VsockHdr, VsockLayout

SIZES = {  # struct -> sizeof, from the uapi headers
    "VRING_STATE": 8,  # struct vhost_vring_state
    "VRING_FILE": 8,  # struct vhost_vring_file
    "VRING_ADDR": 40,  # struct vhost_vring_addr
    "MEMORY": 8,  # struct vhost_memory (without its flexible regions[])
    "MEMORY_REGION": 32,  # struct vhost_memory_region
    "VRING_DESC": 16,  # struct vring_desc
    "VRING_USED_ELEM": 8,  # struct vring_used_elem
    "VSOCK_HDR": 44,  # struct virtio_vsock_hdr, packed
}

NUMBERS = {  # the values _IOW/_IOR(VHOST_VIRTIO = 0xAF, nr, type) give
    "VHOST_GET_FEATURES": 0x8008AF00,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_OWNER": 0x0000AF01,
    "VHOST_RESET_OWNER": 0x0000AF02,
    "VHOST_SET_MEM_TABLE": 0x4008AF03,
    "VHOST_SET_LOG_BASE": 0x4008AF04,
    "VHOST_SET_LOG_FD": 0x4004AF07,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_SET_VRING_ERR": 0x4008AF22,
    "VHOST_NET_SET_BACKEND": 0x4008AF30,
    "VHOST_VSOCK_SET_GUEST_CID": 0x4008AF60,
    "VHOST_VSOCK_SET_RUNNING": 0x4004AF61,
}


@pytest.mark.parametrize(("name", "size"), sorted(SIZES.items()))
def test_struct_size(name, size):
    assert getattr(uapi, name).size == size


@pytest.mark.parametrize(("name", "number"), sorted(NUMBERS.items()))
def test_ioctl_number(name, number):
    assert getattr(uapi, name) == number, f"{name}: {getattr(uapi, name):#x} != {number:#x}"
    assert uapi.ioctl_name(number) == name


def test_vsock_hdr_field_offsets():
    """packed: src_cid 0, dst_cid 8, src_port 16, dst_port 20, len 24, type 28, op 30, flags 32,
    buf_alloc 36, fwd_cnt 40."""
    h = VsockHdr(0x1111, 0x2222, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA)
    raw = h.pack()
    assert len(raw) == HDR_SIZE
    for off, size, value in ((0, 8, 0x1111), (8, 8, 0x2222), (16, 4, 0x33), (20, 4, 0x44), (24, 4, 0x55),
                             (28, 2, 0x66), (30, 2, 0x77), (32, 4, 0x88), (36, 4, 0x99), (40, 4, 0xAA)):
        assert int.from_bytes(raw[off:off + size], "little") == value
    assert VsockHdr.unpack(raw) == h


_C_CHECK = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/vhost.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_vsock.h>
#define P(x) printf("%s %lu\n", #x, (unsigned long)(x));
int main(void) {
    P(sizeof(struct vhost_vring_state)) P(sizeof(struct vhost_vring_file)) P(sizeof(struct vhost_vring_addr))
    P(sizeof(struct vhost_memory)) P(sizeof(struct vhost_memory_region)) P(sizeof(struct vring_desc))
    P(sizeof(struct vring_used_elem)) P(sizeof(struct virtio_vsock_hdr))
    P(VHOST_GET_FEATURES) P(VHOST_SET_FEATURES) P(VHOST_SET_OWNER) P(VHOST_RESET_OWNER) P(VHOST_SET_MEM_TABLE)
    P(VHOST_SET_LOG_BASE) P(VHOST_SET_LOG_FD) P(VHOST_SET_VRING_NUM) P(VHOST_SET_VRING_ADDR)
    P(VHOST_SET_VRING_BASE) P(VHOST_GET_VRING_BASE) P(VHOST_SET_VRING_KICK) P(VHOST_SET_VRING_CALL)
    P(VHOST_SET_VRING_ERR) P(VHOST_NET_SET_BACKEND) P(VHOST_VSOCK_SET_GUEST_CID) P(VHOST_VSOCK_SET_RUNNING)
    P(VHOST_F_LOG_ALL) P(VIRTIO_RING_F_EVENT_IDX) P(VIRTIO_RING_F_INDIRECT_DESC) P(VRING_DESC_F_NEXT)
    P(VRING_DESC_F_WRITE) P(VIRTIO_VSOCK_OP_RW) P(VIRTIO_VSOCK_OP_CREDIT_UPDATE) P(VIRTIO_VSOCK_TYPE_STREAM)
    P(offsetof(struct virtio_vsock_hdr, op)) P(offsetof(struct virtio_vsock_hdr, fwd_cnt))
    return 0;
}
"""


def test_against_host_headers(tmp_path):
    """The same facts from this machine's own uapi headers, compiled (skips without gcc/headers)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    headers = [Path("/usr/include/linux") / h for h in ("vhost.h", "virtio_ring.h", "virtio_vsock.h")]
    if not cc or not all(h.exists() for h in headers):
        pytest.skip("no C compiler or no linux/vhost.h, virtio_vsock.h on this host")
    src = tmp_path / "v.c"
    src.write_text(_C_CHECK)
    exe = tmp_path / "v"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    got = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}
    for (name, size), ctype in zip(sorted(SIZES.items()), ("struct vhost_memory", "struct vhost_memory_region",
                                                          "struct vhost_vring_addr", "struct vring_desc",
                                                          "struct vhost_vring_file", "struct vhost_vring_state",
                                                          "struct vring_used_elem", "struct virtio_vsock_hdr"),
                                   strict=True):
        assert got[f"sizeof({ctype})"] == size == getattr(uapi, name).size, (name, ctype)
    for name, number in NUMBERS.items():
        assert got[name] == number, f"{name}: host header says {got[name]:#x}"
    for name in ("VHOST_F_LOG_ALL", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC", "VRING_DESC_F_NEXT",
                 "VRING_DESC_F_WRITE", "VIRTIO_VSOCK_OP_RW", "VIRTIO_VSOCK_OP_CREDIT_UPDATE",
                 "VIRTIO_VSOCK_TYPE_STREAM"):
        assert got[name] == getattr(uapi, name), name
    assert got["offsetof(struct virtio_vsock_hdr, op)"] == 30
    assert got["offsetof(struct virtio_vsock_hdr, fwd_cnt)"] == 40


# ---- memory table ----------------------------------------------------------------------------------
@dataclass
class _Slot:
    slot: int
    gpa: int
    size: int
    hva: int


def test_mem_table_from_memslots():
    slots = [_Slot(1, 1 << 40, 2 << 20, 0x7F0000200000), _Slot(0, 0, 1 << 30, 0x7F1000000000),
             _Slot(2, 1 << 41, 4096, 0)]  # no host mapping (guest_memfd only): not in the table
    regions = regions_from_memslots(slots)
    assert regions == [MemRegion(0, 1 << 30, 0x7F1000000000), MemRegion(1 << 40, 2 << 20, 0x7F0000200000)]
    raw = pack_mem_table(regions)
    assert len(raw) == 8 + 2 * 32
    assert uapi.MEMORY.unpack_from(raw) == (2, 0)
    assert uapi.MEMORY_REGION.unpack_from(raw, 8 + 32) == (1 << 40, 2 << 20, 0x7F0000200000, 0)
    with pytest.raises(ValueError, match="not 4 KiB aligned"):
        regions_from_memslots([_Slot(3, 0x1800, 4096, 0x7F0000000000)])


def test_missing_device_is_a_skip_with_the_reason(monkeypatch):
    from harness.vhost import device

    monkeypatch.setattr(device, "_kernel_config", lambda: ({"CONFIG_VHOST_VSOCK": "n"}, "/proc/config.gz"))
    with pytest.raises(VhostUnavailable, match=r"CONFIG_VHOST_VSOCK not set .* no /nonexistent/vhost-vsock"):
        VhostVsock.open("/nonexistent/vhost-vsock")
    monkeypatch.setattr(device, "_kernel_config", lambda: ({"CONFIG_VHOST_VSOCK": "m"}, "/boot/config"))
    with pytest.raises(VhostUnavailable, match="modprobe vhost_vsock"):
        VhostVsock.open("/nonexistent/vhost-vsock")


# ---- split ring ------------------------------------------------------------------------------------
def test_vring_layout():
    lay = VringLayout.at(0x10000, 256)
    assert (lay.desc, lay.avail, lay.used) == (0x10000, 0x11000, 0x12000)  # avail: 518 bytes, used page aligned
    assert VringLayout.avail_size(256) == 518 and VringLayout.used_size(256) == 2054
    assert lay.used_ring(3) == 0x12000 + 4 + 24 and lay.avail_ring(5) == 0x11000 + 4 + 10
    small = VringLayout.at(0x10000, 4, align=4)
    assert (small.avail, small.used) == (0x10040, 0x10050)  # avail 14 bytes: 0x4e, used aligned to 4
    for bad in (0, 3, 65536):
        with pytest.raises(VringError):
            VringLayout.at(0x10000, bad)
    with pytest.raises(VringError, match="16-byte"):
        VringLayout.at(0x10008, 4)


class FakeMem:
    """Guest memory as one bytearray at `base` (a GPA); host addresses are base + HVA_DELTA."""

    HVA_DELTA = 0x7F0000000000

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.buf = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa - self.base:gpa - self.base + size])

    def write(self, gpa: int, data: bytes) -> None:
        self.buf[gpa - self.base:gpa - self.base + len(data)] = data

    def gpa_to_hva(self, gpa: int, size: int = 1) -> int:
        assert self.base <= gpa and gpa + size <= self.base + len(self.buf)
        return gpa + self.HVA_DELTA


class FakeDevice:
    """The device side of a split ring, as vhost does it: take heads in avail order, follow the
    chain, write into device-writable segments, append to used."""

    def __init__(self, mem: FakeMem, lay: VringLayout) -> None:
        self.mem, self.lay = mem, lay
        self.last_avail = 0
        self.used = 0

    def avail_idx(self) -> int:
        return uapi.U16.unpack(self.mem.read(self.lay.avail_idx, 2))[0]

    def take(self) -> tuple[int, list[tuple[int, int, int]]] | None:
        if self.last_avail == self.avail_idx():
            return None
        head = uapi.U16.unpack(self.mem.read(self.lay.avail_ring(self.last_avail % self.lay.num), 2))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        segs, i = [], head
        while True:
            addr, length, flags, nxt = uapi.VRING_DESC.unpack(self.mem.read(self.lay.desc_at(i), 16))
            segs.append((addr, length, flags))
            if not flags & uapi.VRING_DESC_F_NEXT:
                return head, segs
            i = nxt

    def put_used(self, head: int, length: int) -> None:
        self.mem.write(self.lay.used_ring(self.used % self.lay.num), uapi.VRING_USED_ELEM.pack(head, length))
        self.used = (self.used + 1) & 0xFFFF
        self.mem.write(self.lay.used_idx, uapi.U16.pack(self.used))


def test_split_ring_driver_and_device():
    mem = FakeMem(0x100000, 0x10000)
    lay = VringLayout.at(0x100000, 8)
    q = SplitVring(mem, lay)
    heads = [q.add([Seg(0x108000 + 64 * k, 44, True), Seg(0x10A000 + 0x100 * k, 0x100, True)]) for k in range(4)]
    assert heads == [0, 2, 4, 6] and not q.free
    with pytest.raises(VringError, match="2 descriptors wanted, 0 free"):
        q.add([Seg(0x108000, 44, True), Seg(0x10A000, 16, True)])
    dev = FakeDevice(mem, lay)
    assert dev.take() is None  # not published yet
    assert q.publish() == 4
    head, segs = dev.take()
    assert head == 0 and segs == [(0x108000, 44, uapi.VRING_DESC_F_WRITE | uapi.VRING_DESC_F_NEXT),
                                  (0x10A000, 0x100, uapi.VRING_DESC_F_WRITE)]
    dev.put_used(head, 44 + 10)
    got = q.harvest()
    assert [(u.head, u.length, u.seq) for u in got] == [(0, 54, 0)]
    assert sorted(q.free) == [0, 1] and q.outstanding == 3
    # the device returns a head it never got: the driver says so
    mem.write(lay.used_ring(1), uapi.VRING_USED_ELEM.pack(0, 1))
    mem.write(lay.used_idx, uapi.U16.pack(2))
    with pytest.raises(VringError, match="not an outstanding chain head"):
        q.harvest()


def test_split_ring_indexes_wrap():
    """Free-running u16 indexes: a queue started at 65530 (VHOST_SET_VRING_BASE may start it
    anywhere) runs through 65535 and on."""
    mem = FakeMem(0x100000, 0x10000)
    lay = VringLayout.at(0x100000, 8)
    q = SplitVring(mem, lay)
    dev = FakeDevice(mem, lay)
    start = 65530
    q.avail_shadow = q.published = q.last_used = dev.last_avail = dev.used = start
    mem.write(lay.avail_idx, uapi.U16.pack(start))
    mem.write(lay.used_idx, uapi.U16.pack(start))
    total = start
    for rnd in range(10):
        for k in range(4):
            q.add([Seg(0x108000 + 64 * k, 64, True)])
        q.publish()
        while (t := dev.take()) is not None:
            dev.put_used(t[0], rnd & 0x3F)
        got = q.harvest()
        assert len(got) == 4 and all(u.length == rnd & 0x3F for u in got)
        total += 4
    assert total > 65536 and q.last_used == total & 0xFFFF == dev.used and q.outstanding == 0


def test_chain_order_rule():
    q = SplitVring(FakeMem(0x100000, 0x10000), VringLayout.at(0x100000, 8))
    with pytest.raises(VringError, match="device-readable segment after"):
        q.add([Seg(0x108000, 44, True), Seg(0x109000, 44, False)])


def test_vsock_layout():
    lay = VsockLayout(1 << 40)
    assert lay.rx.desc == 1 << 40 and lay.tx.desc % 4096 == 0 and lay.tx.desc >= lay.rx.end
    assert lay.ctl >= lay.tx_slots + 64 * 64 and lay.hdr_slots == lay.ctl + 4096
    assert lay.meta_end <= lay.data == (1 << 40) + (1 << 20)
    assert lay.end == lay.data + 128 * 4096 and lay.size == (1 << 20) + (128 << 12)
    with pytest.raises(ValueError, match="RX queue"):
        VsockLayout(1 << 40, rx_num=256, data_pages=128)


# ---- oracles -----------------------------------------------------------------------------------------
CID, HOST_PORT, GUEST_PORT = 70000, 1234, 5678
PATTERN, POISON = 0x1234_5678_9ABC_DEF0, 0x0BAD_F00D_DEAD_BEEF


def _round(pages: int = 4, data_len: int = 4096):
    """A simulated round: stream sent, pages filled in order, one packet per page."""
    sent = stream(PATTERN, pages * data_len)
    mem = bytearray(stream(POISON, pages * 4096))
    packets = []
    for t in range(pages):
        mem[t * 4096:t * 4096 + data_len] = sent[t * data_len:(t + 1) * data_len]
        hdr = VsockHdr(2, CID, HOST_PORT, GUEST_PORT, data_len, uapi.VIRTIO_VSOCK_TYPE_STREAM, uapi.VIRTIO_VSOCK_OP_RW)
        buf = RxBuffer(2 * t, t, 0x5000 + 64 * t, 0x100000 + 4096 * t, 4096)
        packets.append(RxPacket(buf, HDR_SIZE + data_len, hdr, t))
    return sent, mem, packets


def _pieces(mem, packets):
    return [(p, bytes(mem[p.buf.tag * 4096:p.buf.tag * 4096 + p.payload_len])) for p in packets]


def test_stream_words_decode():
    s = stream(PATTERN, 64, base=4096)
    assert stream_offset(int.from_bytes(s[8:16], "little"), PATTERN) == 4096 + 8
    d = Decoder().add("round 1 stream", PATTERN, 1 << 20).add("round 1 poison", POISON, 1 << 20)
    assert d.name(int.from_bytes(s[:8], "little")) == "round 1 stream offset 0x1000"
    assert d.name(0) == "zero" and d.name(0xFFFF_FFFF_FFFF_FFFF).startswith(("unknown", "round"))


def test_oracles_pass_on_a_faithful_round():
    sent, mem, packets = _round()
    assert rx_headers(packets, cid=CID, host_port=HOST_PORT, guest_port=GUEST_PORT).ok
    assert rx_stream(_pieces(mem, packets), sent, PATTERN).ok
    imgs = page_images(range(4), {t: stream(POISON, 4096, t * 4096) for t in range(4)},
                       {t: (0, sent[t * 4096:(t + 1) * 4096]) for t in range(4)})
    assert region_contents(bytes(mem), b"".join(imgs[t] for t in range(4)), gpa=0x100000).ok


def test_oracles_fail_on_a_dropped_vhost_write():
    """The planted fault: vhost's write into page 2 never happened (the page still holds the
    poison) although the used ring returned the buffer. The stream oracle and the page oracle both
    fail and say where and what the page holds instead."""
    sent, mem, packets = _round()
    mem[2 * 4096:3 * 4096] = stream(POISON, 4096, 2 * 4096)  # the dropped write
    v = rx_stream(_pieces(mem, packets), sent, PATTERN)
    assert not v.ok and "stream offset 0x2000" in v.problems[0] and "data page 2" in v.problems[0]
    imgs = page_images(range(4), {t: stream(POISON, 4096, t * 4096) for t in range(4)},
                       {t: (0, sent[t * 4096:(t + 1) * 4096]) for t in range(4)})
    d = Decoder().add("round 1 stream", PATTERN, 1 << 20).add("round 1 poison", POISON, 1 << 20)
    r = region_contents(bytes(mem), b"".join(imgs[t] for t in range(4)), gpa=0x100000, decoder=d)
    assert not r.ok and r.facts["bad_pages"] == 1
    assert "page 2 (GPA 0x102000)" in r.problems[0] and "round 1 poison offset 0x2000" in r.problems[0]
    with pytest.raises(AssertionError, match="page 2"):
        r.check("planted")


def test_oracles_fail_on_a_skipped_used_entry():
    """The other planted fault: the harness (or vhost) skips one used-ring entry: the stream has a
    hole the complete check names, and the gap check (allowed only after a signalled error) sees it."""
    sent, mem, packets = _round()
    del packets[1]
    v = rx_stream(_pieces(mem, packets), sent, PATTERN)
    assert not v.ok and "12288 of 16384 stream bytes arrived" in v.problems[0]
    g = rx_stream(_pieces(mem, packets), sent, PATTERN, complete=False)
    assert g.ok and g.facts["gaps"] == [(0x1000, 0x2000)]


def test_gap_mode_still_rejects_foreign_and_repeated_pieces():
    sent, mem, packets = _round()
    mem[3 * 4096:4 * 4096] = mem[1 * 4096:2 * 4096]  # page 3 holds page 1's piece again
    g = rx_stream(_pieces(mem, packets), sent, PATTERN, complete=False)
    assert not g.ok and "repeats or goes back" in g.problems[0]
    mem[3 * 4096:4 * 4096] = stream(0x42, 4096)  # bytes that are no piece of the stream
    g = rx_stream(_pieces(mem, packets), sent, PATTERN, complete=False)
    assert not g.ok and "no piece of the stream" in g.problems[0]


def test_headers_oracle():
    _, _, packets = _round(2)
    bad = RxPacket(packets[1].buf, HDR_SIZE + 100, VsockHdr(2, CID, HOST_PORT, GUEST_PORT, 4096, 1, 3), 1)
    v = rx_headers([packets[0], bad], cid=CID, host_port=HOST_PORT, guest_port=GUEST_PORT)
    assert not v.ok and len(v.problems) == 2
    assert "RST" in v.problems[0] and "hdr.len 4096" in v.problems[1]


def test_region_tolerance_punch():
    """Seen on 7.3 under TCG: a copy preempted mid-page, the page punched, the copy resumed into
    the fresh zero page: zeros up to a byte inside a word, then the payload."""
    want = stream(PATTERN, 2 * 4096)
    have = bytearray(want)
    have[4096:4096 + 0x5CB] = bytes(0x5CB)  # a punched prefix ending inside the word at +0x5c8
    assert int.from_bytes(have[4096 + 0x5C8:4096 + 0x5D0], "little") & 0xFFFFFF == 0
    assert not region_contents(bytes(have), want, gpa=0).ok
    assert region_contents(bytes(have), want, gpa=0, tolerate={1: zero_or_expected}).ok
    have[4096 + 0x700] ^= 0x01  # but no other value
    r = region_contents(bytes(have), want, gpa=0, tolerate={1: zero_or_expected})
    assert not r.ok and "not of the tolerated form" in r.problems[0]


def test_region_tolerance_faulted_copy():
    """Seen on 7.3 under TCG: the mapping went away while vhost copied into a page: stream bytes
    up to a byte inside a word, then the poison the page held. Anything else stays wrong."""
    sent = stream(PATTERN, 8 * 4096)
    poison = stream(POISON, 4096, 5 * 4096)
    ok = partial_copy(PATTERN, sent)
    for k in (0, 3, 8, 0x3F6, 4096):
        page = sent[2 * 4096:2 * 4096 + k] + poison[k:]
        assert ok(page, poison), k
        assert region_contents(page, poison, gpa=0, tolerate={0: ok}).ok
    assert not ok(sent[:0x3F6] + bytes(8) + poison[0x3FE:], poison)  # a hole inside the prefix
    assert not ok(stream(0x99, 0x400) + poison[0x400:], poison)  # foreign bytes
    assert not ok(sent[3:0x403] + poison[0x400:], poison)  # stream bytes from an unaligned offset


# ---- the kernel runner loads vhost_vsock ---------------------------------------------------------------
def test_initramfs_loads_vhost_vsock(tmp_path):
    from harness.qemu import initramfs

    wanted: list[list[str]] = []

    class Tree:
        def load_order(self, names):
            wanted.append(list(names))
            return []

    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF")
    spec = initramfs.GuestSpec(["x"], "/work", "/usr/bin/python3", "n0nce")
    initramfs.build(tmp_path / "i.cpio", spec, Tree(), str(bb))  # type: ignore[arg-type]
    assert "vhost_vsock" in initramfs.VHOST_MODULES and "vhost_vsock" in wanted[0]


def test_vhost_vsock_dependencies_from_modinfo():
    """In Debian's 7.3.4 modules (when cached): vhost_vsock brings vhost, vhost_iotlb, vsock and
    the virtio transport common code, each before what needs it."""
    from harness.qemu.modules import ModuleTree

    root = Path(__file__).resolve().parent.parent / ".cache/kernels/debian/7.3.4+deb13-amd64/root/usr/lib/modules"
    trees = sorted(root.glob("7.3.4*")) if root.exists() else []
    if not trees:
        pytest.skip("Debian's 7.3.4 kernel is not in .cache/kernels (python -m harness kernel fetch debian:7.3.4)")
    order = ModuleTree.scan(trees[0]).load_order(["vhost_vsock"])
    assert order[-1] == "vhost_vsock"
    assert {"vhost", "vhost_iotlb", "vsock", "vmw_vsock_virtio_transport_common"} <= set(order)
    assert order.index("vhost_iotlb") < order.index("vhost") and order.index("vsock") < order.index(
        "vmw_vsock_virtio_transport_common")
