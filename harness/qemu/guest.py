"""Runs inside the guest (see initramfs.py): `python -m harness.qemu.guest ARGS.json`.

Calls the bisect command's main on the pytest args and prints the RESULT sentinel with its code, so
the host can tell "the cases ran and said 0/1/125" from "Python or the harness died" (any other exit).
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
    try:
        from harness.cli import bisect

        code = bisect.main(spec["pytest_args"])
    except BaseException:  # anything: the verdict must still reach the host, as "cannot test"
        traceback.print_exc()
        print("kernel-runner(guest): the harness failed inside the guest: cannot test", flush=True)
        code = 125
    sys.stdout.flush()
    print(f"@@KH-RESULT {spec['nonce']} {code}@@", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
