"""Runs inside the guest (see initramfs.py): `python -m harness.qemu.guest ARGS.json`.

Calls the bisect command's main on the pytest args and prints the RESULT sentinel with its code, so
the host can tell "the cases ran and said 0/1/125" from "Python or the harness died" (any other exit).

KVM_HARNESS_PROFILE=N (the runner passes KVM_HARNESS_* through) profiles the whole run in the guest
with cProfile and prints its N most expensive functions (internal and cumulative time) before the
verdict: where a TCG run spends its time cannot be seen from the host.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.update(spec.get("env", {}))
    os.chdir(spec["cwd"])
    sys.path.insert(0, spec["cwd"])
    code = 125
    prof = None
    top = os.environ.get("KVM_HARNESS_PROFILE", "")
    if top.isdigit() and int(top) > 0:
        import cProfile

        prof = cProfile.Profile()
    _uptime("python started")
    try:
        if prof is not None:
            prof.enable()  # the imports too: under TCG they take seconds
        from harness.cli import bisect

        _uptime("harness imported")
        try:
            code = bisect.main(spec["pytest_args"])
        finally:
            if prof is not None:
                prof.disable()
                _print_profile(prof, int(top))
    except BaseException:  # anything: the verdict must still reach the host, as "cannot test"
        traceback.print_exc()
        print("kernel-runner(guest): the harness failed inside the guest: cannot test", flush=True)
        code = 125
    sys.stdout.flush()
    print(f"@@KH-RESULT {spec['nonce']} {code}@@", flush=True)
    return code


def _uptime(what: str) -> None:
    """The guest's clock at a step of its start (a TCG guest's time before the first case)."""
    try:
        with open("/proc/uptime") as f:
            up = f.read().split()[0]
    except OSError:
        return
    print(f"kernel-runner(guest): {what} (uptime {up})", flush=True)


def _print_profile(prof, top: int) -> None:
    import pstats

    st = pstats.Stats(prof, stream=sys.stdout)
    for key in ("tottime", "cumulative"):
        print(f"guest profile: top {top} by {key}:", flush=True)
        st.sort_stats(key).print_stats(top)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
