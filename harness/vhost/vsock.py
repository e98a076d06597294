"""The guest's virtio-vsock driver, played by the harness on vrings in guest memory, against the
kernel's vhost-vsock device; and the host's end of the connection (an AF_VSOCK socket).

The host process listens on an AF_VSOCK port; the "guest" (this driver) sends a REQUEST on its TX
queue; the kernel answers with a RESPONSE written into an RX buffer, and host `sendall()`s then
arrive as RW packets: vhost's worker copies a 44-byte virtio_vsock_hdr and the payload into the RX
chains the driver posted, at GPAs the harness chose, and returns each chain on the used ring with
the bytes written. That is "the kernel writes N known bytes into guest memory at chosen GPAs",
through the same user mappings KVM's memslots use.

    lay = VsockLayout(GPA)                         # rings, header slots, data pages in one region
    drv = VsockDriver(vm, lay); drv.start()        # /dev/vhost-vsock set up from vm.memslots
    with HostListener() as hl:
        drv.connect(hl.port); conn = hl.accept()
        bufs = drv.post_rx(range(64)); drv.kick_rx()
        conn.sendall(data)
        rnd = drv.receive(len(data), timeout=30)   # the used entries, parsed
    drv.close()                                    # bounded; then the worker must be gone

Each RX chain is two descriptors: the header slot (exactly 44 bytes) then the data buffer, so a
packet's payload starts at the data buffer's GPA (vhost splits a packet larger than the buffer over
several chains). Nothing here reads a data buffer unless asked (`payload()`): a case that unmaps or
truncates the data pages reads them only after putting the memory back.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.vhost import uapi
from harness.vhost.device import VhostError, VhostStuck, VhostUnavailable, VhostVsock, regions_from_memslots
from harness.vhost.vring import GuestMemory, Seg, SplitVring, Used, VringLayout

HDR_SIZE = uapi.VSOCK_HDR.size  # 44
SLOT = 64  # header slots are 64 bytes apart (44 used)
PAGE = 4096
DEFAULT_CREDIT = 16 << 20  # buf_alloc the driver advertises: rounds never wait for credit


class VhostTimeout(AssertionError):
    """vhost did not do within the bound what a working device does at once (deliver queued data
    into posted buffers, consume a TX packet): a kernel verdict; the message has the ring state."""


@dataclass(frozen=True)
class VsockHdr:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return uapi.VSOCK_HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                                   self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes) -> VsockHdr:
        return cls(*uapi.VSOCK_HDR.unpack(data[:HDR_SIZE]))

    @property
    def op_name(self) -> str:
        return uapi.VSOCK_OP_NAMES.get(self.op, f"op {self.op}")

    def describe(self) -> str:
        return (f"{self.op_name} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port}, len {self.len}, "
                f"type {self.type}, flags {self.flags:#x}, buf_alloc {self.buf_alloc}, fwd_cnt {self.fwd_cnt}")


class VsockLayout:
    """Where the driver's structures live in one guest region starting at `base` (a GPA):

        base + 0          RX queue (rx_num entries), then the TX queue (tx_num), page aligned
        next page         TX packet slots (tx_num x 64 bytes)
        next page         the control RX buffer (one page: connection replies)
        next page         RX header slots (data_pages x 64 bytes)
        base + data_off   data_pages data buffers of `page` bytes: where payloads land
    """

    def __init__(self, base: int, *, rx_num: int = 512, tx_num: int = 64, data_off: int = 1 << 20,
                 data_pages: int = 128, page: int = PAGE) -> None:
        if 2 * data_pages + 1 > rx_num:
            raise ValueError(f"{data_pages} data buffers (2 descriptors each) and the control buffer need an "
                             f"RX queue of more than {rx_num}")
        self.base = base
        self.page = page
        self.rx = VringLayout.at(base, rx_num)
        self.tx = VringLayout.at(_up(self.rx.end, PAGE), tx_num)
        self.tx_slots = _up(self.tx.end, PAGE)
        self.ctl = _up(self.tx_slots + tx_num * SLOT, PAGE)
        self.hdr_slots = self.ctl + PAGE
        self.meta_end = _up(self.hdr_slots + data_pages * SLOT, PAGE)
        self.data = base + data_off
        self.data_pages = data_pages
        if self.meta_end > self.data:
            raise ValueError(f"the rings and slots end at {self.meta_end:#x}, past the data at {self.data:#x}")

    @property
    def end(self) -> int:
        return self.data + self.data_pages * self.page

    @property
    def size(self) -> int:
        return self.end - self.base

    def data_page(self, i: int) -> int:
        return self.data + i * self.page

    def hdr_slot(self, i: int) -> int:
        return self.hdr_slots + i * SLOT

    def tx_slot(self, i: int) -> int:
        return self.tx_slots + i * SLOT

    def describe(self) -> str:
        return (f"RX ring {self.rx.desc:#x} (num {self.rx.num}, used {self.rx.used:#x}), TX ring {self.tx.desc:#x} "
                f"(num {self.tx.num}), control {self.ctl:#x}, header slots {self.hdr_slots:#x}, "
                f"{self.data_pages} data pages at {self.data:#x}")


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class RxBuffer:
    """One posted RX chain: header slot + data buffer; `tag` is the caller's name for it (the page)."""

    head: int
    tag: int
    hdr_gpa: int
    data_gpa: int
    data_len: int


