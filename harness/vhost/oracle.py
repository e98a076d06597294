"""Oracles for what vhost wrote into guest memory: pure functions from plain values to a Verdict.

The host sends a stream of memtouch words: byte offset o of round r's stream is the 8-byte word
word(pattern_r, o) = (pattern_r ^ o) * MIX (harness.memory.memtouch), a bijection, so any word found
in memory says which round and which stream offset it came from (`Decoder`), and a page that holds
the wrong thing is named precisely: stale (an older round), poison (what the harness wrote before
posting the buffer: vhost's write is missing), zeros, or another offset (misplaced).

    rx_headers(packets, cid=..., host_port=..., guest_port=...)     every used chain's header
    rx_stream(pieces, sent, pattern, complete=True)                 the payloads are the stream
    page_images(...)                                                what each data page must hold
    region_contents(actual, expected, gpa=..., decoder=...)         memory (or disk) vs that
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from harness.memory.memtouch import MASK, MIX, words
from harness.oracles.verdict import Verdict
from harness.vhost import uapi
from harness.vhost.vsock import HDR_SIZE, RxPacket

MIX_INV = pow(MIX, -1, 1 << 64)


def stream(pattern: int, length: int, base: int = 0) -> bytes:
    """`length` bytes of the stream with this pattern, from stream offset `base` (8-aligned)."""
    return words(pattern & MASK, length, 8, base).tobytes()


def stream_offset(value: int, pattern: int) -> int:
    """The stream offset whose word is `value` under `pattern` (any value has one)."""
    return ((value * MIX_INV) & MASK) ^ (pattern & MASK)


@dataclass
class Decoder:
    """Names a word found in memory: which known stream (round data, poison) and offset it is."""

    streams: list[tuple[str, int, int]] = field(default_factory=list)  # (label, pattern, length)

    def add(self, label: str, pattern: int, length: int) -> Decoder:
        self.streams.append((label, pattern & MASK, length))
        return self

    def name(self, value: int) -> str:
        if value == 0:
            return "zero"
        for label, pattern, length in self.streams:
            o = stream_offset(value, pattern)
            if o < length and not o % 8:
                return f"{label} offset {o:#x}"
        return "unknown data"


def zero_or_expected(actual: bytes, expected: bytes) -> bool:
    """A page a hole punch raced with: every byte is what it should be or zero. (Byte-granular: a
    copy_to_user preempted mid-page resumes after the punch into a fresh zero page, so the page
    reads zeros up to any byte, then the payload; or the payload, then zeros where poison was.)"""
    return all(a == e or a == 0 for a, e in zip(actual, expected, strict=True))


def partial_copy(pattern: int, sent: bytes) -> Callable[[bytes, bytes], bool]:
    """A page whose copy faulted part-way (its mapping went away while vhost was copying into it,
    so vhost dropped the packet and did not return the buffer): some prefix, of any byte length, is
    a piece of the stream the host sent, and the rest is still what the page held before."""
    def ok(actual: bytes, expected: bytes) -> bool:
        k = len(actual)
        while k and actual[k - 1] == expected[k - 1]:
            k -= 1
        if k < 8:
            return True  # less than one word written: nothing to place in the stream
        o = stream_offset(int.from_bytes(actual[:8], "little"), pattern)
        return o % 8 == 0 and sent[o:o + k] == actual[:k]
    return ok


def rx_headers(packets: Sequence[RxPacket], *, cid: int, host_port: int, guest_port: int) -> Verdict:
    """Every used RX chain of a data round: an RW packet of this connection, hdr.len equal to what
    the used ring says was written beyond the header, and no more than the buffer holds."""
    out = []
    for p in packets:
        h = p.hdr
        where = f"used entry {p.seq} (head {p.buf.head}, data page {p.buf.tag}, GPA {p.buf.data_gpa:#x})"
        want = (uapi.VHOST_VSOCK_HOST_CID, cid, host_port, guest_port, uapi.VIRTIO_VSOCK_TYPE_STREAM,
                uapi.VIRTIO_VSOCK_OP_RW)
        have = (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.type, h.op)
        if have != want:
            out.append(f"{where}: header {h.describe()}; expected RW {want[0]}:{host_port} -> {cid}:{guest_port}")
        if p.used_len < HDR_SIZE:
            out.append(f"{where}: used.len {p.used_len} is shorter than the {HDR_SIZE}-byte header")
        elif h.len != p.used_len - HDR_SIZE:
            out.append(f"{where}: used.len {p.used_len} but hdr.len {h.len} (+{HDR_SIZE})")
        if p.payload_len > p.buf.data_len:
            out.append(f"{where}: {p.payload_len} payload bytes claimed in a {p.buf.data_len}-byte buffer")
    return Verdict.of("vhost RX headers", out, packets=len(packets))


def rx_stream(pieces: Sequence[tuple[RxPacket, bytes]], sent: bytes, pattern: int, *,
              complete: bool = True) -> Verdict:
    """The payloads, in used-ring order, against the stream the host sent.

    complete=True: they are exactly `sent`, nothing missing, nothing extra. complete=False (a round
    where vhost reported a fault and dropped packets): each payload is still a true piece of the
    stream, the pieces come in stream order and do not overlap; only gaps are allowed."""
    out = []
    total = sum(len(b) for _, b in pieces)
    if complete:
        got = b"".join(b for _, b in pieces)
        if got != sent:
            n = min(len(got), len(sent))
            i = next((i for i in range(0, n, 8) if got[i:i + 8] != sent[i:i + 8]), n)
            where = "at the end of what arrived" if i == n else ""
            pos, pkt = 0, None
            for p, b in pieces:
                if pos + len(b) > i:
                    pkt = p
                    break
                pos += len(b)
            if pkt is not None and i < n:
                where = (f"in used entry {pkt.seq} (data page {pkt.buf.tag}, GPA {pkt.data_gpa + i - pos:#x}): "
                         f"memory has {int.from_bytes(got[i:i + 8], 'little'):#x}, the host sent "
                         f"{int.from_bytes(sent[i:i + 8], 'little'):#x}")
            out.append(f"{total} of {len(sent)} stream bytes arrived; first difference at stream offset {i:#x} "
                       f"{where}")
        return Verdict.of("vhost RX stream", out, delivered=total, sent=len(sent))
    end = 0
    gaps = []
    for p, b in pieces:
        if not b:
            continue
        if len(b) % 8:
            out.append(f"used entry {p.seq}: {len(b)} payload bytes, not whole words")
            continue
        o = stream_offset(int.from_bytes(b[:8], "little"), pattern)
        if o % 8 or o + len(b) > len(sent) or sent[o:o + len(b)] != b:
            out.append(f"used entry {p.seq} (data page {p.buf.tag}, GPA {p.data_gpa:#x}): {len(b)} bytes that are "
                       f"no piece of the stream (first word {int.from_bytes(b[:8], 'little'):#x})")
            continue
        if o < end:
            out.append(f"used entry {p.seq}: stream offset {o:#x} repeats or goes back (previous piece ended "
                       f"at {end:#x})")
        elif o > end:
            gaps.append((end, o))
        end = o + len(b)
    return Verdict.of("vhost RX stream", out, delivered=total, sent=len(sent), gaps=gaps)


def page_images(pages: Iterable[int], poison: dict[int, bytes], filled: dict[int, tuple[int, bytes]],
                page: int = 4096) -> dict[int, bytes]:
    """What each data page must hold: the poison the harness wrote before posting it, overwritten
    from `filled[page] = (offset in page, payload)` where vhost returned the buffer."""
    out = {}
    for t in pages:
        img = bytearray(poison[t])
        if t in filled:
            off, data = filled[t]
            img[off:off + len(data)] = data
        out[t] = bytes(img[:page])
    return out


def region_contents(actual: bytes, expected: bytes, *, gpa: int, decoder: Decoder | None = None,
                    page: int = 4096, tolerate: Mapping[int, Callable[[bytes, bytes], bool]] | None = None,
                    what: str = "guest memory") -> Verdict:
    """actual vs expected, page by page (page i at gpa + i*page). `tolerate[i](actual_page,
    expected_page)` may accept a page that differs (a racing punch: `zero_or_expected`; a copy
    that faulted half-way: `partial_copy`). Each bad page is described by its first bad word, decoded."""
    dec = decoder or Decoder()
    tol = dict(tolerate or {})
    out = []
    bad = []
    tolerated = 0
    if len(actual) != len(expected):
        return Verdict.of(what, [f"{len(actual):#x} bytes read, {len(expected):#x} expected"])
    for i in range(0, len(actual) // page):
        a, e = actual[i * page:(i + 1) * page], expected[i * page:(i + 1) * page]
        if a == e:
            continue
        if i in tol and tol[i](a, e):
            tolerated += 1
            continue
        bad.append(i)
        if len(bad) <= 8:
            w = next(w for w in range(0, page, 8) if a[w:w + 8] != e[w:w + 8])
            have = int.from_bytes(a[w:w + 8], "little")
            want = int.from_bytes(e[w:w + 8], "little")
            form = " (and not of the tolerated form)" if i in tol else ""
            out.append(f"page {i} (GPA {gpa + i * page:#x}): word at +{w:#x} is {have:#x} ({dec.name(have)}), "
                       f"expected {want:#x} ({dec.name(want)}){form}")
    if len(bad) > 8:
        out.append(f"... {len(bad)} bad pages in all: {bad[:32]}")
    return Verdict.of(what, out, pages=len(actual) // page, bad_pages=len(bad), tolerated_pages=tolerated)
