"""The vhost-vsock rig the cases use: one memslot of a backing, the driver on it, the host's
connection, and rounds of "post buffers, the host sends, vhost writes, check".

    rig = VsockRig(vm, backing, seed=...)         # memslot at GPA, listener; rig.open() connects
    rig.open()
    rnd = rig.post(range(128))                     # poison written, chains posted (not kicked)
    os.fsync(backing.fd)                           # e.g. make the pages clean first
    rig.kick_and_send(rnd)                         # the host sendall()s the round's stream
    rig.receive(rnd)                               # bounded; rnd.rx has the used entries
    rig.memory_verdict(rnd).check(...)             # headers, stream, every page of the round
    rig.disk_verdict(...).check(...)               # after fsync: the disk holds what memory does
    rig.close()                                    # device closed (bounded), worker gone

A round's stream is memtouch words under a fresh pattern; the poison written into each data page
before posting it is another pattern, so the oracles name stale, unwritten and misplaced data.
"""

from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.memory import hostmem
from harness.memory.loopfs import DiskReadUnavailable, read_odirect, read_on_disk
from harness.memory.memtouch import checksum, host_values
from harness.oracles.dirty import disk_contents
from harness.oracles.verdict import Verdict
from harness.vhost.oracle import Decoder, page_images, region_contents, rx_headers, rx_stream, stream, stream_offset
from harness.vhost.vsock import HostListener, RxPacket, RxRound, VhostTimeout, VsockDriver, VsockLayout

GPA = 1 << 40
SLOT = 1
SIZE = 2 << 20  # one 2 MiB hugepage for the hugetlb kinds
DATA_OFF = 1 << 20  # data pages from here; rings and header slots below
DATA_PAGES = 128
PAGE = 4096

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, length, flags) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"sync_file_range(fd {fd}, {offset:#x}, {length:#x}, {flags:#x}): {os.strerror(e)}")


@dataclass
class Round:
    """One round: what was posted, what the host sent, what vhost returned."""

    no: int
    pattern: int
    poison_pattern: int
    pages: list[int]
    data_off: int
    data_len: int
    sent: bytes = b""
    rx: RxRound = field(default_factory=RxRound)
    extra: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # page -> other writers' bytes

    @property
    def first(self) -> int:
        return self.pages[0]

    def poison(self, page: int) -> bytes:
        return stream(self.poison_pattern, PAGE, page * PAGE)


