"""CPUID tables as KVM exchanges them (struct kvm_cpuid2), with lookups by leaf."""

from __future__ import annotations

from dataclasses import dataclass

from harness.kvm._cffi import ffi


@dataclass
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Cpuid:
    def __init__(self, entries: list[CpuidEntry]) -> None:
        self.entries = entries

    @classmethod
    def from_cdata(cls, c: object) -> Cpuid:
        return cls(
            [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (c.entries[i] for i in range(c.nent))  # type: ignore[attr-defined]
            ]
        )

    def to_cdata(self) -> tuple[object, object]:
        n = len(self.entries)
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
        c = ffi.cast("struct kvm_cpuid2 *", raw)
        c.nent = n
        for i, e in enumerate(self.entries):
            d = c.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        return c, raw

    def get(self, function: int, index: int = 0) -> CpuidEntry | None:
        for e in self.entries:
            if e.function == function and (e.index == index or not (e.flags & 1)):
                return e
        return None

    @property
    def maxphyaddr(self) -> int:
        e = self.get(0x80000008)
        return (e.eax & 0xFF) if e else 36

    @property
    def la57(self) -> bool:
        e = self.get(7, 0)
        return bool(e and e.ecx & (1 << 16))

    @property
    def gbpages(self) -> bool:
        e = self.get(0x80000001)
        return bool(e and e.edx & (1 << 26))

    @property
    def vendor(self) -> str:
        e = self.get(0)
        if not e:
            return "?"
        return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(errors="replace")
