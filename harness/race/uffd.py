"""Faults held open on purpose: what the userfaultfd race mode (disruptors/uffd.py) records, and
its own oracle, `uffd`.

The mode makes the retry path of KVM's page fault run on every operation instead of by chance: a
vCPU's fault on a page the host released blocks in handle_userfault() inside get_user_pages (KVM's
hva_to_pfn), the host fires the mmu_notifier on that range while the fault is held (so
mmu_invalidate_seq moves under it), and only then lets the fault go. The stale oracle judges what
the guest reads afterwards; this module's oracle judges that the mode did what it claims:

  - faults were held at all, and held faults saw an invalidation while held (else nothing raced);
  - every held fault came from a racing vCPU inside KVM_RUN (a host thread blocking in the harness's
    own userfaultfd is a harness bug, and a deadlock waiting to happen);
  - no message named a page outside the operation's range, and no fault was left held when the
    mode let go of its userfaultfd.

The kernel stacks of the first few held vCPU threads are sampled (/proc/self/task/<tid>/stack) and
classified: `kvm-gup` (handle_userfault under KVM's hva_to_pfn / get_user_pages: the path this mode
is about), `userfaultfd` (held, but no KVM frame in the stack), `unreadable`. Pure: the disruptor
fills a HoldStats, tests/test_uffd_oracles.py feeds it broken inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from harness.oracles.verdict import Verdict

ORACLE = "uffd"
MAX_DETAILS = 10

# frames that put a held fault inside KVM's own get_user_pages (hva_to_pfn and its callers)
KVM_GUP_FRAMES = ("hva_to_pfn", "kvm_follow_pfn", "__kvm_faultin_pfn", "kvm_faultin_pfn", "__gfn_to_pfn",
                  "kvm_mmu_faultin_pfn")
# ... inside KVM's own copy_from_user / copy_to_user of guest memory (the instruction emulator's reads and
# writes: kvm_vcpu_read_guest -> __kvm_read_guest_page), which have no pfn for an invalidation to make stale
KVM_UACCESS_FRAMES = ("__kvm_read_guest_page", "__kvm_write_guest_page", "kvm_vcpu_read_guest",
                      "kvm_vcpu_write_guest", "kvm_read_guest", "kvm_write_guest")
UFFD_FRAMES = ("handle_userfault",)
STACK_KINDS = {
    "kvm-gup": "inside KVM's get_user_pages (hva_to_pfn)",
    "kvm-uaccess": "inside KVM's copy_from_user/copy_to_user of guest memory (kvm_vcpu_read_guest: the "
                   "instruction emulator)",
    "userfaultfd": "in handle_userfault, under neither",
    "elsewhere": "not in handle_userfault (already let go when read)",
    "unreadable": "its kernel stack was unreadable",
}


def classify_stack(stack: str) -> str:
    """Where a held thread waits, from its kernel stack (/proc/self/task/<tid>/stack): one of
    STACK_KINDS."""
    if not stack.strip() or stack.startswith("("):
        return "unreadable"
    if not any(f in stack for f in UFFD_FRAMES):
        return "elsewhere"
    if any(f in stack for f in KVM_GUP_FRAMES):
        return "kvm-gup"
    if any(f in stack for f in KVM_UACCESS_FRAMES):
        return "kvm-uaccess"
    return "userfaultfd"


def frames(stack: str, n: int = 24) -> str:
    """A kernel stack as one line: `f0 <- f1 <- ...` (symbols only)."""
    out = [ln.split("] ", 1)[-1].split("+")[0] for ln in stack.strip().splitlines()]
    return " <- ".join(out[:n])


@dataclass
class HoldStats:
    """What one uffd disruptor did and saw. Times in nanoseconds."""

    mode: str = "missing"  # "missing" (UFFDIO_REGISTER_MODE_MISSING) or "wp"
    features: str = ""  # the userfaultfd features in use, by name
    ops: int = 0
    held: int = 0  # fault messages naming a page of the op's range (each: one vCPU held in GUP)
    held_ops: int = 0  # ops during which at least one fault was held
    unheld_ops: int = 0  # ops no vCPU faulted into within the wait (resolved all the same)
    invalidated: int = 0  # held faults that saw an mmu_notifier invalidation of the range while held
    invalidations: dict[str, int] = field(default_factory=dict)  # how, per kind
    resolutions: dict[str, int] = field(default_factory=dict)  # how held faults were let go, per kind
    copies: int = 0  # UFFDIO_COPY calls
    zeropages: int = 0  # UFFDIO_ZEROPAGE calls
    wakes: int = 0  # UFFDIO_WAKE calls
    unprotects: int = 0  # UFFDIO_WRITEPROTECT clearing (wp mode)
    host_writes: int = 0  # pwrite()s of the new generation into the file before a WAKE
    vcpu_faults: int = 0  # held faults whose thread is a racing vCPU inside KVM_RUN
    write_faults: int = 0  # ... with UFFD_PAGEFAULT_FLAG_WRITE
    foreign: list[str] = field(default_factory=list)  # held faults from any other thread
    stray: list[str] = field(default_factory=list)  # messages naming a page outside the op's range
    left_held: int = 0  # faults still queued when the userfaultfd was let go
    held_ns_total: int = 0  # from reading the message to the resolving ioctl's return
    held_ns_max: int = 0
    wait_ns_total: int = 0  # from the release to the message (how soon a vCPU faulted in)
    stacks: list[str] = field(default_factory=list)  # "kind: frames", the first sampled of each kind
    stack_kinds: dict[str, int] = field(default_factory=dict)

    # ---- recording (the disruptor's hot path) --------------------------------------------------------
    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def add_stack(self, stack: str) -> str:
        """Classify a held thread's stack; the first one of each kind is kept."""
        kind = classify_stack(stack)
        self.bump(self.stack_kinds, kind)
        if self.stack_kinds[kind] == 1:
            self.stacks.append(f"{kind}: {frames(stack)}")
        return kind

    def reset(self) -> None:
        """Forget the preflight's op (the engine resets the ops counters the same way)."""
        mode, features = self.mode, self.features
        self.__init__()  # type: ignore[misc]
        self.mode, self.features = mode, features

    # ---- figures ------------------------------------------------------------------------------------
    @property
    def held_us_mean(self) -> float:
        return self.held_ns_total / self.held / 1000 if self.held else 0.0

    @property
    def wait_us_mean(self) -> float:
        return self.wait_ns_total / self.held_ops / 1000 if self.held_ops else 0.0

    def properties(self) -> dict[str, object]:
        """JUnit properties (prefixed uffd_)."""
        p: dict[str, object] = {
            "uffd_mode": self.mode, "uffd_features": self.features, "uffd_ops": self.ops,
            "uffd_faults_held": self.held, "uffd_held_invalidated": self.invalidated,
            "uffd_ops_held": self.held_ops, "uffd_ops_unheld": self.unheld_ops,
            "uffd_vcpu_faults": self.vcpu_faults, "uffd_write_faults": self.write_faults,
            "uffd_copies": self.copies, "uffd_zeropages": self.zeropages, "uffd_wakes": self.wakes,
            "uffd_unprotects": self.unprotects, "uffd_host_writes": self.host_writes,
            "uffd_held_us_mean": round(self.held_us_mean, 1), "uffd_held_us_max": round(self.held_ns_max / 1000, 1),
            "uffd_fault_wait_us_mean": round(self.wait_us_mean, 1),
            "uffd_foreign_faults": len(self.foreign), "uffd_stray_messages": len(self.stray),
            "uffd_left_held": self.left_held,
        }
        p.update({f"uffd_invalidate_{k}": v for k, v in sorted(self.invalidations.items())})
        p.update({f"uffd_resolve_{k}": v for k, v in sorted(self.resolutions.items())})
        p.update({f"uffd_stack_{k}": v for k, v in sorted(self.stack_kinds.items())})
        if self.stacks:
            p["uffd_stack_sample"] = self.stacks[0]
        return p

    def summary(self) -> list[str]:
        """The report's lines for this mode."""
        def kv(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
        lines = [
            f"  uffd ({self.mode}; {self.features or 'no features'}): {self.held} faults held in {self.held_ops} of "
            f"{self.ops} ops ({self.unheld_ops} ops no vCPU faulted into), {self.invalidated} saw an "
            f"invalidation while held ({kv(self.invalidations)}); from vCPUs in KVM_RUN {self.vcpu_faults} "
            f"({self.write_faults} writes)",
            f"  uffd let go by: {kv(self.resolutions)}; ioctls COPY {self.copies}, ZEROPAGE {self.zeropages}, "
            f"WAKE {self.wakes}, WRITEPROTECT-clear {self.unprotects}, host pwrite {self.host_writes}; held "
            f"{self.held_us_mean:.0f} us mean, {self.held_ns_max / 1000:.0f} us max; a vCPU faulted in "
            f"{self.wait_us_mean:.0f} us after the release (mean)",
            f"  uffd held threads' kernel stacks: {kv(self.stack_kinds)}",
        ]
        lines += [f"    {s}" for s in self.stacks]
        why = not_through_gup(self.stack_kinds, self.stacks)
        if self.held and why:
            lines.append(f"  uffd: NOT the get_user_pages path: {why}")
        return lines


def verdict(s: HoldStats, *, judged: bool = True) -> Verdict:
    """The `uffd` oracle. Not judged (only the harness-bug checks) when the race stalled or broke
    before it could hold anything: then the race says why."""
    problems: list[str] = []
    if judged and s.ops:
        if s.held == 0:
            problems.append(f"uffd: no vCPU fault was held in {s.ops} ops: the vCPUs' faults never reached "
                            "userfaultfd (this KVM does not fault guest memory through get_user_pages on this "
                            "backing?), the mode raced nothing")
        elif s.invalidated == 0:
            problems.append(f"uffd: {s.held} faults held, none saw an invalidation while held: the retry path "
                            "was not exercised")
    if s.foreign:
        problems.append(f"uffd: {len(s.foreign)} held fault(s) came from a thread that is not a racing vCPU "
                        "in KVM_RUN (the host touched a page it had released: harness bug):\n"
                        + "\n".join("    " + f for f in s.foreign[:MAX_DETAILS]))
    if s.stray:
        problems.append(f"uffd: {len(s.stray)} fault message(s) named a page outside the operation's range:\n"
                        + "\n".join("    " + f for f in s.stray[:MAX_DETAILS]))
    if s.left_held:
        problems.append(f"uffd: {s.left_held} fault(s) were still held when the mode let go of its "
                        "userfaultfd")
    return Verdict.of(ORACLE, problems, faults_held=s.held, held_invalidated=s.invalidated,
                      stack_kinds=dict(s.stack_kinds), not_through_gup=not_through_gup(s.stack_kinds, s.stacks))


def not_through_gup(stack_kinds: Mapping[str, int], stacks: Sequence[str]) -> str | None:
    """Why the held faults do not show the path this mode is about (None: at least one held vCPU was
    inside KVM's get_user_pages). A case skips with it: holding a fault elsewhere races nothing the
    mmu_notifier retry protects."""
    if stack_kinds.get("kvm-gup"):
        return None
    total = sum(stack_kinds.values())
    if not total:
        return "no held vCPU fault was seen, so none was seen inside KVM's get_user_pages"
    seen = "; ".join(f"{n} {STACK_KINDS.get(k, k)}" for k, n in sorted(stack_kinds.items()))
    example = next((x for x in stacks if not x.startswith(("unreadable", "elsewhere"))), "")
    return (f"the vCPUs' faults were held {total} times, never inside KVM's get_user_pages (hva_to_pfn): {seen}"
            + (f"; e.g. {example}" if example else "")
            + ". Held there the access has no pfn for an invalidation to make stale: the mmu_notifier retry "
            "of KVM's page fault did not run on this KVM")


def retries_upper_bound(stats: Mapping[str, int]) -> int | None:
    """Faults KVM did not finish (RET_PF_RETRY among them), from the binary stats delta: pf_taken
    minus the outcomes KVM counts (fixed, emulated, spurious). None where the stats do not move
    (kvm_pvm) or are absent."""
    taken = stats.get("vcpu.pf_taken")
    if not taken:
        return None
    done = sum(stats.get(f"vcpu.{k}", 0) for k in ("pf_fixed", "pf_emulate", "pf_spurious"))
    return max(0, taken - done)
