# The harness's pytest plugins (harness/pytest/): the core (options, markers, the Unsupported-to-skip
# hook, kernel health, fixtures kvm/vm/vcpu, --ktap), the guest memory fixtures (hugepages, host_mounts,
# backings, memtouch), the `race` fixture, and the exit status of a run that tested nothing.
pytest_plugins = ["harness.pytest.plugin", "harness.pytest.memory", "harness.pytest.race", "harness.pytest.outcome"]
