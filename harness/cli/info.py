"""`python -m harness info`: what this machine offers the suite, and what will skip and why.

Runs as any user: what it cannot read (an unusable /dev/kvm when not root, /dev/kmsg...) is said
with the reason, in place and in a closing "not read" list. Exit status 0 (it reports, it does not
judge); a missing /dev/kvm also exits 0 after saying every case will skip."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
from pathlib import Path
from typing import Any

import pytest

from harness import backends as backend
from harness import known_issues
from harness.health.kmsg import taint_letters
from harness.kvm.caps import Cap, VmType


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


CASES_DIR = Path(__file__).resolve().parent.parent.parent / "cases"


class _Collector:
    def __init__(self) -> None:
        self.items: list[pytest.Item] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)


def predict_skips(kvm: Any, cpuid: Any, cases: Path = CASES_DIR) -> tuple[int, dict[str, list[str]]]:
    """Collect the suite and decide, from its markers and parameters alone, which cases will skip
    here: (number of cases, reason -> node ids). Skips decided at run time (hugepages that cannot be
    reserved, a backing the kernel refuses) are not predicted."""
    from harness.x86.modes import Mode, unsupported_reason

    col = _Collector()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(cases)], plugins=[col])
    out: dict[str, list[str]] = {}
    for item in col.items:
        reason = None
        for m in item.iter_markers("requires_cap"):
            cap = m.args[0]
            need = m.args[1] if len(m.args) > 1 else m.kwargs.get("min", 1)
            if kvm.check_extension(cap) < need:
                name = Cap(cap).name if cap in Cap._value2member_map_ else str(cap)
                reason = f"KVM_CAP_{name} is {kvm.check_extension(cap)} (needs >= {need})"
        for m in item.iter_markers("requires_sysfs"):
            if not os.path.exists(m.args[0]):
                reason = f"needs {m.args[0]}, which does not exist"
        mode = None
        g = item.get_closest_marker("guest")
        if g is not None:
            mode = g.kwargs.get("mode")
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "mode" in callspec.params:
            mode = callspec.params["mode"]
        if reason is None and mode is not None:
            try:
                reason = unsupported_reason(Mode(mode), cpuid)
            except ValueError:
                pass
        if reason:
            out.setdefault(reason, []).append(item.nodeid)
    return len(col.items), out


def _kvm_section(dev: str) -> tuple[int, dict[str, list[str]], list[str]]:
    """The KVM part: (cases, predicted skips, what could not be read and why)."""
    from harness.kvm.system import Kvm
    from harness.x86.modes import Mode, unsupported_reason

    try:
        kvm = Kvm(dev)
    except OSError as e:
        who = f"uid {os.getuid()}" + (" (not root)" if os.getuid() else "")
        why = (f"{dev}: cannot open it ({e.strerror}) as {who}: API version, capabilities, CPU, VM "
               "types and guest modes not read; every case will skip (run as root, or with read-write "
               f"access to {dev})")
        print(why)
        return 0, {}, [why]
    total, predicted = 0, {}
    with kvm:
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
        try:
            total, predicted = predict_skips(kvm, cpuid) if CASES_DIR.is_dir() else (0, {})
        except Exception as e:  # the doctor reports; it does not fail on a suite it cannot collect
            print(f"(could not collect {CASES_DIR}: {e!r})")
    return total, predicted, []


def _section(name: str, fn: Any, missing: list[str]) -> Any:
    """Run one section; a failure is reported as what could not be read, not as a traceback."""
    try:
        return fn()
    except Exception as e:
        why = f"{name}: not read ({type(e).__name__}: {e})"
        print(why)
        missing.append(why)
        return None


def main() -> int:
    """Print what can be read; say what could not and why. Always exits 0 (a report, not a
    verdict): an unusable /dev/kvm is reported in the output and under "not read"."""
    missing: list[str] = []
    print(f"kernel:        {platform.release()} ({platform.machine()})")
    print(f"kvm backend:   {backend.name()}")
    dev = os.environ.get("KVM_HARNESS_DEV", "/dev/kvm")
    total, predicted = 0, {}
    if not os.path.exists(dev):
        print(f"{dev}: missing: every case will skip")
        return 0
    got = _section("KVM", lambda: _kvm_section(dev), missing)
    if got is not None:
        total, predicted, why = got
        missing += why

    def hugepages() -> None:
        print("hugepages:")
        for d in sorted(glob.glob("/sys/kernel/mm/hugepages/hugepages-*")):
            print(f"  {os.path.basename(d)}: nr={_read(d + '/nr_hugepages')} free={_read(d + '/free_hugepages')}")
        print(f"THP:           {_read('/sys/kernel/mm/transparent_hugepage/enabled')}")

    _section("hugepages", hugepages, missing)
    kmsg = _kmsg_access()
    print(f"/dev/kmsg:     {kmsg}")
    if kmsg != "yes":
        missing.append(f"/dev/kmsg: {kmsg}")
    taint = _read("/proc/sys/kernel/tainted")
    letters = taint_letters(int(taint)) if taint.isdigit() else ""
    print(f"tainted:       {taint}{f' ({letters}): a new taint bit during a case fails it' if letters else ''}")
    n_skip = sum(len(v) for v in predicted.values())
    if total:
        print(f"will skip ({n_skip} of {total} cases, from markers and parameters; hugepage and backing skips "
              "are decided at run time):")
        for why, ids in sorted(predicted.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(ids):4d}  {why}")
            print(f"        e.g. {ids[0]}")
        if not predicted:
            print("  (nothing)")

    def issues() -> None:
        found = known_issues.in_force()
        print(f"known kernel issues in force ({len(found)}; strict xfails, `ok N name # XFAIL <reason>` in KTAP):")
        for ki in found:
            print(f"  {ki.id}: {ki.reason}\n    cases: {', '.join(ki.cases)}")
            if ki.evidence:
                print(f"    evidence: {ki.evidence}")

    _section("known issues", issues, missing)
    if missing:
        print(f"not read ({len(missing)}):")
        for m in missing:
            print(f"  {m}")
    return 0


def register(sub) -> None:
    sub.add_parser("info", help="kernel, KVM capabilities, MAXPHYADDR, pools, and what will skip")


def run(args) -> int:
    return main()
