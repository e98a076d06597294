"""The harness's pytest plugin: load it with `-p harness.pytest.plugin` (the top-level conftest.py
does, with the memory and race fixtures and the outcome plugin beside it).

It brings, one module each:
    core      the options (declared in options.py), the markers, the one pytest_collection_modifyitems,
              and Unsupported ("cannot run here") raised in set-up or body becoming a skip
    health    the kernel-log oracle and leak check around every case
    fixtures  `kvm`, `vm`, `vcpu`, the requires_* markers, the per-test bound on KVM_RUN
and, in the process that sees every report, the --ktap reporter and the --bisect verdict.

Plugin modules are loaded by pytest (`pytest_plugins`), never imported by one another: an import
before pytest registers a plugin would keep pytest from rewriting its asserts (and it warns). What
they share is in the plain modules options.py and ktap.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness import backends as backend
from harness.pytest import options
from harness.pytest.ktap import KtapReporter, redirect_terminal_to_stderr
from harness.x86.modes import Mode

# health before fixtures: the per-test bound runs inside the health window (fixtures.py says why)
pytest_plugins = ["harness.pytest.core", "harness.pytest.health", "harness.pytest.fixtures", "harness.pytest.shard"]


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists (--ktap to stdout moves it)
def pytest_configure(config: pytest.Config) -> None:
    is_worker = hasattr(config, "workerinput")
    ktap = options.ktap_target(config)
    if ktap and not is_worker:
        rep = KtapReporter(config, ktap)
        if ktap == "-":
            redirect_terminal_to_stderr(config)
        rep.header(f"backend {backend.name()}")  # the matrix keys known issues by (release, backend)
        rep.header(f"paging {backend.paging()}")  # and emulator artefacts by how the guest is walked
        if options.kmsg_mode(config) != "off":
            rep.header(f"kernel-log oracle: {options.kmsg_state(config)}")
        config.pluginmanager.register(rep, "kvm-harness-ktap")
    if options.bisect(config) and not is_worker:
        from harness.cli.bisect import BisectVerdict

        config.pluginmanager.register(BisectVerdict(), "kvm-harness-bisect")


def modes(*names: str | Mode) -> Any:
    """`@modes("real", "prot32", "long64")`: parametrize the `mode` fixture with readable ids."""
    ms = [Mode(n) for n in names] if names else list(Mode)
    return pytest.mark.parametrize("mode", ms, ids=[m.value for m in ms])