class VsockRig:
    """vm: a harness Vm (a MemTouch's GuestVm); backing: a harness.memory backing of SIZE bytes."""

    def __init__(self, vm: Any, backing: Any, *, seed: int | str = 0, gpa: int = GPA, slot: int = SLOT,
                 data_pages: int = DATA_PAGES, timeout: float = 30.0) -> None:
        self.vm = vm
        self.b = backing
        self.gpa = gpa
        self.slot = vm.add_memslot(gpa, SIZE, slot=slot, backing=backing)
        self.lay = VsockLayout(gpa, data_off=DATA_OFF, data_pages=data_pages)
        if self.lay.end > gpa + SIZE:
            raise ValueError(f"the layout ends at {self.lay.end:#x}, past the slot")
        self.rng = random.Random(f"vhost-rig/{seed}")
        self.timeout = timeout
        self.listener = HostListener(timeout)
        self.drv: VsockDriver | None = None
        self.conn: Any = None
        self.rounds = 0
        self.decoder = Decoder()
        self.closes: list[dict[str, float]] = []
        self.cid = 0
        self.guest_port = 0

    # ---- connection ------------------------------------------------------------------------------
    def open(self) -> VsockDriver:
        """A fresh vhost-vsock device on the slot, connected to the host listener."""
        self.drv = VsockDriver(self.vm, self.lay)
        self.drv.start()
        self.drv.connect(self.listener.port, self.timeout)
        self.cid, self.guest_port = self.drv.cid, self.drv.guest_port
        self.conn = self.listener.accept()
        return self.drv

    def close_driver(self) -> dict[str, float]:
        """Close the device (bounded; VhostStuck) and check its worker is gone; then the host socket."""
        took: dict[str, float] = {}
        try:
            if self.drv is not None:
                took = self.drv.close()
                self.closes.append(took)
        finally:
            self.drv = None
            if self.conn is not None:
                self.conn.close()
                self.listener.conns.remove(self.conn)
                self.conn = None
        return took

    def close(self) -> None:
        try:
            self.close_driver()
        finally:
            self.listener.close()

    # ---- addresses -------------------------------------------------------------------------------
    def off(self, gpa: int) -> int:
        """Offset in the backing (= in the file) of a GPA of the slot."""
        return gpa - self.gpa

    def hva(self, gpa: int) -> int:
        return self.b.addr + self.off(gpa)

    def data_range(self, pages: list[int]) -> tuple[int, int]:
        """(GPA, length) of a contiguous run of data pages."""
        if pages != list(range(pages[0], pages[0] + len(pages))):
            raise ValueError(f"pages {pages[:8]}... are not contiguous")
        return self.lay.data_page(pages[0]), len(pages) * PAGE

    # ---- a round ---------------------------------------------------------------------------------
    def post(self, pages: Iterable[int], *, data_off: int = 0, data_len: int = PAGE) -> Round:
        """Write poison into the pages and post one RX chain per page (data_len bytes from data_off)."""
        assert self.drv is not None
        self.rounds += 1
        rnd = Round(self.rounds, self.rng.getrandbits(64), self.rng.getrandbits(64), list(pages), data_off, data_len)
        self.decoder.add(f"round {rnd.no} stream", rnd.pattern, DATA_PAGES * PAGE)
        self.decoder.add(f"round {rnd.no} poison", rnd.poison_pattern, DATA_PAGES * PAGE)
        gpa, n = self.data_range(rnd.pages)
        self.vm.write(gpa, stream(rnd.poison_pattern, n, rnd.first * PAGE))
        self.drv.post_rx(rnd.pages, data_off=data_off, data_len=data_len)
        return rnd

    def kick_and_send(self, rnd: Round) -> None:
        """Kick RX and have the host send the round's stream: one byte per posted buffer byte."""
        assert self.drv is not None and self.conn is not None
        rnd.sent = stream(rnd.pattern, len(rnd.pages) * rnd.data_len)
        self.drv.kick_rx()
        try:
            self.conn.sendall(rnd.sent)
        except TimeoutError:
            raise VhostTimeout(f"the host's sendall() of {len(rnd.sent)} bytes blocked for {self.timeout:.0f} s: it "
                               f"waits for credit (min(the {self.drv.credit} bytes this driver offers, the host "
                               f"socket's {self.listener.buffer_size}) ahead of fwd_cnt {self.drv.fwd_cnt}); "
                               f"{self.drv.state()}") from None

    def receive(self, rnd: Round, *, settle: float = 0.3) -> RxRound:
        assert self.drv is not None
        rnd.rx = self.drv.receive(len(rnd.sent), self.timeout, settle=settle)
        return rnd.rx

    def credit(self, rnd: Round) -> None:
        """Give the host back the credit the round consumed (CREDIT_UPDATE on TX)."""
        assert self.drv is not None
        self.drv.credit_update(rnd.rx.payload_bytes, self.timeout)

    # ---- oracles ---------------------------------------------------------------------------------
    def pieces(self, rnd: Round) -> list[tuple[RxPacket, bytes]]:
        """Each used packet with its payload as memory holds it now (read only when the pages are
        mapped and inside the file again)."""
        return [(p, self.vm.read(p.data_gpa, min(p.payload_len, p.buf.data_len))) for p in rnd.rx.packets]

    def expected(self, rnd: Round, pieces: list[tuple[RxPacket, bytes]], complete: bool) -> dict[int, bytes]:
        """Each page of the round as it must be: poison, the payload from the stream the host sent
        where vhost returned the buffer, then other writers' bytes (rnd.extra)."""
        filled: dict[int, tuple[int, bytes]] = {}
        pos = 0
        for p, b in pieces:
            n = p.payload_len
            if complete:
                src = rnd.sent[pos:pos + n]
            else:  # dropped packets: the piece's place in the stream is named by its first word
                o = self.decoder_offset(rnd, b)
                src = rnd.sent[o:o + n] if o is not None else b"\xee" * n
            filled[p.buf.tag] = (rnd.data_off, src)
            pos += n
        imgs = page_images(rnd.pages, {t: rnd.poison(t) for t in rnd.pages}, filled, PAGE)
        for t, writes in rnd.extra.items():
            img = bytearray(imgs[t])
            for o, data in writes:
                img[o:o + len(data)] = data
            imgs[t] = bytes(img)
        return imgs

    @staticmethod
    def decoder_offset(rnd: Round, payload: bytes) -> int | None:
        if len(payload) < 8:
            return None
        o = stream_offset(int.from_bytes(payload[:8], "little"), rnd.pattern)
        return o if o % 8 == 0 and o + len(payload) <= len(rnd.sent) else None

    def memory_verdict(self, rnd: Round, *, complete: bool | None = None, zero: Iterable[int] = (),
                       tolerate: dict[int, Callable[[bytes, bytes], bool]] | None = None,
                       unreliable: Iterable[int] = ()) -> Verdict:
        """Headers, the stream, and every page of the round against its image.

        complete: the stream must be whole (default: unless vhost signalled an RX error, when only
        gaps are allowed). zero: pages that must read all zeros whatever vhost did (truncated and
        grown back). tolerate[page]: accepts a page that differs (see region_contents).
        unreliable: pages whose payload the stream check skips (a punch or truncate may have
        discarded what vhost wrote there)."""
        assert self.drv is not None or rnd.rx.packets == []
        if complete is None:
            complete = rnd.rx.rx_errors == 0
        skip = set(unreliable) | set(zero)
        pieces = self.pieces(rnd)
        v = rx_headers(rnd.rx.packets, cid=self.cid, host_port=self.listener.port, guest_port=self.guest_port)
        v = v + rx_stream([pc for pc in pieces if pc[0].buf.tag not in skip], rnd.sent, rnd.pattern,
                          complete=complete and not skip)
        gpa, n = self.data_range(rnd.pages)
        imgs = self.expected(rnd, pieces, complete)
        for t in zero:
            imgs[t] = bytes(PAGE)
        want = b"".join(imgs[t] for t in rnd.pages)
        tol = {t - rnd.first: f for t, f in (tolerate or {}).items()}
        return v + region_contents(self.vm.read(gpa, n), want, gpa=gpa, decoder=self.decoder, tolerate=tol,
                                   what=f"data pages {rnd.first}-{rnd.pages[-1]} in memory")

    def guest_verdict(self, memtouch: Any, gva: int, rnd: Round) -> Verdict:
        """The vCPU reads the round's pages (memtouch cmd 3): its checksum must be the host view's."""
        gpa, n = self.data_range(rnd.pages)
        host = checksum(host_values(self.vm.read(gpa, n), 8))
        r = memtouch.read(gva + self.off(gpa), n, 8)
        out = [] if r.checksum == host and r.count == n // 8 else [
            f"the guest read {r.count} words of data pages {rnd.first}-{rnd.pages[-1]} with checksum {r.checksum:#x}; "
            f"the host's view of the same memory sums to {host:#x}: KVM maps other pages than the ones vhost wrote"]
        return Verdict.of("guest view of the pages vhost wrote", out, words=r.count)

    def disk_verdict(self, ranges: Iterable[tuple[int, int]]) -> Verdict:
        """After an fsync: each (GPA, length) range as the disk holds it (the file's blocks read from
        the block device, harness.memory.loopfs) equals what memory holds."""
        v: Verdict | None = None
        for gpa, n in ranges:
            off = self.off(gpa)
            what = f"disk vs memory at GPA {gpa:#x}+{n:#x}"
            try:
                disk, missing = read_on_disk(self.b.fd, self.b.path, off, n)
            except DiskReadUnavailable as e:
                disk, missing = read_odirect(self.b.path, off, n), []
                what += f" (O_DIRECT read of the file; {e})"
            mem = self.vm.read(gpa, n)
            r = disk_contents(disk, mem, not_on_disk=missing, gpa=gpa, what=what)
            w = next((i for i in range(0, n - 7, 8) if disk[i:i + 8] != mem[i:i + 8]), None)
            if not r.ok and w is not None:  # say what the disk holds instead, by its stream
                d, m = int.from_bytes(disk[w:w + 8], "little"), int.from_bytes(mem[w:w + 8], "little")
                r = Verdict(r.oracle, (*r.problems, f"at GPA {gpa + w:#x} the disk's word is {self.decoder.name(d)}, "
                                                    f"memory's {self.decoder.name(m)}"), r.facts)
            v = r if v is None else v + r
        assert v is not None
        return v

    def meta_ranges(self) -> list[tuple[int, int]]:
        """What vhost writes besides the data pages: the RX header slots and the RX used ring from
        used.idx on. Not used.flags: vhost rewrites it (notifications on/off) after returning the
        last buffer, so it can change between an fsync and the read that follows."""
        rx = self.lay.rx
        return [(self.lay.hdr_slots, self.lay.meta_end - self.lay.hdr_slots),
                (rx.used_idx, rx.used_size(rx.num) - 2)]


