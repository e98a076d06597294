"""`python -m harness info`: what this machine offers the suite, and what will skip and why."""

from __future__ import annotations

import glob
import os
import platform

from harness import backend, known_issues
from harness.caps import Cap, VmType


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _kmsg_access() -> str:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"no ({e.strerror}): kernel-log oracle disabled"
    os.close(fd)
    return "yes"


def main() -> int:
    print(f"kernel:        {platform.release()} ({platform.machine()})")
    print(f"kvm backend:   {backend.name()}")
    dev = os.environ.get("KVM_HARNESS_DEV", "/dev/kvm")
    if not os.path.exists(dev):
        print(f"{dev}: missing: every case will skip")
        return 0
    from harness.kvm import Kvm
    from harness.x86.modes import Mode, unsupported_reason

    with Kvm(dev) as kvm:
        print(f"api version:   {kvm.api_version}")
        cpuid = kvm.supported_cpuid
        print(f"cpu:           {cpuid.vendor}, MAXPHYADDR {cpuid.maxphyaddr}, LA57 {'yes' if cpuid.la57 else 'no'}, "
              f"1G pages offered to guests {'yes' if cpuid.gbpages else 'no'}")
        names = (VmType(t).name if t in VmType._value2member_map_ else str(t) for t in kvm.vm_types)
        print(f"vm types:      {', '.join(names)}")
        print("capabilities:")
        for name, value in kvm.capabilities().items():
            print(f"  KVM_CAP_{name:<28} {value}")
        print("guest modes:")
        for m in Mode:
            why = unsupported_reason(m, cpuid)
            print(f"  {m.value:<12} {'runs' if not why else 'SKIP: ' + why}")
        skips = []
        for cap in (Cap.MEMORY_ATTRIBUTES, Cap.PRE_FAULT_MEMORY, Cap.XEN_HVM, Cap.GUEST_MEMFD, Cap.DIRTY_LOG_RING):
            if not kvm.check_extension(cap):
                skips.append(f"cases needing KVM_CAP_{cap.name} skip (capability absent)")
    print("hugepages:")
    for d in sorted(glob.glob("/sys/kernel/mm/hugepages/hugepages-*")):
        print(f"  {os.path.basename(d)}: nr={_read(d + '/nr_hugepages')} free={_read(d + '/free_hugepages')}")
    print(f"THP:           {_read('/sys/kernel/mm/transparent_hugepage/enabled')}")
    print(f"/dev/kmsg:     {_kmsg_access()}")
    print(f"tainted:       {_read('/proc/sys/kernel/tainted')}")
    print("will skip:")
    for s in skips or ["(nothing capability-gated)"]:
        print(f"  {s}")
    issues = known_issues.in_force()
    print(f"known kernel issues in force ({len(issues)}):")
    for ki in issues:
        print(f"  {ki.id}: {ki.reason}\n    cases: {', '.join(ki.cases)}")
        if ki.evidence:
            print(f"    evidence: {ki.evidence}")
    return 0


def register(sub) -> None:
    sub.add_parser("info", help="kernel, KVM capabilities, MAXPHYADDR, pools, and what will skip")


def run(args) -> int:
    return main()
