# The harness's pytest plugins (harness/pytest/): the core (options, markers, the Unsupported-to-skip
# hook, kernel health, fixtures kvm/vm/vcpu, --ktap), the guest memory fixtures (hugepages, host_mounts,
# backings, memtouch), the `race` fixture, and the exit status of a run that tested nothing.
import os
import sys

# Bytecode caches (gitignored __pycache__/): with PYTHONDONTWRITEBYTECODE set (as in this machine's
# environment) every pytest process, each xdist worker, each pytester subprocess and the QEMU runner's
# guest compiled the harness, hypothesis and the assert-rewritten cases from source again: ~3 s of CPU
# per process here, far more under TCG. Written from here on (the plugins below are imported after
# this line); KVM_HARNESS_PYC=0 keeps the environment's choice.
if os.environ.get("KVM_HARNESS_PYC", "1") != "0":
    sys.dont_write_bytecode = False

pytest_plugins = ["harness.pytest.plugin", "harness.pytest.memory", "harness.pytest.race", "harness.pytest.outcome"]
