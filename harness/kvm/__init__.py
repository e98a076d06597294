"""The KVM binding: the cffi module and the fd model (system, VM, vCPU), exits, errors, the
KVM_RUN watchdog and the dirty log. Nothing here knows about guest payloads or pytest; what a
test needs on top lives in harness.lib.

    from harness.kvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.kvm.errors import HarnessError, KvmError

if TYPE_CHECKING:
    from harness.kvm.system import Kvm

__all__ = ["HarnessError", "Kvm", "KvmError"]


def __getattr__(name: str) -> Any:
    # Kvm on first use: importing harness.kvm.errors (as harness.unsupported does, which
    # harness.memory imports) must not pull in the fd model, which imports harness.memory
    if name == "Kvm":
        from harness.kvm.system import Kvm

        return Kvm
    raise AttributeError(f"module 'harness.kvm' has no attribute {name!r}")
