"""Every command-line option of the harness, declared here and read through the typed accessors below.

A plugin module or case never calls `config.getoption("--...")` itself: it calls `options.kvm_timeout(config)`,
`options.seed(config)`, ... so an option's name, type and default live in one place. This is a plain
module, imported freely; harness.pytest.core (which every harness plugin loads) calls `add_options`
and `draw_seed` from its hooks.

The session's seed (--race-seed, else drawn once per process at start) is kept in the config's stash
under SEED; the race cases and any other randomised case read it with `seed(config)`.
"""

from __future__ import annotations

import argparse
import os
import random

import pytest

from harness import memory
from harness.health import leaks
from harness.health.oracle import MODES
from harness.kvm.checks import seconds_arg

DEFAULT_KVM_TIMEOUT = 60.0  # seconds: bound on all KVM_RUNs of one test
DEFAULT_RACE_SECONDS = 1.0  # duration of a race case without --race-seconds

SEED = pytest.StashKey[int]()


def seed_arg(text: str) -> int:
    """argparse type of --race-seed: a non-negative integer, as reports print it."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the seed must be >= 0")
    return v


def add_options(parser: pytest.Parser) -> None:
    """Declare the options (from pytest_addoption)."""
    # Two groups and this order, as --help showed them when each plugin declared its own.
    g = parser.getgroup("kvm-harness")
    g.addoption("--kvm-dev", default=os.environ.get("KVM_HARNESS_DEV", "/dev/kvm"),
                help="KVM device node (default /dev/kvm)")
    g.addoption("--kvm-timeout", type=seconds_arg, default=DEFAULT_KVM_TIMEOUT,
                help="bound on all KVM_RUNs of one test, in seconds (default %(default)s)")
    g.addoption("--kmsg", choices=MODES, default="fail",
                help="kernel-log oracle: fail a case on a new splat or taint change, warn only, or off "
                     "(default %(default)s)")
    g.addoption("--kmsg-dev", default="/dev/kmsg", help=argparse.SUPPRESS)
    g.addoption("--leaks", choices=MODES, default="fail",
                help="leak check after each case: fds, threads, mappings, RSS, hugepage pools, mounts "
                     "(default %(default)s)")
    g.addoption("--leak-rss-mb", type=int, default=leaks.DEFAULT_RSS_MB,
                help="RSS growth over one case that counts as a leak (default %(default)s MiB)")
    g.addoption("--leak-anon-mb", type=int, default=leaks.DEFAULT_ANON_MB,
                help="anonymous-mapping growth over one case that counts as a leak (default %(default)s MiB)")
    g.addoption("--ktap", nargs="?", const="-", default=None, metavar="PATH",
                help="write KTAP v1 results to PATH (default: stdout; pytest's own output then goes to stderr)")
    g.addoption("--bisect", action="store_true",
                help="exit 0 good / 1 bad / 125 cannot test here / 128 the selection is wrong (aborts), "
                     "for `git bisect run`")
    g.addoption("--memory-backings", default=None,
                help="comma-separated backing kinds to run (default: all); cases parametrized by `kind`")
    g.addoption("--keep-hugepages", choices=("on", "off"), default="on",
                help="parallel runs (-n): hugetlb pages the cases released stay in the pool until the run "
                     "ends and the next cases take them, already populated (harness.memory.hugepages; "
                     "default %(default)s)")
    g.addoption("--shard", default=None, metavar="I/N",
                help="run only every N-th collected case, starting with the I-th (1-based): one of N "
                     "disjoint slices (harness.pytest.shard; the kernel runner's --shards gives each guest one)")
    r = parser.getgroup("kvm-harness races")
    r.addoption("--race-seconds", type=seconds_arg, default=None,
                help="duration of each race case, seconds > 0, raced in full (default: each case races to its "
                     "goal, at most 1 s: harness.race.plan.RaceGoal)")
    r.addoption("--race-seed", type=seed_arg, default=None,
                help="seed for every race case, an integer >= 0 (default: random, printed)")


def draw_seed(config: pytest.Config) -> None:
    """Fix the session's seed (from pytest_configure, before anything asks for it)."""
    given = config.getoption("--race-seed")
    config.stash[SEED] = given if given is not None else random.SystemRandom().randrange(1 << 32)


# ---- accessors -------------------------------------------------------------------------------------
def kvm_dev(config: pytest.Config) -> str:
    """The KVM device node (--kvm-dev, else $KVM_HARNESS_DEV, else /dev/kvm)."""
    return config.getoption("--kvm-dev")


