"""`python -m harness kernel ...`: another kernel under QEMU, by path or by name.

    kernel [run] --kernel PATH|debian:VER[+NAME=VALUE...] [--modules DIR] [--cpus N] [--mem SIZE] [--shards N|auto]
                 -- <pytest args>
    kernel fetch debian:7.3.4 [debian:6.12 ...] [--link NAME]
    kernel build-kvm debian:7.3.4 --config KVM_SW_PROTECTED_VM=y [--config NAME=VALUE ...] [--jobs N] [--rebuild]
    kernel list [--refresh] [--json]
    kernel bisect --good debian:6.12.117 --bad debian:7.3.4 -- <pytest args>

`run` boots the kernel, runs the pytest args inside against its /dev/kvm, streams the console live
and exits in `git bisect run` codes: 0 pass, 1 a case failed, 125 cannot test; a kernel that does
not reach /init within --boot-timeout exits with --boot-failure's code (skip = 125, bad = 1).
`--kernel debian:VER` fetches Debian's package (harness/qemu/debian.py) and uses its modules.
`--kernel debian:7.3.4+KVM_SW_PROTECTED_VM=y` is that kernel with kvm.ko, kvm-amd.ko and kvm-intel.ko
rebuilt from Debian's sources with the option (harness/qemu/kvmbuild.py), built on first use and
cached; `build-kvm` builds one ahead. See docs/kernel-runner.md and harness/qemu/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.kvm.errors import HarnessError
from harness.qemu import debian, kvmbuild, runner
from harness.qemu import version_bisect as vb

_CODES = {"skip": runner.SKIP, "bad": runner.BAD}
ACTIONS = ("run", "fetch", "build-kvm", "list", "bisect")
RAW_ARGS = True  # harness/__main__.py hands us argv after "kernel": the actions parse their own


def register(sub) -> None:
    p = sub.add_parser("kernel", help="boot a kernel under QEMU and run pytest args inside (bisect exit codes); "
                       "fetch, list and bisect Debian's packaged kernels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER)


def add_run_options(p: argparse.ArgumentParser, kernel_required: bool = True) -> None:
    """The runner's options (shared by `kernel run`, `kernel bisect` and `matrix`)."""
    if kernel_required:
        p.add_argument("--kernel", required=True, help="bzImage, vmlinux (PVH), a distribution vmlinuz, "
                       "or a packaged kernel's name (debian:7.3.4, debian:6.12, debian:latest), optionally with "
                       "KVM rebuilt (debian:7.3.4+KVM_SW_PROTECTED_VM=y)")
        p.add_argument("--modules", type=Path, help="where the kernel's .ko files are (searched recursively; default: "
                       "lib/modules/VER beside boot/vmlinuz-VER, or the build tree holding the image)")
    p.add_argument("--cpus", type=int, default=None,
                   help="guest vCPUs (default: 1 under TCG, whose vCPUs share one thread; 2 under KVM)")
    p.add_argument("--force", action="store_true",
                   help="run settings known to be unreliable (more than one vCPU under TCG) instead of refusing")
    p.add_argument("--mem", default=runner.DEFAULT_MEM,
                   help="guest memory; QEMU touches only what the guest uses (default %(default)s)")
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
    p.add_argument("--pmem", default="auto", metavar="SIZE|auto|off",
                   help=f"two pmem devices of SIZE for the devdax/fsdax backings (auto: {runner.DEFAULT_PMEM} each "
                        "when the kernel's config has CONFIG_LIBNVDIMM with ACPI_NFIT or VIRTIO_PMEM; needs q35)")
    p.add_argument("--shards", type=shards_arg, default=1, metavar="N|auto",
                   help="run N guests side by side, each on every N-th case (pytest --shard I/N), and merge their "
                        "answers and --junitxml/--ktap files: a TCG guest has one vCPU, one host core, so N guests "
                        "use N cores; each takes --mem (N x --mem of host RAM). auto: host CPUs up to "
                        f"{runner.MAX_AUTO_SHARDS} (as many as MemAvailable holds) under TCG, 1 under KVM "
                        "(default %(default)s)")
    p.add_argument("--append", default="", help="extra kernel command line (e.g. oops=panic)")
    p.add_argument("--hugetlb-cma", default="auto", metavar="SIZE|auto|off",
                   help="the guest kernel's hugetlb_cma=, the area its 1 GiB hugetlb pages come from at run time "
                        f"(auto: up to {runner.MAX_HUGETLB_CMA_GIB}G, --mem minus 3G, when the kernel's config has "
                        "CONFIG_CMA and CONFIG_HUGETLB_PAGE; without it the 1 GiB cases skip)")
    p.add_argument("--qemu", default=runner.QEMU, help="QEMU binary (default %(default)s)")


