"""`python -m harness kernel --kernel PATH [--modules DIR] [--cpus N] [--mem SIZE] -- <pytest args>`:
boot PATH under QEMU, run the pytest args inside against its /dev/kvm, stream the console live and
exit in `git bisect run` codes: 0 pass, 1 a case failed, 125 cannot test; a kernel that does not
reach /init within --boot-timeout exits with --boot-failure's code (skip = 125, bad = 1).
See docs/kernel-runner.md and harness/qemu/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.qemu import runner

_CODES = {"skip": runner.SKIP, "bad": runner.BAD}


def register(sub) -> None:
    p = sub.add_parser("kernel", help="boot a kernel under QEMU and run pytest args inside (bisect exit codes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", required=True, type=Path, help="bzImage, vmlinux (PVH) or a distribution vmlinuz")
    p.add_argument("--modules", type=Path, help="where the kernel's .ko files are (searched recursively; default: "
                   "lib/modules/VER beside boot/vmlinuz-VER, or the build tree holding the image)")
    p.add_argument("--cpus", type=int, default=None,
                   help="guest vCPUs (default: 1 under TCG, whose vCPUs share one thread; 2 under KVM)")
    p.add_argument("--mem", default="2G", help="guest memory (default %(default)s)")
    p.add_argument("--boot-timeout", type=float, default=60.0,
                   help="seconds for the kernel to reach /init (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds for the whole run; expiry after boot exits 125 (default %(default)s)")
    p.add_argument("--boot-failure", choices=sorted(_CODES), default="skip",
                   help="exit code for a kernel that does not boot or panics before /init: "
                        "skip=125, bad=1 (default %(default)s)")
    p.add_argument("--crash", choices=sorted(_CODES), default="bad",
                   help="exit code for a guest that panics/resets after boot, before a verdict (default %(default)s)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto: KVM when the host offers nested virtualization, else TCG -cpu max")
    p.add_argument("--machine", choices=["auto", "microvm", "q35"], default="auto",
                   help="auto: microvm unless the kernel's config lacks CONFIG_VIRTIO_MMIO")
    p.add_argument("--append", default="", help="extra kernel command line (e.g. oops=panic)")
    p.add_argument("--qemu", default=runner.QEMU, help="QEMU binary (default %(default)s)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest args run inside the guest")


def run(args) -> int:
    rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    # the guest's root is read-only under a throwaway overlay: pytest's cache would go nowhere useful
    if "no:cacheprovider" not in rest:
        rest = [*rest, "-p", "no:cacheprovider"]
    cfg = runner.RunConfig(kernel=args.kernel, pytest_args=rest, modules=args.modules, cpus=args.cpus,
                           mem=args.mem, boot_timeout=args.boot_timeout, timeout=args.timeout,
                           boot_failure=_CODES[args.boot_failure], crash=_CODES[args.crash], accel=args.accel,
                           machine=args.machine, append=args.append, qemu=args.qemu)
    res = runner.run(cfg, sys.stdout)
    runner.report(res, sys.stdout)
    return res.code
