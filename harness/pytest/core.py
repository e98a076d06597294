"""What every harness plugin needs, loaded by each of them (`pytest_plugins`), never imported:
the options (declared in harness.pytest.options), the markers, the one pytest_collection_modifyitems
of the harness, and the one place a "cannot run here" becomes a skip.

Collection, in this order:
  1. deselect what the command line leaves out: soak races without --race-seconds, and with
     --memory-backings the cases whose `kind` parameter it does not list;
  2. the known kernel issues in force on this kernel become xfails of the cases they name (strict
     unless the entry says the bug reproduces by chance); those whose bug prints a splat (`kmsg`)
     also get `kmsg_exclusive`, so they run alone and the splat is pinned to them
     (harness/health/exclusive.py).

Skips: harness code raises a subclass of harness.unsupported.Unsupported with the reason (a backing
kind, a hugepage pool, a mount, a guest mode, a capability); fixtures and cases let it propagate, and
the wrappers below turn it into a skip whose reason is str(e). A teardown that raises it stays an
error: what was set up has to be given back.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from harness import known_issues
from harness.pytest import options
from harness.unsupported import Unsupported

MARKERS = (
    "guest(payload, mode='long64', nr_vcpus=1, arg=0): the `vm` fixture builds a GuestVm running this payload",
    "requires_cap(cap, min=1): skip unless KVM_CHECK_EXTENSION(cap) >= min (system fd)",
    "requires_vm_cap(cap, min=1): skip unless the VM fd reports cap >= min",
    "requires_sysfs(path, value=None): skip unless the file exists (and holds value)",
    "kvm_timeout(seconds): this test's bound on KVM_RUN instead of --kvm-timeout",
    "kmsg_accept_user: the kernel-log oracle also counts user-space records (tests that inject one)",
    "kmsg_exclusive: the case is expected to splat: it runs with no other case beside it, so the kernel "
    "log's records are pinned to it (set automatically for cases a known issue with a `kmsg` pattern names)",
    "race_soak: a long race, collected only with --race-seconds",
    "shard_weight(n): until cases/durations.json names it, the case costs about n ordinary cases under TCG "
    "(--shard balances the slices on the measured durations)",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)  # the seed is fixed before any other plugin's configure could ask for it
def pytest_configure(config: pytest.Config) -> None:
    options.draw_seed(config)
    for line in MARKERS:
        config.addinivalue_line("markers", line)


# ---- collection ------------------------------------------------------------------------------------
def _deselected(config: pytest.Config, item: pytest.Item, kinds: set[str] | None) -> bool:
    if item.get_closest_marker("race_soak") and not options.race_seconds_given(config):
        return True  # the default suite stays ~1 s a case
    if kinds is not None:
        kind = getattr(item, "callspec", None) and item.callspec.params.get("kind")
        return bool(kind) and kind not in kinds
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kinds = options.memory_backings(config)  # a usage error first, before any work
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for it in items:
        (drop if _deselected(config, it, kinds) else keep).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    issues = known_issues.in_force()
    for item in items if issues else ():
        for ki in issues:
            if ki.matches(item.nodeid):
                item.add_marker(pytest.mark.xfail(reason=ki.xfail_reason(), strict=ki.strict))
                item.user_properties.append(("known_issue", ki.id))
                if ki.kmsg:
                    item.add_marker(pytest.mark.kmsg_exclusive)
                break


# ---- Unsupported -> skip ---------------------------------------------------------------------------
def as_skip(e: Unsupported, *, at_item: bool = False) -> BaseException:
    """The skip for `e`, its message the reason. It is reported where `e` was raised, or with `at_item`
    at the case itself: what pytest does for a skip in a fixture, so -rs says which case skipped."""
    return pytest.skip.Exception(str(e), _use_item_location=at_item).with_traceback(e.__traceback__)


# trylast: the innermost wrappers, so the others (health checks, reporters) see a skip, as they did
# when fixtures called pytest.skip themselves.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except Unsupported as e:
        raise as_skip(e, at_item=True) from None


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except Unsupported as e:
        raise as_skip(e) from None
