"""Oracles for the guest areas KVM writes through a gfn_to_hva_cache (steal time, PV EOI, async PF, the
vAPIC word; harness.x86.pvmsr has the layouts and what makes KVM write what): pure functions over
plain values, each returning one Verdict, so tests/test_pvmsr.py can feed them stale, missing or
misplaced data.

The two-page oracle of the kvmclock cases, for these areas: after an invalidation of the page and the
next KVM write,
  - the page mapped now holds what KVM writes (a value the host could not have seeded there), at the
    struct's own bytes only, and the guest reads the same through its mapping;
  - the old page, which the host keeps mapped, is byte-for-byte what it was (a write there is a write
    through a stale translation).
Each seeded marker is chosen so that any KVM write changes it: steal time's version/steal/preempted,
the PV EOI byte 0x02 (KVM writes whole bytes 0 or 1), the async-PF token 0 (KVM writes 0xffffffff),
the vAPIC word's upper bytes 0xa5 (KVM writes the ISR/IRR summary there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from harness.oracles.verdict import Verdict
from harness.x86.pvmsr import (
    APF_WAKEUP_ALL_TOKEN,
    KVM_VCPU_PREEMPTED,
    ApfData,
    StealTime,
)


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Several oracles' verdicts as one: each problem prefixed once by its own oracle's name, the facts
    merged (Verdict.__add__ folded over many would prefix the combined names again and again)."""
    vs = list(verdicts)
    facts: dict = {}
    for v in vs:
        facts.update(v.facts)
    return Verdict(" + ".join(v.oracle for v in vs), tuple(f"{v.oracle}: {p}" for v in vs for p in v.problems),
                   facts)


def steal_time_update(seeded: StealTime, now: StealTime, *, max_steal_delta: int | None = None) -> Verdict:
    """The kvm_steal_time in the page mapped now, after at least one vCPU entry asked for an update.

    record_steal_time reads version and steal from the page: from a seeded even version V it leaves
    V + 2 per update (an odd seed is made even first), steal >= the seeded steal (it adds the task's
    run_delay growth, at most max_steal_delta ns), preempted 0 (or 1 if the task was preempted in
    KVM_RUN after the update), flags untouched."""
    out = []
    if now.version & 1:
        out.append(f"version {now.version} is odd: an update was left half-written")
    if now.version <= seeded.version:
        out.append(f"version {now.version} is not newer than the {seeded.version} the host seeded: no update "
                   "reached the page mapped now (stale gfn_to_hva_cache?)")
    if now.steal < seeded.steal:
        out.append(f"steal {now.steal} went below the seeded {seeded.steal} (KVM adds to what it reads there)")
    elif max_steal_delta is not None and now.steal - seeded.steal > max_steal_delta:
        out.append(f"steal grew by {now.steal - seeded.steal} ns, more than the vCPU task waited to run "
                   f"({max_steal_delta} ns of run_delay)")
    if now.flags != seeded.flags:
        out.append(f"flags {now.flags:#x} changed from the seeded {seeded.flags:#x} (KVM never writes them)")
    if now.preempted not in (0, KVM_VCPU_PREEMPTED):
        what = "still holds the seed" if now.preempted == seeded.preempted else "is neither 0 nor 1"
        out.append(f"preempted {now.preempted:#x} {what}: the update (which clears it) did not write here")
    return Verdict.of("steal time update", out, seeded_version=seeded.version, version=now.version,
                      steal_delta=now.steal - seeded.steal, preempted=now.preempted)


