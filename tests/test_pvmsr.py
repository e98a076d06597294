"""The PV MSR layouts (harness.x86.pvmsr) pinned against Documentation/virt/kvm/x86/msr.rst, and the
oracles of cases/test_pv_pages.py (harness.oracles.pvpages) failing on stale, misplaced or missing
writes - without KVM. The planted faults at the end model KVM's writes on plain bytes (a write one page
away from where the MSR points the harness; the harness reading the old page) and show each oracle
catches them."""

from __future__ import annotations

import random
import struct

import pytest

from harness.kvm.cpuid import Cpuid, CpuidEntry
from harness.oracles.pvpages import (
    apf_wakeup_round,
    combine,
    interrupt_taken,
    only_spans_changed,
    pv_eoi_round,
    steal_time_guest,
    steal_time_update,
    untouched,
    vapic_round,
)
from harness.oracles.verdict import OracleFailure
from harness.x86 import pvmsr
from harness.x86.pvmsr import ApfData, StealTime

PAGE = 4096


# ---- numbers and layouts (msr.rst, arch/x86/include/uapi/asm/kvm_para.h) -------------------------------
def test_msr_numbers():
    assert pvmsr.MSR_KVM_ASYNC_PF_EN == 0x4B564D02
    assert pvmsr.MSR_KVM_STEAL_TIME == 0x4B564D03
    assert pvmsr.MSR_KVM_PV_EOI_EN == 0x4B564D04
    assert pvmsr.MSR_KVM_POLL_CONTROL == 0x4B564D05
    assert pvmsr.MSR_KVM_ASYNC_PF_INT == 0x4B564D06
    assert pvmsr.MSR_KVM_ASYNC_PF_ACK == 0x4B564D07
    # msr.rst: custom MSRs live in 0x4b564d00..0x4b564dff
    for m in (pvmsr.MSR_KVM_ASYNC_PF_EN, pvmsr.MSR_KVM_STEAL_TIME, pvmsr.MSR_KVM_PV_EOI_EN,
              pvmsr.MSR_KVM_ASYNC_PF_INT, pvmsr.MSR_KVM_ASYNC_PF_ACK):
        assert 0x4B564D00 <= m <= 0x4B564DFF


def test_feature_bits():
    """CPUID 0x40000001 eax (cpuid.rst / kvm_para.h)."""
    assert pvmsr.KVM_CPUID_FEATURES == 0x40000001
    assert pvmsr.KVM_FEATURE_ASYNC_PF == 1 << 4
    assert pvmsr.KVM_FEATURE_STEAL_TIME == 1 << 5
    assert pvmsr.KVM_FEATURE_PV_EOI == 1 << 6
    assert pvmsr.KVM_FEATURE_PV_TLB_FLUSH == 1 << 9
    assert pvmsr.KVM_FEATURE_ASYNC_PF_VMEXIT == 1 << 10
    assert pvmsr.KVM_FEATURE_ASYNC_PF_INT == 1 << 14


