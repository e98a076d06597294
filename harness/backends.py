"""Which KVM implementation serves /dev/kvm, and what the suite expects of each, as data.

Upstream KVM (kvm_intel, kvm_amd) and kvm_pvm (a paravirtual KVM with shadow paging, out of tree)
legitimately differ in a few places. Cases and harness code ask `current()` for the expectation
they depend on instead of branching on the module name, so each difference is written once, here,
with the reason a failure message can quote. Real bugs of a backend are not expectations: they
are known issues (known-issues.toml, keyed by `backend`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """What one KVM implementation does where implementations differ."""

    name: str
    # Guest paging modes KVM_SET_SREGS accepts: None = all; otherwise why the others are refused.
    pae_refused: str | None = None
    la57_refused: str | None = None
    # A guest_memfd slot's memory: upstream faults it from the guest_memfd itself; a backend that
    # serves it from userspace_addr instead also lets the host mapping's protection govern it.
    gmem_from_userspace_addr: bool = False
    # How a guest access to a truncated file page ends: "efault" (KVM_RUN -> EFAULT) or "any"
    # (the backend may also report it as an MMIO exit).
    truncated_file_fault: str = "efault"
    # Why QEMU cannot use this KVM as its accelerator (the kernel runner falls back to TCG).
    cannot_accelerate_qemu: str | None = None


_UPSTREAM = Backend("upstream")

_KVM_PVM = Backend(
    "kvm_pvm",
    pae_refused="kvm_pvm supports guest paging only in long mode (dmesg: 'kvm-pvm supports paging "
                "only in long mode'); run on another kernel",
    la57_refused="5-level paging: kvm_pvm refuses CR4.LA57 in KVM_SET_SREGS",
    gmem_from_userspace_addr=True,
    truncated_file_fault="any",
    cannot_accelerate_qemu="the host's KVM is kvm_pvm, which cannot accelerate QEMU (KVM_RUN of a QEMU "
                           "vCPU fails on it)",
)


@functools.cache
def loaded_modules() -> frozenset[str]:
    try:
        return frozenset(os.listdir("/sys/module"))
    except OSError:
        return frozenset()


@functools.cache
def name() -> str:
    mods = loaded_modules()
    for m in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if m in mods:
            return m
    return "kvm" if "kvm" in mods else "unknown"


def current() -> Backend:
    """The expectations for the KVM serving /dev/kvm here."""
    return _KVM_PVM if name() == "kvm_pvm" else _UPSTREAM


def module_param(module: str, param: str) -> str | None:
    try:
        with open(f"/sys/module/{module}/parameters/{param}") as f:
            return f.read().strip()
    except OSError:
        return None


@functools.cache
def paging() -> str:
    """How KVM maps guest memory: "tdp" (NPT/EPT: the CPU walks the guest's page tables) or
    "shadow" (KVM walks them and builds shadow tables: kvm_pvm, or npt=0/ept=0). Expectations
    about who produced a guest #PF's error code depend on it."""
    for mod, param in (("kvm_amd", "npt"), ("kvm_intel", "ept")):
        v = module_param(mod, param)
        if v is not None:
            return "tdp" if v in ("Y", "1") else "shadow"
    return "shadow" if name() == "kvm_pvm" else "unknown"
