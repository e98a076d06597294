"""Oracles: pure functions that decide whether what KVM reported is what the guest did.

They take plain values (exits, expected accesses, page numbers, bytes) and return a Verdict
(verdict.py) whose problems say exactly what differs; `verdict.check(context)` turns it into an
AssertionError. So they can be unit-tested with synthetic inputs (tests/) and used unchanged by the
KVM cases (cases/): mmio (exact-address MMIO exits), dirty (dirty log/ring, live-migration copy,
write-back to disk), kvmclock (pvclock updates through the gfn_to_pfn_cache).
"""
