"""KVM binary statistics (KVM_GET_STATS_FD): header, descriptors and values by name."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

_HDR = struct.Struct("<6I")
_DESC = struct.Struct("<IhHII")

STATS_TYPE = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
STATS_UNIT = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}


@dataclass(frozen=True)
class StatDesc:
    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> str:
        return STATS_TYPE.get(self.flags & 0xF, "?")

    @property
    def unit(self) -> str:
        return STATS_UNIT.get((self.flags >> 4) & 0xF, "?")


class Stats:
    """Reads a stats fd; descriptors are parsed on first use (not at open: the fd is opened for every
    vCPU the watchdog registers, for hang diagnostics that rarely run: 20 ms per vCPU under TCG),
    values on each read()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._descs: list[StatDesc] | None = None

    def _load(self) -> list[StatDesc]:
        fd = self.fd
        hdr = os.pread(fd, _HDR.size, 0)
        self.flags, self.name_size, num_desc, id_off, desc_off, self.data_offset = _HDR.unpack(hdr)
        self._id = os.pread(fd, self.name_size, id_off).split(b"\0", 1)[0].decode()
        dsz = _DESC.size + self.name_size
        raw = os.pread(fd, dsz * num_desc, desc_off)
        descs = []
        for i in range(num_desc):
            flags, exp, size, off, bucket = _DESC.unpack_from(raw, i * dsz)
            name = raw[i * dsz + _DESC.size : (i + 1) * dsz].split(b"\0", 1)[0].decode()
            descs.append(StatDesc(name, flags, exp, size, off, bucket))
        self._data_len = max((d.offset + 8 * d.size for d in descs), default=0)
        self._descs = descs
        return descs

    @property
    def descs(self) -> list[StatDesc]:
        return self._descs if self._descs is not None else self._load()

    @property
    def id(self) -> str:
        if self._descs is None:
            self._load()
        return self._id

    def read(self) -> dict[str, int | tuple[int, ...]]:
        descs = self.descs
        data = os.pread(self.fd, self._data_len, self.data_offset)
        out: dict[str, int | tuple[int, ...]] = {}
        for d in descs:
            vals = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = vals[0] if d.size == 1 else vals
        return out

    def value(self, name: str) -> int:
        """One counter's value (a single pread): for a hot path that needs one stat, not all."""
        for d in self.descs:
            if d.name == name:
                return struct.unpack("<Q", os.pread(self.fd, 8, self.data_offset + d.offset))[0]
        raise KeyError(f"{self.id}: no statistic {name!r}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def delta(before: dict[str, int | tuple[int, ...]], after: dict[str, int | tuple[int, ...]]) -> dict[str, int]:
    """Scalar stats that changed, as after - before."""
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, int) and isinstance(b, int) and v != b:
            out[k] = v - b
    return out