def steal_time_guest(guest: StealTime, host: StealTime, seeded: StealTime) -> Verdict:
    """What the guest read through its mapping (a consistent snapshot) against the page mapped now:
    newer than the seed and not newer than what the host sees after, steal in between, and preempted
    0 (KVM clears it on the entry that precedes any guest read)."""
    out = []
    if guest.version & 1:
        out.append(f"the guest read an odd version {guest.version}")
    if not seeded.version < guest.version <= host.version:
        out.append(f"the guest read version {guest.version}, the page mapped now holds {host.version} "
                   f"(seeded {seeded.version}): the guest does not read the page KVM updated")
    if not seeded.steal <= guest.steal <= host.steal:
        out.append(f"the guest read steal {guest.steal}, outside [{seeded.steal} seeded, {host.steal} now]")
    if guest.flags != seeded.flags:
        out.append(f"the guest read flags {guest.flags:#x}, the host seeded {seeded.flags:#x}")
    if guest.preempted != 0:
        out.append(f"the guest read preempted {guest.preempted:#x} while running (KVM clears it on entry)")
    return Verdict.of("steal time as the guest reads it", out, guest_version=guest.version)


def only_spans_changed(seeded: bytes, now: bytes, spans: Iterable[tuple[int, int]],
                       what: str = "the page mapped now") -> Verdict:
    """Bytes outside the (offset, size) spans KVM may write are as the host seeded them."""
    oracle = "only the struct's bytes written"
    if len(seeded) != len(now):
        return Verdict.of(oracle, [f"{what}: length {len(seeded)} -> {len(now)}"])
    allowed = bytearray(len(seeded))
    for off, size in spans:
        allowed[off:off + size] = b"\1" * size
    diffs = [i for i in range(len(seeded)) if seeded[i] != now[i] and not allowed[i]]
    if not diffs:
        return Verdict.of(oracle, [], changed_outside=0)
    i = diffs[0]
    return Verdict.of(oracle, [f"{what}: {len(diffs)} byte(s) outside the struct's fields changed, first at "
                               f"+{i:#x} ({seeded[i]:#04x} -> {now[i]:#04x})"], changed_outside=len(diffs))


def untouched(before: bytes, after: bytes, *, base: int = 0, what: str = "old page",
              decode: Callable[[bytes], str] | None = None, struct_off: int = 0) -> Verdict:
    """A page the host kept after it stopped being the guest's must still hold what it held then: a
    change is a write through a stale translation. decode(page[struct_off:]) describes the struct
    there for the message."""
    oracle = "old page untouched"
    if len(before) != len(after):
        return Verdict.of(oracle, [f"{what}: length changed {len(before)} -> {len(after)}"])
    diffs = [i for i in range(0, len(before), 8) if before[i:i + 8] != after[i:i + 8]]
    if not diffs:
        return Verdict.of(oracle, [], changed_words=0)
    first = diffs[0]
    msg = (f"{what} at {base:#x} changed after it stopped being the guest's: {len(diffs)} 8-byte words differ, "
           f"first at +{first:#x} ({before[first:first + 8].hex()} -> {after[first:first + 8].hex()})")
    if decode is not None:
        msg += f"; the struct there was {decode(before[struct_off:])}, now {decode(after[struct_off:])}"
    return Verdict.of(oracle, [msg], changed_words=len(diffs))


def interrupt_taken(taken: int, vector_seen: int, vector: int, isr: int, irr: int, what: str) -> Verdict:
    """One interrupt round: exactly one interrupt of `vector` handled, and afterwards neither in
    service (its EOI completed) nor requested again."""
    out = []
    if taken != 1:
        out.append(f"{what}: the guest handled {taken} interrupts, expected 1")
    elif vector_seen != vector:
        out.append(f"{what}: the guest handled vector {vector_seen:#x}, expected {vector:#x}")
    if isr:
        out.append(f"{what}: vector {vector:#x} is still in service after the handler (its EOI was lost)")
    if irr:
        out.append(f"{what}: vector {vector:#x} is requested again after the round")
    return Verdict.of("interrupt delivered", out, taken=taken)


