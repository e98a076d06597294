# The harness's pytest plugin (fixtures kvm/vm/vcpu, markers, per-test KVM_RUN bound).
pytest_plugins = ["harness.pytest_plugin"]