def shards_arg(text: str) -> int:
    """--shards: a count >= 1, or auto (0 in RunConfig: the runner decides once it knows the accelerator)."""
    if text == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of guests >= 1, or auto") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1 guest (or auto)")
    return n


def pytest_rest(argv: list[str]) -> list[str]:
    """The pytest args after `--`; the guest's root is a throwaway overlay, so no cache provider."""
    rest = argv[1:] if argv[:1] == ["--"] else argv
    if "no:cacheprovider" not in rest:
        rest = [*rest, "-p", "no:cacheprovider"]
    return rest


def run_config(args: argparse.Namespace, kernel: Path, modules: Path | None, rest: list[str],
               outdir: Path | None = None) -> runner.RunConfig:
    return runner.RunConfig(kernel=kernel, pytest_args=rest, modules=modules, cpus=args.cpus,
                            mem=args.mem, boot_timeout=args.boot_timeout, timeout=args.timeout,
                            boot_failure=_CODES[args.boot_failure], crash=_CODES[args.crash], accel=args.accel,
                            machine=args.machine, append=args.append, qemu=args.qemu, outdir=outdir,
                            force=args.force, pmem=args.pmem, shards=args.shards, hugetlb_cma=args.hugetlb_cma)


def resolve_kernel(spec: str, modules: Path | None = None, log=print) -> tuple[Path, Path | None]:
    """A path as it is, `debian:VER` fetched into the cache, or `debian:VER+NAME=VALUE...` (KVM rebuilt
    with those options, built first unless cached): (image, modules dir)."""
    if kvmbuild.is_rebuild(spec):
        b = kvmbuild.ensure(spec, say=log)
        return b.vmlinuz, modules or b.modules
    if spec.startswith("debian:"):
        a = debian.Archive()
        f = a.fetch(a.resolve(spec), log=log)
        return f.vmlinuz, modules or f.modules
    return Path(spec), modules


def _parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m harness kernel {action}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if action == "run":
        add_run_options(p)
        p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest args run inside the guest")
    elif action == "fetch":
        p.add_argument("names", nargs="+", help="debian:7.3.4, debian:6.12, debian:latest, debian:7.2.6+deb13")
        p.add_argument("--link", help="also point .cache/kernels/debian/NAME at the (last) kernel's unpacked root")
    elif action == "build-kvm":
        p.add_argument("name", help="the packaged kernel (debian:7.3.4, debian:7.3), or a whole rebuild name "
                       "(debian:7.3.4+KVM_SW_PROTECTED_VM=y)")
        p.add_argument("--config", action="append", default=[], metavar="NAME=VALUE",
                       help="a KVM option from arch/x86/kvm/Kconfig or virt/kvm/Kconfig (repeatable)")
        p.add_argument("--jobs", type=int, default=2, help="make -j (default %(default)s)")
        p.add_argument("--rebuild", action="store_true", help="build again even when cached (the chroot, packages "
                       "and sources are kept)")
    elif action == "list":
        p.add_argument("--refresh", action="store_true", help="refresh the package lists now")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif action == "bisect":
        p.add_argument("--good", required=True, help="a packaged kernel that passes (debian:6.12.117)")
        p.add_argument("--bad", required=True, help="a packaged kernel that fails (debian:7.3.4)")
        p.add_argument("--include-rc", action="store_true", help="also test release candidates between them")
        add_run_options(p, kernel_required=False)
        p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest args run inside the guest")
    return p


