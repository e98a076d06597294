"""harness/pytest/ as pytest sees it: Unsupported becomes a skip in one place, the options and the
session seed, the one collection hook, and plugin modules that load without warnings."""

from __future__ import annotations

import re

import pytest

from harness.memory.backings import BackingUnavailable
from harness.memory.hugepages import HugepagesUnavailable
from harness.memory.loopfs import DiskReadUnavailable
from harness.memory.mounts import MountError
from harness.report.ktap_parser import parse_ktap
from harness.unsupported import Unsupported

pytest_plugins = ["pytester"]


def test_every_cannot_run_here_is_unsupported():
    from harness.lib.guestvm import ModeUnsupported

    for cls in (BackingUnavailable, HugepagesUnavailable, DiskReadUnavailable, MountError, ModeUnsupported):
        assert issubclass(cls, Unsupported), cls


UNSUPPORTED = '''
import pytest
from harness.memory.backings import BackingUnavailable
from harness.unsupported import Unsupported

@pytest.fixture
def no_backing():
    raise BackingUnavailable("KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel")

@pytest.fixture
def gives_back():
    yield
    raise Unsupported("too late to skip")

def test_setup(no_backing):
    pass

def test_body():
    raise Unsupported("5-level paging: not offered")

@pytest.mark.xfail(reason="known issue", strict=True)
def test_xfail_marked(no_backing):
    pass

def test_teardown(gives_back):
    pass
'''


def test_unsupported_is_a_skip_with_its_reason(pytester):
    """Raised in set-up or body it is a skip carrying its message (KTAP SKIP, -rs); an xfail mark does
    not make it an xfail; raised in teardown it stays an error."""
    pytester.makepyfile(test_u=UNSUPPORTED)
    out = pytester.path / "ktap.txt"
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "-rs",
                                        f"--ktap={out}")
    res.assert_outcomes(passed=1, skipped=3, errors=1)
    by = {t.description.removeprefix("test_u.py::"): (t.directive, t.reason) for t in parse_ktap(out.read_text()).tests}
    assert by["test_setup"] == ("SKIP", "KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel")
    assert by["test_body"] == ("SKIP", "5-level paging: not offered")
    assert by["test_xfail_marked"] == ("SKIP", "KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel")
    assert by["test_teardown"][0] == "ERROR"
    # a set-up skip names the case (as pytest does for a fixture's skip), a body skip the raise
    res.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_u.py:14: KVM_CAP_GUEST_MEMFD is 0*",
                              "SKIPPED [[]1[]] test_u.py:18: 5-level paging: not offered"])


SEED = '''
from harness.pytest import options

def test_seed(request):
    print("SEED", options.seed(request.config), options.race_seconds(request.config),
          options.race_until_goal(request.config))
'''


@pytest.mark.parametrize("args", [(), ("--race-seed=1234", "--race-seconds=2.5")], ids=["drawn", "given"])
def test_the_seed_is_in_the_config_stash(pytester, args):
    pytester.makepyfile(test_s=SEED)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.race", "-p", "no:cacheprovider", "-s", *args)
    res.assert_outcomes(passed=1)
    m = re.search(r"SEED (\d+) (\S+) (\S+)", res.stdout.str())
    assert m, res.stdout.str()
    if args:  # a soak: the whole duration, no early end at the goal
        assert m.groups() == ("1234", "2.5", "False")
        res.stdout.fnmatch_lines(["race: seed 1234, 2.5 s per case"])
    else:
        assert m.group(2, 3) == ("1.0", "True")
        assert "race: seed" not in res.stdout.str()


COLLECT = '''
import pytest

@pytest.mark.race_soak
def test_soak():
    pass

@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_kind(kind):
    pass
'''


@pytest.mark.parametrize(("args", "passed", "deselected"), [
    ((), 2, 1),
    (("--race-seconds=1",), 3, 0),
    (("--memory-backings=shmem",), 1, 2),
])
def test_collection_deselects(pytester, args, passed, deselected):
    pytester.makepyfile(test_c=COLLECT)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.memory", "-p", "no:cacheprovider", *args)
    res.assert_outcomes(passed=passed, deselected=deselected)


def test_unknown_memory_backing_is_a_usage_error(pytester):
    pytester.makepyfile(test_c=COLLECT)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.memory", "-p", "no:cacheprovider",
                                        "--memory-backings=anon,nope")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--memory-backings: unknown kinds ['nope']" in res.stderr.str()


@pytest.mark.parametrize("plugin", ["plugin", "memory", "race", "outcome", "core"])
def test_each_plugin_loads_alone_without_warnings(pytester, plugin):
    """A plugin module imported before pytest registers it cannot have its asserts rewritten (pytest
    warns): plugin modules must not import one another."""
    pytester.makepyfile(test_w="def test_w():\n    pass\n")
    res = pytester.runpytest_subprocess("-p", f"harness.pytest.{plugin}", "-p", "no:cacheprovider",
                                        "-W", "error::pytest.PytestAssertRewriteWarning")
    res.assert_outcomes(passed=1)
    assert "PytestAssertRewriteWarning" not in res.stdout.str() + res.stderr.str()


SPARE = '''
from harness.memory import PAGE_2M

def test_spare(race, backings, request):
    race("hugetlb-2m", ("punch",), vcpus=2, page=PAGE_2M, kvmclock=True)
    props = dict(request.node.user_properties)
    print("SPARE", props["spare_hugepages"], backings.hugepages.pool.held.get(PAGE_2M))
'''


def test_a_hugetlb_race_keeps_spare_pages_in_the_pool(pytester):
    """One free page per vCPU and one for kvmclock beyond the region's: a punched page held by a
    fault in flight must not leave the host's refault without a page (SIGBUS kills the harness)."""
    pytester.makepyfile(test_s=SPARE)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "harness.pytest.memory",
                                        "-p", "harness.pytest.race", "-p", "no:cacheprovider", "-s", "-rs")
    outcomes = res.parseoutcomes()
    if outcomes.get("skipped"):
        pytest.skip(f"no 2 MiB hugetlb race here: {res.stdout.str()[-300:]}")
    res.assert_outcomes(passed=1)
    m = re.search(r"SPARE (\S+) (\d+)", res.stdout.str())
    assert m, res.stdout.str()
    assert m.group(1) == "3" and int(m.group(2)) >= 3 + 1, m.groups()  # the region's pages and 2 + 1 spare
