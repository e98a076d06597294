"""Oracles: pure functions that decide whether what KVM reported is what the guest did.

They take plain values (exits, expected accesses) and raise an AssertionError subclass whose message
says exactly what differs, so they can be unit-tested with synthetic inputs (tests/) and used
unchanged by the KVM cases (cases/).
"""