def kvm_timeout(config: pytest.Config) -> float:
    """Bound in seconds on all KVM_RUNs of one test, unless its kvm_timeout marker says otherwise."""
    return config.getoption("--kvm-timeout")


def kmsg_mode(config: pytest.Config) -> str:
    """The kernel-log oracle: "fail", "warn" or "off"."""
    return config.getoption("--kmsg")


def kmsg_dev(config: pytest.Config) -> str:
    """The kernel-log device the oracle reads (tests point it at a fake)."""
    return config.getoption("--kmsg-dev")


def kmsg_unreadable(path: str) -> str | None:
    """Why the oracle cannot read the kernel log at `path` (it is then off), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"off: cannot open {path} ({e.strerror}); cases are not checked against the kernel log"
    os.close(fd)
    return None


def kmsg_state(config: pytest.Config) -> str:
    """The oracle's mode as the run will have it, for headers: "off: <why>" when the log cannot be read."""
    mode = kmsg_mode(config)
    return (kmsg_unreadable(kmsg_dev(config)) if mode != "off" else None) or mode


def leaks_mode(config: pytest.Config) -> str:
    """The leak check after each case: "fail", "warn" or "off"."""
    return config.getoption("--leaks")


def leak_limits(config: pytest.Config) -> leaks.Limits:
    """Growth over one case that counts as a leak."""
    return leaks.Limits(rss_mb=config.getoption("--leak-rss-mb"), anon_mb=config.getoption("--leak-anon-mb"))


def ktap_target(config: pytest.Config) -> str | None:
    """Where --ktap writes ("-": stdout), None without --ktap."""
    return config.getoption("--ktap")


def bisect(config: pytest.Config) -> bool:
    """--bisect: the exit status is the `git bisect run` verdict."""
    return bool(config.getoption("--bisect"))


def memory_backings(config: pytest.Config) -> set[str] | None:
    """The backing kinds --memory-backings keeps (None: all); an unknown kind is a usage error."""
    only = config.getoption("--memory-backings")
    if not only:
        return None
    keep = {k.strip() for k in only.split(",") if k.strip()}
    unknown = keep - set(memory.KINDS)
    if unknown:
        raise pytest.UsageError(f"--memory-backings: unknown kinds {sorted(unknown)} "
                                f"(known: {', '.join(memory.KINDS)})")
    return keep


def shard(config: pytest.Config) -> tuple[int, int] | None:
    """--shard I/N as (I, N) with 1 <= I <= N, None without it; anything else is a usage error."""
    text = config.getoption("--shard")
    if text is None:
        return None
    i, sep, n = text.partition("/")
    try:
        i_, n_ = int(i), int(n)
    except ValueError:
        sep = ""
    if not sep:
        raise pytest.UsageError(f"--shard {text!r}: expected I/N, shard I of N counting from 1 (e.g. 1/2)")
    if not 1 <= i_ <= n_:
        raise pytest.UsageError(f"--shard {text!r}: I must be 1..N (shards count from 1)")
    return i_, n_


def race_seconds_given(config: pytest.Config) -> float | None:
    """--race-seconds as given, None without it (soak cases run only with it)."""
    return config.getoption("--race-seconds")


def race_seconds(config: pytest.Config, default: float = DEFAULT_RACE_SECONDS) -> float:
    """How long a race case runs: --race-seconds, else the case's short default."""
    return race_seconds_given(config) or default


def race_until_goal(config: pytest.Config) -> bool:
    """Whether a race case may end as soon as it did what its goal says (then the duration is a cap):
    yes by default, no with --race-seconds (a soak races its whole duration). The goals are counts
    (sweeps, overlapped host operations, guest rounds), the same on every machine; a fixed short
    duration did too little under TCG and more than needed here."""
    return race_seconds_given(config) is None


def seed_given(config: pytest.Config) -> bool:
    """Whether --race-seed fixed the seed (else it was drawn at start)."""
    return config.getoption("--race-seed") is not None


def seed(config: pytest.Config) -> int:
    """The session's seed: --race-seed, else one drawn at start (shown in reports and rerun commands)."""
    return config.stash[SEED]


def keep_hugepages(config: pytest.Config) -> bool:
    """--keep-hugepages: park released hugetlb pages for the rest of a parallel run."""
    return config.getoption("--keep-hugepages") == "on"
