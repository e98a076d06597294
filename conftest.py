# The harness's pytest plugin (fixtures kvm/vm/vcpu, markers, per-test KVM_RUN bound) and the guest
# memory fixtures (hugepages, host_mounts, backings, memtouch), the race options (--race-seconds, --race-seed).
pytest_plugins = ["harness.pytest.plugin", "harness.pytest.memory", "harness.pytest.race", "harness.pytest.outcome"]