@dataclass(frozen=True)
class RxPacket:
    """One used RX chain, parsed: the header vhost wrote and the length it claims."""

    buf: RxBuffer
    used_len: int
    hdr: VsockHdr
    seq: int  # used-ring position (free-running u16)

    @property
    def payload_len(self) -> int:
        return max(0, self.used_len - HDR_SIZE)

    @property
    def data_gpa(self) -> int:
        return self.buf.data_gpa


@dataclass
class RxRound:
    """What one receive() saw."""

    packets: list[RxPacket] = field(default_factory=list)
    payload_bytes: int = 0
    rx_errors: int = 0  # signals on the RX queue's error eventfd (vq_err: a faulting copy...)
    tx_errors: int = 0
    waited: float = 0.0
    why_stopped: str = ""


class HostListener:
    """The host's end: an AF_VSOCK stream socket listening on a free port of any local CID."""

    def __init__(self, timeout: float = 30.0, buffer_size: int = 4 << 20) -> None:
        if not hasattr(socket, "AF_VSOCK"):
            raise VhostUnavailable("this Python has no socket.AF_VSOCK")
        try:
            self.sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise VhostUnavailable(f"socket(AF_VSOCK): {e.strerror} (CONFIG_VSOCKETS?)") from e
        self.conns: list[socket.socket] = []
        try:
            # Since 7.x (virtio_transport_tx_buf_alloc) the host sends at most its own buf_alloc
            # ahead of the peer's fwd_cnt, whatever credit the peer offers: a round's bytes must fit
            # (256 KiB by default). Set on the listener, so accepted sockets inherit it without
            # sending the guest a CREDIT_UPDATE (which would take an RX buffer).
            for opt in (socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE, socket.SO_VM_SOCKETS_BUFFER_SIZE):
                self.sock.setsockopt(socket.AF_VSOCK, opt, buffer_size)  # CPython packs it as a u64
            self.buffer_size = buffer_size
            self.sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            self.sock.listen(4)
            self.sock.settimeout(timeout)
            self.port = self.sock.getsockname()[1]
        except BaseException:
            self.sock.close()
            raise
        self.timeout = timeout

    def accept(self) -> socket.socket:
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise VhostTimeout(f"no connection reached the host's listening port {self.port} within "
                               f"{self.timeout:.0f} s of the guest's REQUEST") from None
        conn.settimeout(self.timeout)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()
        self.sock.close()

    def __enter__(self) -> HostListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VsockDriver:
    """The guest side of one virtio-vsock device backed by /dev/vhost-vsock.

    `mem` is the VM (read/write/gpa_to_hva by GPA, and `memslots` for the vhost memory table)."""

    def __init__(self, mem: Any, layout: VsockLayout, *, credit: int = DEFAULT_CREDIT,
                 device: str | None = None) -> None:
        self.mem: GuestMemory = mem
        self.vm = mem
        self.lay = layout
        self.credit = credit
        self.device_path = device
        self.dev: VhostVsock | None = None
        self.rx: SplitVring | None = None
        self.tx: SplitVring | None = None
        self.fds: dict[str, int] = {}
        self.cid = 0
        self.guest_port = 0
        self.host_port = 0
        self.fwd_cnt = 0  # payload bytes this driver has consumed (what CREDIT_UPDATE reports)
        self.rx_bufs: dict[int, RxBuffer] = {}  # outstanding head -> buffer
        self.features = 0
        self.closed = False

    # ---- set-up ----------------------------------------------------------------------------------
    def start(self, cid: int | None = None) -> None:
        """Open and program the device: owner, features (VERSION_1 only: no event index, no
        indirect descriptors), memory table from the VM's memslots, both queues with their
        eventfds, a free guest CID (random, or `cid`), running."""
        self.dev = dev = VhostVsock.open(self.device_path)  # type: ignore[assignment]
        try:
            dev.set_owner()
            offered = dev.get_features()
            want = 1 << uapi.VIRTIO_F_VERSION_1
            if not offered & want:
                raise VhostUnavailable(f"vhost-vsock offers features {offered:#x} without VIRTIO_F_VERSION_1")
            dev.set_features(want)
            self.features = want
            dev.set_mem_table(regions_from_memslots(self.vm.memslots.values()))
            self.rx = SplitVring(self.mem, self.lay.rx, uapi.VSOCK_VQ_RX)
            self.tx = SplitVring(self.mem, self.lay.tx, uapi.VSOCK_VQ_TX)
            for q in (self.rx, self.tx):
                name = "rx" if q is self.rx else "tx"
                for kind in ("kick", "call", "err"):
                    self.fds[f"{name}_{kind}"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                dev.set_vring_num(q.index, q.num)
                dev.set_vring_base(q.index, 0)
                desc, used, avail = q.user_addrs()
                dev.set_vring_addr(q.index, desc, used, avail)
                dev.set_vring_kick(q.index, self.fds[f"{name}_kick"])
                dev.set_vring_call(q.index, self.fds[f"{name}_call"])
                dev.set_vring_err(q.index, self.fds[f"{name}_err"])
            self.cid = self._claim_cid(cid)
            dev.set_running(True)
        except BaseException:
            self.close()
            raise

    def _claim_cid(self, cid: int | None) -> int:
        assert self.dev is not None
        if cid is not None:
            self.dev.set_guest_cid(cid)
            return cid
        rng = random.SystemRandom()  # not the seeded rng: parallel workers must not pick the same CID
        for _ in range(64):
            c = rng.randrange(1 << 16, (1 << 32) - 2)
            try:
                self.dev.set_guest_cid(c)
                return c
            except VhostError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        raise VhostError(errno.EADDRINUSE, "VHOST_VSOCK_SET_GUEST_CID", "64 random CIDs all in use")

    # ---- queues ----------------------------------------------------------------------------------
    def _kick(self, name: str) -> None:
        os.eventfd_write(self.fds[f"{name}_kick"], 1)

    def kick_rx(self) -> None:
        self._kick("rx")

    def _drain(self, key: str) -> int:
        try:
            return os.eventfd_read(self.fds[key])
        except BlockingIOError:
            return 0

    def _wait(self, seconds: float) -> None:
        fds = [self.fds[k] for k in ("rx_call", "tx_call", "rx_err", "tx_err")]
        select.select(fds, [], [], max(0.0, seconds))

    def post_rx(self, tags: Iterable[int], *, data_off: int = 0, data_len: int | None = None) -> list[RxBuffer]:
        """Post one RX chain per tag: header slot `tag` (44 bytes) + data page `tag` from
        data_off for data_len bytes (the rest of the page by default); publish them. No kick."""
        assert self.rx is not None
        out = []
        for t in tags:
            if not 0 <= t < self.lay.data_pages:
                raise ValueError(f"data page {t} outside the layout's {self.lay.data_pages}")
            n = self.lay.page - data_off if data_len is None else data_len
            hdr, data = self.lay.hdr_slot(t), self.lay.data_page(t) + data_off
            head = self.rx.add([Seg(hdr, HDR_SIZE, True), Seg(data, n, True)])
            b = RxBuffer(head, t, hdr, data, n)
            self.rx_bufs[head] = b
            out.append(b)
        self.rx.publish()
        return out

    def _harvest_rx(self, rnd: RxRound) -> int:
        assert self.rx is not None
        new = self.rx.harvest()
        for u in new:
            rnd.packets.append(self._parse(u))
            rnd.payload_bytes += rnd.packets[-1].payload_len
        return len(new)

    def _parse(self, u: Used) -> RxPacket:
        buf = self.rx_bufs.pop(u.head, None)
        if buf is None:  # the control buffer
            buf = RxBuffer(u.head, -1, u.chain[0].gpa, u.chain[0].gpa + HDR_SIZE, u.chain[0].length - HDR_SIZE)
        return RxPacket(buf, u.length, VsockHdr.unpack(self.mem.read(buf.hdr_gpa, HDR_SIZE)), u.seq)

    def receive(self, nbytes: int, timeout: float, *, settle: float = 0.3) -> RxRound:
        """Wait, bounded, until the used RX entries carry nbytes of payload; stop early (without
        error) when no posted buffer is left, or when the RX error eventfd fired and nothing moved
        for `settle` seconds (a faulting copy: vhost dropped the packet). VhostTimeout otherwise."""
        assert self.rx is not None
        rnd = RxRound()
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_progress = t0
        while True:
            if self._harvest_rx(rnd):
                last_progress = time.monotonic()
            rnd.rx_errors += self._drain("rx_err")
            rnd.tx_errors += self._drain("tx_err")
            self._drain("rx_call")
            now = time.monotonic()
            if rnd.payload_bytes >= nbytes:
                rnd.why_stopped = "all bytes arrived"
                break
            if not self.rx.outstanding:
                rnd.why_stopped = "no posted RX buffer left"
                break
            if rnd.rx_errors and now - last_progress >= settle:
                rnd.why_stopped = f"RX error signalled, nothing used for {settle} s"
                break
            if now >= deadline:
                raise VhostTimeout(f"vhost delivered {rnd.payload_bytes} of {nbytes} bytes in {timeout:.0f} s "
                                   f"({len(rnd.packets)} packets; rx errors {rnd.rx_errors}): {self.state()}")
            self._wait(min(deadline - now, 0.05))
        rnd.waited = time.monotonic() - t0
        return rnd

    def stop(self) -> None:
        """VHOST_VSOCK_SET_RUNNING 0: the device detaches from its queues, waiting for the worker to
        leave them (it holds each queue's mutex while it works): no write into guest memory after."""
        assert self.dev is not None
        self.dev.set_running(False)

    def collect(self, rnd: RxRound) -> int:
        """Harvest, without waiting, what the device returned since (after stop(): the last of it)."""
        n = self._harvest_rx(rnd)
        rnd.rx_errors += self._drain("rx_err")
        rnd.tx_errors += self._drain("tx_err")
        return n

    def payload(self, pkt: RxPacket) -> bytes:
        """The payload bytes of a packet as guest memory holds them now."""
        return self.mem.read(pkt.data_gpa, min(pkt.payload_len, pkt.buf.data_len))

    def _send(self, hdr: VsockHdr, timeout: float) -> None:
        """One TX packet (header only) from a TX slot; waits, bounded, until vhost consumed it."""
        assert self.tx is not None
        self.tx.harvest()  # reclaim earlier ones
        slot = self.lay.tx_slot(self.tx.avail_shadow % self.tx.num)
        self.mem.write(slot, hdr.pack())
        self.tx.add([Seg(slot, HDR_SIZE, False)])
        self.tx.publish()
        self._kick("tx")
        deadline = time.monotonic() + timeout
        while self.tx.outstanding:
            self.tx.harvest()
            if not self.tx.outstanding:
                break
            if time.monotonic() >= deadline:
                raise VhostTimeout(f"vhost did not consume the TX packet ({hdr.describe()}) in {timeout:.0f} s: "
                                   f"{self.state()}")
            self._wait(0.05)
            self._drain("tx_call")

    def _hdr(self, op: int) -> VsockHdr:
        return VsockHdr(self.cid, uapi.VHOST_VSOCK_HOST_CID, self.guest_port, self.host_port, 0,
                        uapi.VIRTIO_VSOCK_TYPE_STREAM, op, 0, self.credit, self.fwd_cnt & 0xFFFFFFFF)

    def connect(self, host_port: int, timeout: float = 30.0) -> RxPacket:
        """REQUEST to the host's port; returns the RESPONSE vhost wrote into the control buffer."""
        assert self.rx is not None
        self.host_port = host_port
        self.guest_port = random.SystemRandom().randrange(1024, 1 << 31)
        self.rx.add([Seg(self.lay.ctl, PAGE, True)])
        self.rx.publish()
        self.kick_rx()
        self._send(self._hdr(uapi.VIRTIO_VSOCK_OP_REQUEST), timeout)
        rnd = RxRound()
        deadline = time.monotonic() + timeout
        while not rnd.packets:
            self._harvest_rx(rnd)
            if rnd.packets:
                break
            if time.monotonic() >= deadline:
                raise VhostTimeout(f"no reply to the REQUEST to port {host_port} in {timeout:.0f} s: {self.state()}")
            self._wait(0.05)
            self._drain("rx_call")
        reply = rnd.packets[0]
        if reply.hdr.op != uapi.VIRTIO_VSOCK_OP_RESPONSE:
            raise VhostError(errno.ECONNREFUSED, "vsock connect", f"the host answered {reply.hdr.describe()}")
        return reply

    def credit_update(self, consumed: int, timeout: float = 30.0) -> None:
        """Tell the host this driver consumed `consumed` more payload bytes (CREDIT_UPDATE)."""
        self.fwd_cnt += consumed
        self._send(self._hdr(uapi.VIRTIO_VSOCK_OP_CREDIT_UPDATE), timeout)

    def errors(self) -> tuple[int, int]:
        """(RX, TX) error eventfd signals since the last look."""
        return self._drain("rx_err"), self._drain("tx_err")

    def state(self) -> str:
        """The rings as the driver and the device see them (for failure messages)."""
        parts = []
        for q in (self.rx, self.tx):
            if q is None:
                continue
            s = (f"{'RX' if q is self.rx else 'TX'}: avail.idx {q.published}, used.idx {q.used_idx()}, "
                 f"harvested {q.last_used}, outstanding {q.outstanding}")
            if self.dev is not None and not self.dev.closed:
                try:
                    s += f", device last_avail_idx {self.dev.get_vring_base(q.index) & 0xFFFF}"
                except VhostError as e:
                    s += f", VHOST_GET_VRING_BASE: {e}"
            parts.append(s)
        return "; ".join(parts) + f"; cid {self.cid}, ports guest {self.guest_port} host {self.host_port}"

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self, timeout: float = 15.0, worker_timeout: float = 5.0) -> dict[str, float]:
        """Close the device (bounded) and wait until its worker is gone (bounded); the eventfds go
        too. Returns the seconds each took. VhostStuck when one bound passes."""
        if self.closed:
            return {}
        self.closed = True
        took: dict[str, float] = {}
        try:
            if self.dev is not None:
                took["close"] = self.dev.close(timeout)
                took["worker_gone"] = self.dev.wait_worker_gone(worker_timeout)
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        return took


__all__ = ["HDR_SIZE", "HostListener", "RxBuffer", "RxPacket", "RxRound", "VhostStuck", "VhostTimeout",
           "VsockDriver", "VsockHdr", "VsockLayout"]