def test_steal_time_layout():
    """struct kvm_steal_time: u64 steal, u32 version, u32 flags, u8 preempted, u8 u8_pad[3],
    u32 pad[11] - 64 bytes, 64-byte aligned, bit 0 enable, bits 5:1 reserved."""
    assert pvmsr.STEAL_TIME_SIZE == 8 + 4 + 4 + 1 + 3 + 11 * 4 == 64
    assert (pvmsr.ST_STEAL, pvmsr.ST_VERSION, pvmsr.ST_FLAGS, pvmsr.ST_PREEMPTED) == (0, 8, 12, 16)
    st = StealTime(steal=0x1122334455667788, version=0xAABBCCDD, flags=0x01020304, preempted=1)
    raw = st.pack()
    assert len(raw) == 64
    assert raw[0:8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[8:12] == (0xAABBCCDD).to_bytes(4, "little")
    assert raw[12:16] == (0x01020304).to_bytes(4, "little")
    assert raw[16] == 1 and raw[17:] == bytes(47)
    assert StealTime.parse(raw) == st
    assert pvmsr.STEAL_TIME_ALIGN == 64 and pvmsr.KVM_STEAL_RESERVED_MASK == 0b111110
    assert pvmsr.KVM_VCPU_PREEMPTED == 1 and pvmsr.KVM_VCPU_FLUSH_TLB == 2
    # KVM writes steal, version and preempted only
    assert pvmsr.ST_WRITTEN == ((0, 8), (8, 4), (16, 1))


def test_steal_time_pack_into_keeps_padding():
    buf = bytearray(random.Random(1).randbytes(128))
    pad = bytes(buf[0x40 + 17:0x40 + 64])
    StealTime(5, 6, 7, 0x80).pack_into(buf, 0x40)
    assert StealTime.parse(bytes(buf[0x40:])) == StealTime(5, 6, 7, 0x80)
    assert bytes(buf[0x40 + 17:0x40 + 64]) == pad


def test_steal_time_from_sync():
    """guests/payloads/pvpages.c cmd 2: SYNC(version, steal, flags, preempted, tries)."""
    assert StealTime.from_sync((1002, 777, 3, 0, 1)) == StealTime(777, 1002, 3, 0)


def test_apf_layout():
    """struct kvm_vcpu_pv_apf_data: u32 flags, u32 token, u8 pad[56] - 64 bytes, 64-byte aligned GPA
    in bits 63:6, bits 5:4 reserved; bit 0 enable, 1 send always, 2 as #PF vmexit, 3 as interrupt."""
    raw = ApfData(1, 0xDEADBEEF).pack()
    assert len(raw) == pvmsr.APF_DATA_SIZE == 64
    assert raw[:8] == struct.pack("<II", 1, 0xDEADBEEF) and raw[8:] == bytes(56)
    assert ApfData.parse(raw) == ApfData(1, 0xDEADBEEF)
    assert (pvmsr.APF_FLAGS, pvmsr.APF_TOKEN) == (0, 4)
    assert (pvmsr.KVM_ASYNC_PF_ENABLED, pvmsr.KVM_ASYNC_PF_SEND_ALWAYS, pvmsr.KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
            pvmsr.KVM_ASYNC_PF_DELIVERY_AS_INT) == (1, 2, 4, 8)
    assert pvmsr.ASYNC_PF_RESERVED == 0b110000 and pvmsr.ASYNC_PF_ALIGN == 64
    assert pvmsr.KVM_PV_REASON_PAGE_NOT_PRESENT == 1 and pvmsr.APF_WAKEUP_ALL_TOKEN == 0xFFFFFFFF
    assert pvmsr.APF_VEC_MASK == 0xFF


def test_pv_eoi_layout():
    """MSR_KVM_EOI_EN: bit 0 enable, bit 1 reserved, bits 63:2 a 4-byte aligned GPA of a 4-byte area
    whose least significant bit KVM writes."""
    assert pvmsr.PV_EOI_ALIGN == 4 and pvmsr.PV_EOI_RESERVED == 2 and pvmsr.PV_EOI_AREA == 4
    assert pvmsr.KVM_PV_EOI_ENABLED == 1


def test_enable_values_and_alignment():
    gpa = 1 << 40
    assert pvmsr.steal_time_value(gpa + 0x40) == gpa + 0x41
    assert pvmsr.steal_time_value(gpa + 0x40, enable=False) == gpa + 0x40
    assert pvmsr.pv_eoi_value(gpa + 0x84) == gpa + 0x85
    assert pvmsr.async_pf_value(gpa + 0xC0) == gpa + 0xC0 + 0b1011  # enable, send always, as interrupt
    assert pvmsr.async_pf_value(gpa, send_always=False, as_int=False) == gpa | 1
    assert pvmsr.async_pf_value(gpa, pf_vmexit=True) & pvmsr.KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT
    assert pvmsr.async_pf_int_value(0xED) == 0xED
    for fn, bad in ((pvmsr.steal_time_value, gpa + 0x20), (pvmsr.steal_time_value, gpa + 2),
                    (pvmsr.pv_eoi_value, gpa + 2), (pvmsr.pv_eoi_value, gpa + 1),
                    (pvmsr.async_pf_value, gpa + 0x10), (pvmsr.async_pf_int_value, 0x100),
                    (pvmsr.async_pf_int_value, 3)):
        with pytest.raises(ValueError):
            fn(bad)
    # what the helpers produce never sets a reserved bit
    assert not pvmsr.steal_time_value(gpa + 0x40) & pvmsr.KVM_STEAL_RESERVED_MASK
    assert not pvmsr.pv_eoi_value(gpa + 4) & pvmsr.PV_EOI_RESERVED
    assert not pvmsr.async_pf_value(gpa + 0x40) & pvmsr.ASYNC_PF_RESERVED


def test_vapic_word():
    """kvm_lapic_sync_to_vapic: tpr | (max_isr & 0xf0) << 8 | max_irr << 24, -1 counting as 0."""
    assert pvmsr.vapic_word(0, -1, -1) == 0
    assert pvmsr.vapic_word(0x20, 0xEC, -1) == 0xE020
    assert pvmsr.vapic_word(0, 0xEC, 0x31) == 0x3100E000
    assert pvmsr.VAPIC_SIZE == 4 and pvmsr.KVM_CAP_VAPIC == 6


def _cpuid(eax_features: int | None, sig: bytes = pvmsr.KVM_SIGNATURE) -> Cpuid:
    ebx, ecx, edx = struct.unpack("<III", sig)
    entries = [CpuidEntry(0x40000000, 0, 0, 0x40000001, ebx, ecx, edx)]
    if eax_features is not None:
        entries.append(CpuidEntry(0x40000001, 0, 0, eax_features, 0, 0, 0))
    return Cpuid(entries)


def test_pv_features_from_cpuid():
    assert pvmsr.pv_features(_cpuid(0x1007EFB)) == 0x1007EFB  # what kvm_pvm reports
    assert pvmsr.pv_features(_cpuid(0x1007EFB, b"Microsoft Hv")) == 0  # not KVM's leaves
    assert pvmsr.pv_features(Cpuid([])) == 0
    assert pvmsr.pv_features(_cpuid(None)) == 0
    assert pvmsr.missing_features(0x1007EFB, pvmsr.KVM_FEATURE_STEAL_TIME | pvmsr.KVM_FEATURE_PV_EOI) is None
    apf = pvmsr.KVM_FEATURE_ASYNC_PF
    why = pvmsr.missing_features(apf, apf | pvmsr.KVM_FEATURE_ASYNC_PF_INT)
    assert why is not None and "KVM_FEATURE_ASYNC_PF_INT" in why and "0x40000001" in why
    assert "KVM_FEATURE_ASYNC_PF," not in why  # only what is missing


# ---- steal time oracles -----------------------------------------------------------------------------------
SEED = StealTime(steal=5_000_000, version=1000, flags=0xC0FFEE, preempted=0x80)
GOOD = StealTime(steal=5_000_300, version=1002, flags=0xC0FFEE, preempted=0)


def test_steal_time_update_good():
    v = steal_time_update(SEED, GOOD, max_steal_delta=1000)
    assert v.ok and v.facts["steal_delta"] == 300
    assert steal_time_update(SEED, StealTime(5_000_300, 1004, 0xC0FFEE, 1), max_steal_delta=1000).ok  # preempted later


def test_steal_time_update_stale_page():
    """The page mapped now still holds the seed: KVM's update went elsewhere."""
    v = steal_time_update(SEED, SEED)
    assert any("not newer than the 1000" in p and "stale" in p for p in v.problems)
    assert any("preempted 0x80 still holds the seed" in p for p in v.problems)
    with pytest.raises(OracleFailure) as ei:
        v.check("anon/slot-move round 1")
    assert "(anon/slot-move round 1)" in str(ei.value)


def test_steal_time_update_broken_fields():
    half = StealTime(5_000_300, 1001, 0xC0FFEE, 0)
    assert any("odd" in p for p in steal_time_update(SEED, half).problems)
    back = StealTime(4_000_000, 1002, 0xC0FFEE, 0)
    assert any("went below" in p for p in steal_time_update(SEED, back).problems)
    assert any("more than the vCPU task waited" in p
               for p in steal_time_update(SEED, GOOD, max_steal_delta=299).problems)
    flags = StealTime(5_000_300, 1002, 0, 0)
    assert any("flags 0x0 changed" in p for p in steal_time_update(SEED, flags).problems)
    junk = StealTime(5_000_300, 1002, 0xC0FFEE, 7)
    assert any("neither 0 nor 1" in p for p in steal_time_update(SEED, junk).problems)


def test_steal_time_guest():
    assert steal_time_guest(GOOD, GOOD, SEED).ok
    assert steal_time_guest(StealTime(5_000_100, 1002, 0xC0FFEE, 0), StealTime(5_000_300, 1004, 0xC0FFEE, 0), SEED).ok
    # the guest reads another page than the host: it sees the seed, or last round's struct
    assert any("does not read the page" in p for p in steal_time_guest(SEED, GOOD, SEED).problems)
    older = StealTime(4_000_000, 902, 0, 0)
    probs = steal_time_guest(older, GOOD, SEED).problems
    assert any("does not read the page" in p for p in probs) and any("outside" in p for p in probs)
    assert any("flags" in p for p in probs)
    preempted = StealTime(5_000_300, 1002, 0xC0FFEE, 1)
    assert any("while running" in p for p in steal_time_guest(preempted, GOOD, SEED).problems)
    half = StealTime(5_000_300, 1001, 0xC0FFEE, 0)
    assert any("odd" in p for p in steal_time_guest(half, GOOD, SEED).problems)


def test_combine_prefixes_each_problem_once():
    a = steal_time_update(SEED, SEED)
    b = only_spans_changed(b"\0" * 8, b"\1" * 8, [])
    c = combine([a, b, interrupt_taken(1, 0xEC, 0xEC, 0, 0, "x")])
    assert c.oracle == "steal time update + only the struct's bytes written + interrupt delivered"
    assert len(c.problems) == len(a.problems) + 1
    assert all(p.count("steal time update:") + p.count("only the struct's bytes written:") == 1 for p in c.problems)
    assert c.facts["taken"] == 1 and c.facts["changed_outside"] == 8
    assert combine([interrupt_taken(1, 0xEC, 0xEC, 0, 0, "x")]).ok


# ---- page oracles ---------------------------------------------------------------------------------------------
def test_only_spans_changed():
    seeded = random.Random(2).randbytes(PAGE)
    now = bytearray(seeded)
    now[0x40:0x48] = bytes(8)  # steal
    assert only_spans_changed(seeded, bytes(now), [(0x40, 8)]).ok
    now[0x4C] ^= 1  # flags: KVM never writes them
    v = only_spans_changed(seeded, bytes(now), [(0x40, 8), (0x48, 4), (0x50, 1)])
    (msg,) = v.problems
    assert "+0x4c" in msg and v.facts["changed_outside"] == 1
    assert "length" in only_spans_changed(b"\0" * 8, b"\0" * 4, []).problems[0]


def test_untouched_names_the_stale_write():
    before = bytearray(random.Random(3).randbytes(PAGE))
    after = bytearray(before)
    GOOD.pack_into(after, 0x40)  # a steal-time update landed in the page the guest no longer has
    v = untouched(bytes(before), bytes(after), base=1 << 40, what="old page (moved to 0x7f00)",
                  decode=lambda raw: StealTime.parse(raw).describe(), struct_off=0x40)
    (msg,) = v.problems
    assert "old page (moved to 0x7f00) at 0x10000000000" in msg and "+0x40" in msg
    assert "now version=1002" in msg
    assert untouched(bytes(before), bytes(before)).ok
    assert "length" in untouched(b"\0" * 8, b"").problems[0]


# ---- interrupt-driven areas -------------------------------------------------------------------------------------
def test_interrupt_taken():
    assert interrupt_taken(1, 0xEC, 0xEC, 0, 0, "pv_eoi").ok
    assert any("handled 0 interrupts" in p for p in interrupt_taken(0, 0, 0xEC, 0, 0, "x").problems)
    assert any("vector 0xed" in p for p in interrupt_taken(1, 0xED, 0xEC, 0, 0, "x").problems)
    assert any("still in service" in p for p in interrupt_taken(1, 0xEC, 0xEC, 1, 0, "x").problems)
    assert any("requested again" in p for p in interrupt_taken(1, 0xEC, 0xEC, 0, 1, "x").problems)


def test_pv_eoi_round():
    assert pv_eoi_round(2, 1, 0).ok  # the guest saw KVM's 1, cleared it
    assert pv_eoi_round(2, 0, 0).ok  # an exit between injection and the handler: KVM cleared it first
    stale = pv_eoi_round(2, 2, 2)  # KVM wrote the old page: the guest and the host see the seed
    assert any("did not reach the page the guest reads" in p for p in stale.problems)
    assert any("still holds the seed" in p for p in stale.problems)
    assert any("neither the seed nor" in p for p in pv_eoi_round(2, 0x81, 0).problems)
    assert any("expected 0" in p for p in pv_eoi_round(2, 1, 1).problems)
    assert pv_eoi_round(2, 1, 0, guest_after=0).ok
    assert any("the guest reads the PV EOI byte 0x01 after" in p for p in pv_eoi_round(2, 1, 0, guest_after=1).problems)
    assert any("cannot tell" in p for p in pv_eoi_round(0, 0, 0).problems)


def test_apf_wakeup_round():
    tok = pvmsr.APF_WAKEUP_ALL_TOKEN
    assert apf_wakeup_round(ApfData(0, 0), ApfData(0, tok), tok).ok
    stale = apf_wakeup_round(ApfData(0, 0), ApfData(0, 0), 0)
    assert any("still holds the seed" in p for p in stale.problems)
    assert any("does not read the page KVM wrote" in p for p in stale.problems)
    assert any("flags" in p for p in apf_wakeup_round(ApfData(0, 0), ApfData(1, tok), tok).problems)
    assert any("free slot" in p for p in apf_wakeup_round(ApfData(0, 5), ApfData(0, tok), tok).problems)


def test_vapic_round():
    seed = 0xA5A5A500
    want = [pvmsr.vapic_word(0, 0xEC, -1), pvmsr.vapic_word(0, -1, -1)]
    assert vapic_round(seed, want, 0xE000, 0xE000).ok
    assert vapic_round(seed, want, 0xE000, 0).ok  # EOI'd, then another event entry rewrote it
    stale = vapic_round(seed, want, seed, seed)
    assert any("the seed: the guest does not read" in p for p in stale.problems)
    assert any("still holds the seed" in p for p in stale.problems)
    assert any("would not write" in p for p in vapic_round(seed, want, 0xEC00E000, 0).problems)
    assert any("cannot tell" in p for p in vapic_round(0, want, 0, 0).problems)


# ---- planted faults: KVM's writes modelled on bytes ---------------------------------------------------------------
def _record_steal_time(page: bytearray, off: int, delta: int) -> None:
    """record_steal_time as msr.rst and x86.c describe it: version made even, +1, steal += delta, +1,
    preempted cleared (on whatever bytes the cache resolves to)."""
    st = StealTime.parse(bytes(page[off:off + 64]))
    v = st.version + (st.version & 1) + 2
    StealTime(st.steal + delta, v, st.flags, 0).pack_into(page, off)


def _unit_with_seed(off: int) -> tuple[bytearray, bytes]:
    unit = bytearray(random.Random(4).randbytes(2 * PAGE))
    SEED.pack_into(unit, off)
    return unit, bytes(unit[:PAGE])


def test_plant_msr_one_page_away_fails():
    """The MSR points one page past the struct the harness seeded: KVM's update lands in the second
    page, the page the harness judges still holds the seed."""
    off = 0x40
    unit, seeded = _unit_with_seed(off)
    _record_steal_time(unit, off, 300)  # the correct MSR: the oracles pass
    now = bytes(unit[:PAGE])
    assert steal_time_update(SEED, StealTime.parse(now[off:]), max_steal_delta=1000).ok
    assert only_spans_changed(seeded, now, [(off + o, n) for o, n in pvmsr.ST_WRITTEN]).ok

    unit, seeded = _unit_with_seed(off)
    _record_steal_time(unit, PAGE + off, 300)  # planted: gpa + 4096
    now = bytes(unit[:PAGE])
    v = steal_time_update(SEED, StealTime.parse(now[off:]), max_steal_delta=1000)
    assert not v.ok and any("no update reached the page mapped now" in p for p in v.problems)
    guest = StealTime.parse(now[off:])  # the guest reads its mapping: the seed
    assert not steal_time_guest(guest, StealTime.parse(now[off:]), SEED).ok


def test_plant_harness_reads_the_old_page_fails():
    """KVM writes the page mapped now; a harness that read the old (kept) page instead would see the
    seed there - and the old-page oracle, fed the new page as 'old', sees the update as a stale write."""
    off = 0x40
    old = bytearray(random.Random(6).randbytes(PAGE))
    SEED.pack_into(old, off)
    new = bytearray(old)
    _record_steal_time(new, off, 300)
    assert not steal_time_update(SEED, StealTime.parse(bytes(old[off:]))).ok  # planted: read old
    assert steal_time_update(SEED, StealTime.parse(bytes(new[off:]))).ok
    assert not untouched(bytes(old), bytes(new), decode=lambda r: StealTime.parse(r).describe(), struct_off=off).ok
    # the same for the PV EOI byte and the async-PF token
    assert not pv_eoi_round(2, 2, 2).ok and pv_eoi_round(2, 1, 0).ok
    tok = pvmsr.APF_WAKEUP_ALL_TOKEN
    assert not apf_wakeup_round(ApfData(0, 0), ApfData(0, 0), tok).ok
