"""harness.kvm.stats against a stats file laid out as KVM's binary stats (header, id, descriptors,
data): read() and value() find every counter at its own offset."""

from __future__ import annotations

import os
import struct

import pytest

from harness.kvm.stats import _DESC, _HDR, Stats

NAME_SIZE = 48


def _stats_file(tmp_path, counters: dict[str, tuple[int, ...]]) -> int:
    id_off = _HDR.size
    desc_off = id_off + NAME_SIZE
    dsz = _DESC.size + NAME_SIZE
    data_off = desc_off + dsz * len(counters)
    descs, data, off = b"", b"", 0
    for name, vals in counters.items():
        descs += _DESC.pack(0, 0, len(vals), off, 0) + name.encode().ljust(NAME_SIZE, b"\0")
        data += struct.pack(f"<{len(vals)}Q", *vals)
        off += 8 * len(vals)
    raw = _HDR.pack(0, NAME_SIZE, len(counters), id_off, desc_off, data_off)
    raw += b"kvm-1234/vcpu-0".ljust(NAME_SIZE, b"\0") + descs + data
    p = tmp_path / "stats"
    p.write_bytes(raw)
    return os.open(p, os.O_RDONLY)


def test_value_reads_one_counter_at_its_offset(tmp_path):
    st = Stats(_stats_file(tmp_path, {"halt_exits": (7,), "hist": (1, 2, 3), "exits": ((1 << 40) + 5,),
                                      "io_exits": (9,)}))
    try:
        assert st.value("exits") == (1 << 40) + 5 and st.value("io_exits") == 9 and st.value("halt_exits") == 7
        assert {n: st.value(n) for n in ("halt_exits", "exits", "io_exits")} == \
            {n: v for n, v in st.read().items() if n != "hist"}
        with pytest.raises(KeyError, match=r"kvm-1234/vcpu-0: no statistic 'nope'"):
            st.value("nope")
    finally:
        st.close()
