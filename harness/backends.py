"""Which KVM implementation serves /dev/kvm, for expectations that legitimately differ by backend."""

from __future__ import annotations

import functools
import os


@functools.cache
def loaded_modules() -> frozenset[str]:
    try:
        return frozenset(os.listdir("/sys/module"))
    except OSError:
        return frozenset()


def is_kvm_pvm() -> bool:
    """kvm_pvm: paravirtual KVM with shadow paging (see FIELD-NOTES); differs from upstream in places."""
    return "kvm_pvm" in loaded_modules()


@functools.cache
def name() -> str:
    mods = loaded_modules()
    for m in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if m in mods:
            return m
    return "kvm" if "kvm" in mods else "unknown"


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
    return "shadow" if is_kvm_pvm() else "unknown"
