# The harness's pytest plugin (fixtures kvm/vm/vcpu, markers, per-test KVM_RUN bound) and the guest
# memory fixtures (hugepages, host_mounts, backings, memtouch).
pytest_plugins = ["harness.pytest_plugin", "harness.memory.fixtures"]