def writeback_op(rig: VsockRig, rng: random.Random, ops: dict[str, int]) -> None:
    """One random write-back or reclaim operation on the whole slot of the rig's (file) backing:
    fsync, sync_file_range (start write-back; or wait-write-wait on a range), msync(MS_ASYNC),
    MADV_PAGEOUT of a random range (rings and header slots included)."""
    fd = rig.b.fd
    op = rng.choice(("fsync", "sfr_write", "sfr_wait", "msync_async", "pageout", "pageout"))
    size = SIZE
    if op == "fsync":
        os.fsync(fd)
    elif op == "sfr_write":
        sync_file_range(fd, 0, size, SYNC_FILE_RANGE_WRITE)
    elif op == "sfr_wait":
        off = rng.randrange(size // PAGE) * PAGE
        sync_file_range(fd, off, min(size - off, rng.choice((PAGE, 64 << 10, 1 << 20))),
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
    elif op == "msync_async":
        hostmem.msync(rig.b.addr, size, 1)  # MS_ASYNC
    else:
        off = rng.randrange(size // PAGE) * PAGE
        hostmem.madvise(rig.b.addr + off, min(size - off, rng.choice((PAGE, 64 << 10, 1 << 20))),
                        hostmem.MADV_PAGEOUT)
    ops[op] = ops.get(op, 0) + 1