def pv_eoi_round(seed: int, guest_seen: int, host_now: int, guest_after: int | None = None) -> Verdict:
    """The PV EOI byte: seeded `seed` (not 0 or 1) in the page mapped now before an interrupt round.

    KVM writes the whole byte: 1 when it injects (the guest may then clear it instead of an EOI
    write) and 0 on the next exit when it finds it still set; the guest's test-and-clear leaves 0.
    So the guest's handler must read 0 or 1 (1 unless an exit came between injection and the
    handler), never the seed, and after the round the byte is 0, as the guest reads it too
    (guest_after)."""
    out = []
    if seed in (0, 1):
        out.append(f"the seed {seed:#x} is a value KVM writes: it cannot tell a write from none")
    if guest_seen == seed:
        out.append(f"the guest's handler read the seed {seed:#04x}: KVM's PV EOI writes did not reach the page "
                   "the guest reads")
    elif guest_seen not in (0, 1):
        out.append(f"the guest's handler read {guest_seen:#04x}, neither the seed nor a value KVM writes")
    if host_now == seed:
        out.append(f"the page mapped now still holds the seed {seed:#04x}: KVM wrote the PV EOI byte elsewhere "
                   "(stale gfn_to_hva_cache?)")
    elif host_now != 0:
        out.append(f"the PV EOI byte is {host_now:#04x} after the round, expected 0 (cleared by the guest or by "
                   "KVM on the next exit)")
    if guest_after is not None and guest_after != host_now:
        out.append(f"the guest reads the PV EOI byte {guest_after:#04x} after the round, the page mapped now holds "
                   f"{host_now:#04x}")
    return Verdict.of("PV EOI byte", out, guest_seen=guest_seen, host_now=host_now)


def apf_wakeup_round(seeded: ApfData, now: ApfData, guest_token: int) -> Verdict:
    """The async-PF data after the broadcast 'page ready': KVM wrote token 0xffffffff into the page
    mapped now (seeded 0: the slot free), left flags as seeded, and the guest's handler read it."""
    out = []
    if seeded.token != 0:
        out.append(f"the seeded token {seeded.token:#x} is not 0: KVM delivers 'page ready' only into a free slot")
    if now.token != APF_WAKEUP_ALL_TOKEN:
        what = "still holds the seed" if now.token == seeded.token else "holds another value"
        out.append(f"token {now.token:#x} {what}: the 'page ready' write (token {APF_WAKEUP_ALL_TOKEN:#x}) did not "
                   "reach the page mapped now (stale gfn_to_hva_cache?)")
    if now.flags != seeded.flags:
        out.append(f"flags {now.flags:#x} changed from the seeded {seeded.flags:#x} (only a 'page not present' "
                   "injection writes them)")
    if guest_token != APF_WAKEUP_ALL_TOKEN:
        out.append(f"the guest's 'page ready' handler read token {guest_token:#x}, expected {APF_WAKEUP_ALL_TOKEN:#x}: "
                   "it does not read the page KVM wrote")
    return Verdict.of("async PF page-ready token", out, token=now.token, guest_token=guest_token)


def vapic_round(seed: int, want: Iterable[int], guest_seen: int, host_now: int) -> Verdict:
    """The vAPIC u32: seeded `seed` (upper bytes KVM overwrites) in the page mapped now; `want` are the
    words KVM may write in this round (harness.x86.pvmsr.vapic_word: with the vector in service, and
    with nothing pending once it was EOI'd and another event entry came). The guest (reading through
    its mapping) and the page mapped now must each hold one of them, never the seed."""
    want = list(want)
    out = []
    if seed in want:
        out.append(f"the seed {seed:#010x} is a value KVM writes here: it cannot tell a write from none")
    words = " or ".join(f"{w:#010x}" for w in want)
    if guest_seen not in want:
        what = ("the seed: the guest does not read the page KVM wrote" if guest_seen == seed
                else "a word KVM would not write now")
        out.append(f"the guest read the vAPIC word {guest_seen:#010x} ({what}); KVM writes {words}")
    if host_now not in want:
        what = "still holds the seed" if host_now == seed else "holds a word KVM would not write now"
        out.append(f"the vAPIC word in the page mapped now ({host_now:#010x}) {what}; KVM writes {words}")
    return Verdict.of("vAPIC word", out, guest_seen=guest_seen, host_now=host_now)
