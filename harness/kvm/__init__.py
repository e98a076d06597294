"""The KVM binding: the cffi module and the fd model (system, VM, vCPU), exits, errors, the
KVM_RUN watchdog and the dirty log. Nothing here knows about guest payloads or pytest; what a
test needs on top lives in harness.lib.

    from harness.kvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
"""

from harness.kvm.errors import HarnessError, KvmError
from harness.kvm.system import Kvm

__all__ = ["HarnessError", "Kvm", "KvmError"]