def run(args) -> int:
    argv = list(args.argv)
    action = argv.pop(0) if argv and argv[0] in ACTIONS else "run"
    ns = _parser(action).parse_args(argv)
    try:
        return {"run": _run, "fetch": _fetch, "build-kvm": _build_kvm, "list": _list, "bisect": _bisect}[action](ns)
    except HarnessError as e:  # a name that does not resolve, a fetch or a KVM build that failed
        print(f"kernel {action}: {e}", file=sys.stderr)
        return runner.SKIP if action in ("run", "bisect") else 2


def _run(ns: argparse.Namespace) -> int:
    kernel, modules = resolve_kernel(ns.kernel, ns.modules)
    res = runner.run(run_config(ns, kernel, modules, pytest_rest(ns.pytest_args)), sys.stdout)
    runner.report(res, sys.stdout)
    return res.code


def _fetch(ns: argparse.Namespace) -> int:
    a = debian.Archive()
    last = None
    for name in ns.names:
        k = a.resolve(name)
        last = a.fetch(k)
        print(f"{name}: {k.upstream} ({k.abi}, package {k.version})\n  kernel  {last.vmlinuz}\n"
              f"  modules {last.modules}\n  config  {last.config or '(none)'}")
    if ns.link and last is not None:
        link = a.cache / "debian" / ns.link
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(last.root.relative_to(link.parent))
        print(f"  linked  {link} -> {last.root}")
    return 0


def _build_kvm(ns: argparse.Namespace) -> int:
    opts = dict(kvmbuild.parse_option(c) for c in ns.config)
    b = kvmbuild.build(ns.name, opts, jobs=ns.jobs, rebuild=ns.rebuild)
    mods = ", ".join(f"{f} {n >> 10} KiB" for f, n in sorted(b.meta.get("modules", {}).items()))
    print(f"{b.name}: {'cached' if b.hit else 'built'}\n  kernel  {b.vmlinuz}\n  modules {b.modules} ({mods})\n"
          f"  use     python -m harness kernel --kernel {b.name} -- <pytest args>")
    return 0


def _list(ns: argparse.Namespace) -> int:
    a = debian.Archive()
    if ns.refresh:
        a.update(force=True)
    ks = a.kernels()
    cached = {abi: (size, used) for abi, size, used in a.cached()}
    if ns.json:
        print(json.dumps([{"name": k.name, "abi": k.abi, "version": k.version, "cached": k.abi in cached,
                           "complete": k.complete}
                          for k in ks], indent=1))
        return 0
    print(f"{'name':<20} {'abi':<26} {'package version':<22} cached")
    for k in ks:
        c = f"{cached[k.abi][0] >> 20} MiB" if k.abi in cached else ""
        c = c or ("" if k.complete else "(modules gone: cannot boot)")
        print(f"{k.name:<20} {k.abi:<26} {k.version:<22} {c}")
    total = sum(s for s, _ in cached.values())
    print(f"\n{len(ks)} kernels offered; cache {a.cache}: {len(cached)} unpacked, {total >> 20} MiB "
          f"(limit {debian.DEFAULT_CACHE_LIMIT >> 30} GiB, KVM_HARNESS_KERNEL_CACHE_LIMIT; "
          "least recently used go first)")
    builds = kvmbuild.cached()
    if builds:
        print(f"\nKVM rebuilds in {kvmbuild.ROOT} (--kernel NAME; kernel build-kvm):")
        print(f"{'name':<48} {'size':>8}  built")
        for b in builds:
            secs = b.get("times", {}).get("total")
            took = f" in {secs:.0f} s" if secs else ""
            print(f"{b['name']:<48} {b['bytes'] >> 20:>4} MiB  {b.get('built', '?')}{took}")
    shared = kvmbuild.shared_dirs()
    if shared:
        print("shared by the rebuilds: " + ", ".join(f"{w} {n >> 20} MiB" for w, _, n in shared))
    return 0


def _bisect(ns: argparse.Namespace) -> int:
    rest = pytest_rest(ns.pytest_args)
    return vb.bisect(ns.good, ns.bad, rest, lambda k, m: run_config(ns, k, m, rest),
                     include_rc=ns.include_rc, out=sys.stdout)
