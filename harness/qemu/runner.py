"""Boot a kernel under QEMU, run pytest args inside against its /dev/kvm, answer in bisect codes.

(Over 400 lines: one run's whole life, QEMU command, console watch, verdict, kept together so the
bisect codes have one author; the initramfs, image and module handling are already their own modules.)

The guest is ours end to end (initramfs.py): QEMU's own options only, nothing installed in the
guest, the host root shared read-only over 9p with a tmpfs overlay. The console (ttyS0) is piped
to the host and streamed live; sentinel lines carrying a per-run nonce say how far the guest got:

    BOOTED  the kernel reached our /init            (none before --boot-timeout: boot failure)
    RESULT  the harness's verdict, 0 / 1 / 125      (the answer)
    EXIT    /init's view of the Python exit status   (without RESULT: the harness died: 125)

Every run is bounded (boot timeout, overall timeout), QEMU is killed by its pid in a finally, and the
temporary directory (initramfs, extracted vmlinux, the pmem devices' backing files) is removed.

Shards (RunConfig.shards > 1): N guests side by side, each with one TCG vCPU (so N host cores), its
own QEMU, initramfs, nonce and pmem files, guest I running the pytest args with `--shard I/N`
(harness/pytest/shard.py). Each console streams with an `[I/N] ` prefix per line; the answers combine
as `combine` says; result files named in the args (--junitxml, --ktap) are written per shard as
PATH.shardI and merged into PATH afterwards (harness/report/merge.py).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from harness import backends as backend
from harness.qemu import image, initramfs
from harness.qemu.modules import ModuleError, ModuleTree
from harness.report import merge

GOOD, BAD, SKIP = 0, 1, 125
CONFIG_ENV = "KVM_HARNESS_KERNEL_CONFIG"  # set in the guest: the booted image's .config (known issues read it)
ACCEL_ENV = "KVM_HARNESS_ACCEL"  # set in the guest: how the CPU under its KVM is provided (tcg / kvm)
ABORT = 128  # the selection itself is wrong (collects nothing, a usage error): git bisect run must stop
QEMU = "qemu-system-x86_64"
REPO = Path(__file__).resolve().parents[2]
_SENTINEL = re.compile(r"@@KH-(BOOTED|RESULT|EXIT) ([0-9a-f]+)(?: (-?\d+))?@@")
_MEM = re.compile(r"^\d+[MGT]?$", re.IGNORECASE)
PMEM_ENV = "KVM_HARNESS_PMEM"  # set in the guest when the runner gave it pmem: "scratch" (harness/memory/dax.py)
DEFAULT_PMEM = "256M"  # each of the two pmem devices --pmem auto gives a kernel with the drivers
PMEM_DEVICES = 2  # one stays fsdax (/dev/pmem0, ext4 -o dax), the guest turns the other into devdax
MAX_AUTO_SHARDS = 4  # --shards auto: at most this many guests (each one host core and --mem of RAM)
# Guest RAM: QEMU touches only what the guest uses. 6G leaves room above 4 GiB (q35 maps 2G below and
# the rest above) for a CMA area of 3 GiB, from which the guest allocates 1 GiB hugetlb pages at run
# time: without one a 2 GiB guest never finds a free, aligned 1 GiB range and the 1 GiB cases skip.
DEFAULT_MEM = "6G"
MAX_HUGETLB_CMA_GIB = 3  # the cases hold at most two 1 GiB pages at once; one more range to spare
# harness/pytest/shard.py's line: what a shard got (0 of M > 0: fewer cases than shards, not a bad selection)
_SHARD_LINE = re.compile(r"shard (\d+)/(\d+): runs (\d+) of (\d+) collected cases")
_RESULT_OPTS = {"--junitxml": "junit", "--junit-xml": "junit", "--ktap": "ktap"}  # files merged after shards


@dataclass
class RunConfig:
    kernel: Path
    pytest_args: list[str]
    modules: Path | None = None
    cpus: int | None = None  # None: 1 under TCG (see default_cpus), 2 under KVM
    mem: str = DEFAULT_MEM
    boot_timeout: float = 60.0
    timeout: float = 900.0
    boot_failure: int = SKIP  # the code for a kernel that does not reach /init (--boot-failure)
    crash: int = BAD  # the code for a guest that dies after /init started, before a verdict (--crash)
    accel: str = "auto"  # auto | kvm | tcg
    machine: str = "auto"  # auto | microvm | q35
    pmem: str = "auto"  # auto | off | SIZE: two pmem devices of SIZE each (see choose_pmem)
    append: str = ""
    hugetlb_cma: str = "auto"  # auto | off | SIZE: hugetlb_cma= for 1 GiB pages (see choose_hugetlb_cma)
    outdir: Path | None = None  # a host folder the guest may write (mounted read-write at the same path)
    force: bool = False  # run settings known to be unreliable (more than one vCPU under TCG) anyway
    shards: int = 1  # guests side by side, each running every N-th case (--shard I/N); 0: auto (auto_shards)
    qemu: str = QEMU
    python: str = sys.executable
    cwd: str = str(REPO)
    tail_lines: int = 40
    grace: float = 10.0  # after the verdict, seconds for the guest to power off before QEMU is killed


@dataclass
class RunResult:
    code: int
    outcome: str  # "verdict", "boot-failure", "crash", "harness-died", "timeout", "setup"
    reason: str
    boot_seconds: float | None = None
    total_seconds: float = 0.0
    console_tail: list[str] = field(default_factory=list)
    qemu_stderr: str = ""
    shard_cases: tuple[int, int] | None = None  # a shard's "runs K of M collected cases", as (K, M)
    shards: list[RunResult] = field(default_factory=list)  # a sharded run: each shard's own result


# ---- pure logic (unit-tested) ----------------------------------------------------------------------

def parse_sentinel(line: str, nonce: str) -> tuple[str, int | None] | None:
    """("BOOTED", None) / ("RESULT", code) / ("EXIT", rc) for our sentinel, else None. Console lines
    can carry kernel messages around it (printk interleaves), and another run's nonce is ignored."""
    m = _SENTINEL.search(line)
    if not m or m.group(2) != nonce:
        return None
    kind, num = m.group(1), m.group(3)
    if kind == "BOOTED":
        return kind, None
    if num is None:
        return None
    return kind, int(num)


@dataclass
class GuestProgress:
    """What the console said so far."""

    booted: bool = False
    result: int | None = None
    exit_rc: int | None = None
    why: str = ""  # the guest's last summary line before its RESULT ("bisect: ..." or its own)


def verdict(p: GuestProgress, *, qemu_rc: int | None, timed_out: bool, boot_failure: int = SKIP,
            crash: int = BAD, killed: bool = False) -> tuple[int, str, str]:
    """(exit code, outcome, reason) from how far the guest got; only 0, 1, 125, 128 (the harness inside
    said the selection is wrong: a typo must stop a `git bisect run`, not skip every commit) or the
    configured boot-failure/crash codes come out."""
    if p.result is not None:
        if p.result in (GOOD, BAD, SKIP, ABORT):
            word = {GOOD: "the cases passed", BAD: "a case failed", SKIP: "cannot test inside the guest",
                    ABORT: "the selection is wrong (abort the bisect)"}[p.result]
            return p.result, "verdict", f"{word} ({p.why})" if p.why else word
        return SKIP, "harness-died", f"the harness answered {p.result}, not a bisect code"
    if killed:  # QEMU was signalled from outside: says nothing about the kernel
        return SKIP, "killed", "QEMU was terminated by a signal from outside"
    if p.exit_rc is not None:
        return SKIP, "harness-died", f"the guest finished without a verdict from the harness (exit {p.exit_rc})"
    if not p.booted:
        if timed_out:
            return boot_failure, "boot-failure", "the kernel did not reach /init within the boot timeout"
        return boot_failure, "boot-failure", f"QEMU exited (status {qemu_rc}) before the kernel reached /init"
    if timed_out:
        # a slow good kernel and a hung bad one look the same from here: do not guess
        return SKIP, "timeout", "the overall timeout expired while the cases ran"
    return crash, "crash", f"the guest died (QEMU status {qemu_rc}) after boot, before a verdict: panic or reset"


def nested_available() -> str | None:
    """None if this host's KVM can run a guest that itself offers /dev/kvm, else why not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm on the host"
    why = backend.current().cannot_accelerate_qemu
    if why:
        return why
    for mod in ("kvm_amd", "kvm_intel"):
        val = backend.module_param(mod, "nested")
        if val is not None:
            return None if val in ("1", "Y", "y") else f"{mod} nested={val}: the guest would have no /dev/kvm"
    return "no kvm_amd/kvm_intel on the host"


def choose_accel(requested: str, why_not_kvm: str | None) -> tuple[str, str]:
    """("kvm"|"tcg", why). auto takes KVM only when nested virtualization is on offer."""
    if requested in ("kvm", "tcg"):
        return requested, "requested"
    if why_not_kvm is None:
        return "kvm", "the host's KVM offers nested virtualization"
    return "tcg", f"TCG with -cpu max (nested SVM emulated): {why_not_kvm}"


def default_cpus(accel: str) -> int:
    """One vCPU under TCG: QEMU 7.2 runs TCG vCPUs round-robin on one thread, so a second one adds
    no parallelism, halves the speed (55 s vs 26 s for the same cases here) and, on a loaded host,
    about one run in four lost a wakeup and sat with a runnable task on an idle CPU until the
    timeout (RCU stall, soft lockup in swapper). KVM vCPUs are real threads: two."""
    return 1 if accel == "tcg" else 2


def unreliable(accel: str, cpus: int) -> str | None:
    """Why a setting is known to give verdicts that are not the kernel's, or None."""
    if accel == "tcg" and cpus > 1:
        return (f"{cpus} vCPUs under TCG: guests died of an int3 Oops in __schedule within 70 s (Debian 7.3.4) "
                "and lost wakeups until the timeout (6.1), which would blame the kernel for the emulator")
    return None


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def mem_available_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) >> 10 if m else None


def auto_shards(accel: str, cpus: int, mem: str, avail_mib: int | None) -> int:
    """--shards auto: under TCG one guest per host CPU (each guest's one vCPU is one host thread), at
    most MAX_AUTO_SHARDS and as many as MemAvailable holds guests of `mem`; under KVM 1 (its guest's
    vCPUs are host threads already)."""
    if accel != "tcg":
        return 1
    n = min(cpus, MAX_AUTO_SHARDS)
    if avail_mib is not None:
        n = min(n, avail_mib // _mib(mem))
    return max(1, n)


def shard_args(args: Sequence[str], i: int, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Shard i's pytest args: `--shard i/n` in front, and every result file the args name (--junitxml,
    --junit-xml, --ktap; `=PATH` or ` PATH`) as PATH.shardI; with the (kind, PATH) pairs to merge. `--ktap`
    alone or `--ktap -` is stdout (that console's own KTAP): nothing to merge."""
    out: list[str] = []
    files: list[tuple[str, str]] = []
    k = 0
    while k < len(args):
        a = args[k]
        if a == "--":  # the rest is positional
            out += args[k:]
            break
        name, eq, val = a.partition("=")
        kind = _RESULT_OPTS.get(name)
        if kind is None:
            out.append(a)
        elif eq:
            if val in ("", "-"):
                out.append(a)
            else:
                files.append((kind, val))
                out.append(f"{name}={val}.shard{i}")
        else:
            nxt = args[k + 1] if k + 1 < len(args) else None
            # --junitxml takes the next word whatever it is; --ktap (nargs="?") one that is no option
            if nxt is not None and nxt != "-" and (kind == "junit" or not nxt.startswith("-")):
                files.append((kind, nxt))
                out += [a, f"{nxt}.shard{i}"]
                k += 2
                continue
            out.append(a)
        k += 1
    return ["--shard", f"{i}/{n}", *out], list(dict.fromkeys(files))


def _empty_shard(r: RunResult) -> bool:
    """A shard that got no case (fewer cases than shards): pytest says "no tests ran" (128), but the
    selection is not wrong: another shard ran its cases."""
    return r.code == ABORT and r.shard_cases is not None and r.shard_cases[0] == 0 and r.shard_cases[1] > 0


def _rank(r: RunResult) -> int:
    """Which shard's answer wins, lowest first (combine)."""
    if r.code == ABORT:
        return 0
    if r.outcome == "setup":
        return 1
    if r.code == BAD:
        return 2
    if r.code == GOOD:
        return 5
    if r.outcome == "verdict":  # the harness inside said cannot test: its cases all skipped (or no /dev/kvm)
        return 4
    return 3  # cannot test from outside: timeout, boot failure (skip), harness died, killed, stopped


def combine(results: Sequence[RunResult]) -> RunResult:
    """One answer from the shards' (in shard order), in the same bisect codes: any 128 -> 128 (the
    selection is wrong; a shard that merely got no case does not count); else a shard that could not
    start -> 125; else any 1 (a case failed, or --crash bad) -> 1; else any 125 from outside the
    cases (timeout, boot failure, the harness died, killed) -> 125; else 0 if some shard passed, and
    125 only if every shard's cases skipped: what one guest running them all would have answered
    (a shard whose few cases all skipped beside one that passed is a run with skips and a pass).
    The reason names the deciding shard first, then what each other shard said."""
    n = len(results)
    live = [(i, r) for i, r in enumerate(results, 1) if not _empty_shard(r)]
    if not live:
        return RunResult(ABORT, "verdict", "no shard had a case to run", shards=list(results))
    best = min(_rank(r) for _, r in live)
    if best == 4 and any(_rank(r) == 5 for _, r in live):
        best = 5
    # among the shards that say it, one that did not reach a verdict shows best why (its console)
    cands = [(i, r) for i, r in live if _rank(r) == best]
    i, d = next(((i, r) for i, r in cands if r.outcome != "verdict"), cands[0])
    code = {0: ABORT, 1: SKIP, 2: BAD, 3: SKIP, 4: SKIP, 5: GOOD}[best]
    outcome = d.outcome if best <= 3 else "verdict"

    def said(j: int, r: RunResult) -> str:
        if _empty_shard(r):
            return f"shard {j}/{n}: none of the {r.shard_cases[1] if r.shard_cases else 0} collected cases fell to it"
        return f"shard {j}/{n}: {r.reason}" + ("" if r.outcome == "verdict" else f" [{r.outcome}]")

    reason = "; ".join([said(i, d)] + [said(j, r) for j, r in enumerate(results, 1) if j != i])
    boots = [r.boot_seconds for r in results if r.boot_seconds is not None]
    return RunResult(code, outcome, reason, max(boots) if boots else None, max(r.total_seconds for r in results),
                     d.console_tail, d.qemu_stderr, shards=list(results))


def kernel_config(kernel: Path) -> dict[str, str]:
    """The kernel's .config when it sits where builds and packages put it (a build tree's root,
    /boot/config-VER next to vmlinuz-VER); empty when unknown."""
    c = kernel_config_path(kernel)
    if c is None:
        return {}
    cfg = {}
    for line in c.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            cfg[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            cfg[line[2:].split()[0]] = "n"
    return cfg


def kernel_config_path(kernel: Path) -> Path | None:
    """Where kernel_config() reads the image's .config (None when there is none)."""
    candidates = []
    name = kernel.name
    if name.startswith(("vmlinuz-", "vmlinux-")):
        candidates.append(kernel.with_name("config-" + name.split("-", 1)[1]))
    candidates.append(kernel.with_name("config"))  # usr/lib/modules/VER/{vmlinuz,config}
    for up in kernel.parents[:4]:  # the image's dir up to a tree's root (arch/x86/boot/)
        candidates.append(up / ".config")
    for c in candidates:
        if c.is_file():
            return c
    return None


def choose_machine(requested: str, config: dict[str, str], pmem: Pmem | None = None) -> str:
    """microvm (fast: qboot, no PCI; boots a PVH vmlinux or a bzImage) unless the kernel's config
    says it has no virtio-mmio, microvm's only virtio transport, or the guest gets pmem (QEMU 7.2's
    microvm maps no memory device: no nvdimm=on, and a virtio-pmem on its virtio-mmio bus is never
    plugged into guest memory): then q35 and virtio-pci."""
    if requested != "auto":
        return requested
    if pmem is not None:
        return "q35"
    if config and config.get("CONFIG_VIRTIO_MMIO", "n") == "n":
        return "q35"
    return "microvm"


@dataclass(frozen=True)
class Pmem:
    """Persistent memory for the guest (the devdax/fsdax backings): PMEM_DEVICES QEMU devices, each
    over a sparse file of `size` in the run's temporary directory (removed with it)."""

    device: str  # "nvdimm" (ACPI NFIT, q35 nvdimm=on) or "virtio-pmem" (virtio-pmem-pci)
    size: str
    files: tuple[Path, ...]

    def describe(self) -> str:
        return f"{len(self.files)} x {self.size} {self.device}"


def _mib(size: str) -> int:
    """"2G" -> 2048 (QEMU's -m: a bare number is MiB)."""
    if not _MEM.match(size):
        raise ValueError(f"{size!r}: a size like 2G or 256M")
    n, unit = (int(size[:-1]), size[-1].upper()) if size[-1].isalpha() else (int(size), "M")
    return n << {"M": 0, "G": 10, "T": 20}[unit]


def _on(config: dict[str, str], opt: str) -> bool:
    return config.get(opt, "n") in ("y", "m")


def choose_pmem(requested: str, config: dict[str, str], machine: str = "auto") -> tuple[str | None, str]:
    """(pmem device kind or None, why). auto: when the kernel's config has LIBNVDIMM and one of its
    front ends (ACPI_NFIT for an nvdimm, VIRTIO_PMEM), on any machine but an explicit microvm; an
    explicit SIZE insists (ValueError where it cannot be had)."""
    if requested in ("off", "0", "none"):
        return None, "--pmem off"
    explicit = requested != "auto"
    if explicit and (_mib(requested) < 16 or _mib(requested) % 2):
        raise ValueError(f"--pmem {requested}: at least 16M, in whole 2 MiB (devdax alignment)")
    if machine == "microvm":
        if explicit:
            raise ValueError("--pmem needs --machine q35 (or auto): QEMU 7.2's microvm plugs no memory device")
        return None, "no pmem on microvm (QEMU 7.2 plugs no memory device there)"
    if not config:
        if explicit:
            return "nvdimm", "requested (the kernel's config is unknown: its drivers are assumed)"
        return None, "the kernel's config is unknown: no pmem unless --pmem SIZE"
    if not _on(config, "CONFIG_LIBNVDIMM"):
        if explicit:
            raise ValueError("--pmem: the kernel has no CONFIG_LIBNVDIMM")
        return None, "the kernel has no CONFIG_LIBNVDIMM"
    if _on(config, "CONFIG_ACPI_NFIT"):
        return "nvdimm", "CONFIG_LIBNVDIMM and CONFIG_ACPI_NFIT"
    if _on(config, "CONFIG_VIRTIO_PMEM"):
        return "virtio-pmem", "CONFIG_LIBNVDIMM and CONFIG_VIRTIO_PMEM (no ACPI_NFIT)"
    if explicit:
        raise ValueError("--pmem: the kernel has neither CONFIG_ACPI_NFIT nor CONFIG_VIRTIO_PMEM")
    return None, "the kernel has neither CONFIG_ACPI_NFIT nor CONFIG_VIRTIO_PMEM"


def make_pmem(device: str, size: str, tmp: Path, count: int = PMEM_DEVICES) -> Pmem:
    """The backing files, sparse (the host spends memory only on what the guest writes)."""
    files = []
    for i in range(count):
        f = tmp / f"pmem{i}.img"
        with open(f, "wb") as fh:
            fh.truncate(_mib(size) << 20)
        files.append(f)
    return Pmem(device, size, tuple(files))


def pmem_options(pmem: Pmem, mem: str) -> tuple[str, list[str], list[str]]:
    """(machine property suffix, the -m value, the -object/-device args) for the pmem devices."""
    n = len(pmem.files)
    maxmem = _mib(mem) + n * _mib(pmem.size)
    args: list[str] = []
    for i, f in enumerate(pmem.files):
        args += ["-object", f"memory-backend-file,id=pmem{i},share=on,mem-path={f},size={pmem.size}"]
        if pmem.device == "nvdimm":
            args += ["-device", f"nvdimm,memdev=pmem{i},id=nv{i}"]
        else:
            args += ["-device", f"virtio-pmem-pci,memdev=pmem{i},id=nv{i}"]
    suffix = ",nvdimm=on" if pmem.device == "nvdimm" else ""
    return suffix, f"{mem},slots={n},maxmem={maxmem}M", args


def default_modules_dir(kernel: Path) -> Path | None:
    """Where the kernel's modules usually are: lib/modules/VER beside boot/vmlinuz-VER (a distribution
    package unpacked with dpkg-deb), or the build tree holding the image (modules.order at its root)."""
    if kernel.name.startswith(("vmlinuz-", "vmlinux-")):
        ver = kernel.name.split("-", 1)[1]
        for root in (kernel.parent.parent, kernel.parent.parent / "usr"):
            d = root / "lib" / "modules" / ver
            if d.is_dir():
                return d
    for up in kernel.parents[:4]:  # the image's dir up to a tree's root (arch/x86/boot/)
        if (up / "modules.order").is_file():
            return up
    return None


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, which is the guest's under TCG (QEMU's rdtsc reads the host TSC)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(16384)
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.M)
    if not (flags and mhz and "constant_tsc" in flags.group(1).split()):
        return None  # with a variable TSC "cpu MHz" says nothing about it
    return round(float(mhz.group(1)) * 1000)


def host_phys_bits() -> int | None:
    """The host CPU's MAXPHYADDR: TCG's -cpu max says 40 unless told, and cases parametrized on the
    host's address width (GPAs up to 2^48) would then fail inside for want of address bits."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^address sizes\s*:\s*(\d+) bits physical", f.read(16384), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def choose_hugetlb_cma(requested: str, mem: str, config: dict[str, str], append: str) -> tuple[str | None, str]:
    """(the kernel's hugetlb_cma= value or None, why). auto: up to MAX_HUGETLB_CMA_GIB whole GiB, at
    most --mem minus 3 GiB (q35 maps 2 GiB below 4 GiB; the area must fit in the RAM above, with room
    to spare), when the kernel's config has CMA and hugetlb pages."""
    if "hugetlb_cma=" in append:
        return None, "hugetlb_cma= given in --append"
    if requested == "off":
        return None, "--hugetlb-cma off"
    if requested != "auto":
        if not _MEM.match(requested) or _mib(requested) % 1024:
            raise ValueError(f"--hugetlb-cma {requested}: auto, off, or whole GiB like 2G")
        return requested, "--hugetlb-cma"
    if not config:
        return None, "the kernel's config is unknown: no hugetlb CMA unless --hugetlb-cma SIZE"
    if not (_on(config, "CONFIG_CMA") and _on(config, "CONFIG_HUGETLB_PAGE")):
        return None, "the kernel's config lacks CONFIG_CMA or CONFIG_HUGETLB_PAGE"
    gib = min(MAX_HUGETLB_CMA_GIB, _mib(mem) // 1024 - 3)
    if gib < 1:
        return None, f"--mem {mem} leaves no room for it (4G or more does): 1 GiB hugetlb cases skip"
    return f"{gib}G", "1 GiB hugetlb pages at run time"


def kernel_cmdline(accel: str, append: str, tsc_khz: int | None) -> str:
    # panic=-1, reboot=t: a panic or our reboot resets the guest, and -no-reboot ends QEMU
    parts = ["console=ttyS0 panic=-1 reboot=t loglevel=4"]
    if accel == "tcg" and tsc_khz:
        # Under TCG on a loaded host the kernel's PIT calibration of the TSC fails (microvm has no
        # HPET/PM timer to fall back on) and boot stalls for minutes: tell it the frequency instead.
        parts.append(f"tsc_early_khz={tsc_khz} tsc=reliable")
    if append:
        parts.append(append)
    return " ".join(parts)


def qemu_command(*, qemu: str, accel: str, machine: str, kernel: Path, initrd: Path, cpus: int, mem: str,
                 cmdline: str, phys_bits: int | None = None, share: str = "/", outdir: Path | None = None,
                 pmem: Pmem | None = None) -> list[str]:
    if not _MEM.match(mem):
        raise ValueError(f"--mem {mem!r}: a size like 2G or 1536M")
    if cpus < 1:
        raise ValueError("--cpus must be at least 1")
    machine_opt, mem_opt, pmem_args = machine, mem, []
    if pmem is not None:
        if machine == "microvm":
            raise ValueError("pmem needs a PC machine (q35): QEMU 7.2's microvm plugs no memory device")
        suffix, mem_opt, pmem_args = pmem_options(pmem, mem)
        machine_opt += suffix
    cmd = [qemu, "-M", machine_opt, "-m", mem_opt, "-smp", str(cpus), "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-serial", "stdio",
           "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", cmdline,
           # the host root, read-only; remap: / spans several filesystems (inode numbers would collide)
           "-fsdev", f"local,id=hostroot,path={share},security_model=none,readonly=on,multidevs=remap",
           "-device", ("virtio-9p-device" if machine == "microvm" else "virtio-9p-pci")
           + ",fsdev=hostroot,mount_tag=hostroot"]
    if outdir is not None:
        cmd += ["-fsdev", f"local,id=khout,path={outdir},security_model=none",
                "-device", ("virtio-9p-device" if machine == "microvm" else "virtio-9p-pci")
                + ",fsdev=khout,mount_tag=khout"]
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        # max: SVM, so the guest's kvm_amd loads; phys-bits: the host's MAXPHYADDR (TCG accepts 32..52)
        cmd += ["-accel", "tcg", "-cpu", f"max,phys-bits={phys_bits}" if phys_bits else "max"]
    return cmd + pmem_args


# ---- the run ----------------------------------------------------------------------------------------

def _reader(stream, name: str, q: queue.Queue) -> None:
    fd = stream.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        q.put((name, chunk))
        if not chunk:
            return


def _say(out: TextIO, msg: str) -> None:
    out.write(f"kernel-runner: {msg}\n")
    out.flush()


def _prepare_kernel(cfg: RunConfig, tmp: Path, out: TextIO) -> image.KernelImage:
    img = image.identify(cfg.kernel)
    if img.kind == "bzimage":
        t = time.monotonic()
        ext = image.extract_vmlinux(img.path, tmp / "vmlinux")
        if ext:
            _say(out, f"{cfg.kernel}: bzImage; booting its vmlinux (PVH entry, extracted in "
                      f"{time.monotonic() - t:.1f} s) so the guest skips decompressing itself")
            return ext
        _say(out, f"{cfg.kernel}: bzImage (payload not extractable to a PVH vmlinux here): booting it as is")
    elif img.kind == "elf" and not img.pvh:
        _say(out, f"{cfg.kernel}: vmlinux without the PVH entry note (CONFIG_PVH=n): QEMU will refuse it; "
                  "build with CONFIG_PVH=y or pass arch/x86/boot/bzImage")
    else:
        _say(out, f"{cfg.kernel}: {img.describe}")
    return img


def result_outdir(args: Sequence[str], cwd: str | Path) -> Path | None:
    """The one host folder the result files the pytest args name (--junitxml, --ktap) are in: the
    guest writes to the host only there (RunConfig.outdir). None when they name none; ValueError
    when they are in different folders (one read-write share per guest)."""
    dirs = {(Path(cwd) / p).resolve().parent for _, p in shard_args(args, 1, 1)[1]}
    if len(dirs) > 1:
        raise ValueError(f"the result files are in {len(dirs)} folders ({', '.join(sorted(map(str, dirs)))}): "
                         "the guest can write back to one; put --junitxml and --ktap in the same folder")
    return next(iter(dirs), None)


def run(cfg: RunConfig, out: TextIO | None = None) -> RunResult:
    out = out or sys.stdout
    t0 = time.monotonic()
    if cfg.outdir is None:
        # without it the guest writes them into its own tmpfs overlay and they are lost with it
        try:
            cfg = replace(cfg, outdir=result_outdir(cfg.pytest_args, cfg.cwd))
        except ValueError as e:
            return RunResult(ABORT, "setup", str(e))
    if not cfg.kernel.is_file():  # e.g. the build step made none: this commit cannot boot
        return RunResult(cfg.boot_failure, "boot-failure", f"{cfg.kernel}: no such kernel image")
    if not shutil.which(cfg.qemu):
        return RunResult(SKIP, "setup", f"{cfg.qemu} not found (apt-get install qemu-system-x86)")
    busybox = initramfs.find_busybox()
    if not busybox:
        return RunResult(SKIP, "setup", "no busybox (apt-get install busybox-static)")
    if cfg.shards < 0:
        return RunResult(SKIP, "setup", f"--shards {cfg.shards}: at least 1 (0: auto)")
    mods_dir = cfg.modules or default_modules_dir(cfg.kernel)
    with _terminate_as_exit():
        res = _run_in(cfg, out, mods_dir, busybox, t0)
    res.total_seconds = time.monotonic() - t0
    return res


@dataclass
class _Prepared:
    """What every guest of one run shares (the kernel, its modules, the accelerator, the command line)."""

    img: image.KernelImage
    modules: ModuleTree | None
    mods_dir: Path | None
    busybox: str
    env: dict[str, str]
    accel: str
    accel_why: str
    config: dict[str, str]
    pmem_kind: str | None
    pmem_why: str
    cma: str | None
    cma_why: str
    cpus: int
    cmdline: str
    phys_bits: int | None


@dataclass
class _Guest:
    """One guest: its QEMU command and nonce (its initramfs and pmem files are in its own folder)."""

    cmd: list[str]
    nonce: str
    loads: dict[str, list[str]]
    machine: str
    pmem: Pmem | None


def _prepare(cfg: RunConfig, out: TextIO, tmp: Path, mods_dir: Path | None, busybox: str) -> _Prepared | RunResult:
    img = _prepare_kernel(cfg, tmp, out)
    modules = ModuleTree.scan(mods_dir) if mods_dir else None
    env = {k: v for k, v in os.environ.items() if k.startswith("KVM_HARNESS_")}
    accel, why = choose_accel(cfg.accel, nested_available() if cfg.accel == "auto" else None)
    # known issues of the emulator (environment = "tcg" in known-issues.toml) apply only there
    env[ACCEL_ENV] = accel
    # the guest has no /proc/config.gz nor /boot/config-VER of its own: config-keyed known issues
    # read the image's config through the shared root
    cpath = kernel_config_path(cfg.kernel)
    if cpath is not None:
        env[CONFIG_ENV] = str(cpath.resolve())
    env.pop(PMEM_ENV, None)
    config = kernel_config(cfg.kernel)
    pmem_kind, pmem_why = choose_pmem(cfg.pmem, config, cfg.machine)
    cma, cma_why = choose_hugetlb_cma(cfg.hugetlb_cma, cfg.mem, config, cfg.append)
    append = " ".join(p for p in (f"hugetlb_cma={cma}" if cma else "", cfg.append) if p)
    if cfg.outdir is not None:
        cfg.outdir.mkdir(parents=True, exist_ok=True)
    cpus = cfg.cpus or default_cpus(accel)
    why_not = unreliable(accel, cpus)
    if why_not and not cfg.force:
        return RunResult(SKIP, "setup", f"refused: {why_not} (--force runs it anyway)")
    if why_not:
        _say(out, f"warning: {why_not}; running anyway (--force)")
    return _Prepared(img, modules, mods_dir, busybox, env, accel, why, config, pmem_kind, pmem_why, cma, cma_why,
                     cpus, kernel_cmdline(accel, append, host_tsc_khz()), host_phys_bits())


def _make_guest(cfg: RunConfig, prep: _Prepared, gdir: Path, pytest_args: list[str]) -> _Guest:
    """The guest's initramfs (its own nonce) and pmem files in gdir, and its QEMU command."""
    gdir.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8)
    env = dict(prep.env)
    pmem = (make_pmem(prep.pmem_kind, DEFAULT_PMEM if cfg.pmem == "auto" else cfg.pmem, gdir)
            if prep.pmem_kind else None)
    if pmem is not None:
        env[PMEM_ENV] = "scratch"  # the guest may format and reconfigure every pmem namespace it has
    spec = initramfs.GuestSpec(pytest_args, cfg.cwd, cfg.python, nonce, env,
                               str(cfg.outdir.resolve()) if cfg.outdir else "", pause_khugepaged=prep.accel == "tcg")
    loads = initramfs.build(gdir / "initramfs.cpio", spec, prep.modules, prep.busybox)
    machine = choose_machine(cfg.machine, prep.config, pmem)
    cmd = qemu_command(qemu=cfg.qemu, accel=prep.accel, machine=machine, kernel=prep.img.path,
                       initrd=gdir / "initramfs.cpio", cpus=prep.cpus, mem=cfg.mem, cmdline=prep.cmdline,
                       phys_bits=prep.phys_bits, outdir=cfg.outdir.resolve() if cfg.outdir else None, pmem=pmem)
    return _Guest(cmd, nonce, loads, machine, pmem)


def _say_guest(cfg: RunConfig, prep: _Prepared, g: _Guest, out: TextIO, shards: int = 1) -> None:
    _say(out, f"modules from {prep.mods_dir or '(none: all built in?)'}: "
              f"{' '.join(g.loads['base']) or '-'} | amd: {' '.join(g.loads['amd']) or '-'} "
              f"| intel: {' '.join(g.loads['intel']) or '-'}")
    each = f"{shards} guests side by side, each: " if shards > 1 else ""
    _say(out, f"accel {prep.accel} ({prep.accel_why}), {each}machine {g.machine}, {prep.cpus} cpus, {cfg.mem}, "
              f"pmem {g.pmem.describe() if g.pmem else 'none'} ({prep.pmem_why}), "
              f"hugetlb CMA {prep.cma or 'none'} ({prep.cma_why}); "
              f"boot timeout {cfg.boot_timeout:g} s, overall {cfg.timeout:g} s")


def _run_in(cfg: RunConfig, out: TextIO, mods_dir: Path | None, busybox: str, t0: float) -> RunResult:
    tmp = Path(tempfile.mkdtemp(prefix="kvm-harness-kernel-"))
    try:
        prep = _prepare(cfg, out, tmp, mods_dir, busybox)
        if isinstance(prep, RunResult):
            return prep
        n = cfg.shards or auto_shards(prep.accel, host_cpus(), cfg.mem, mem_available_mib())
        if n > 1 and any(a == "--shard" or a.startswith("--shard=") for a in cfg.pytest_args):
            return RunResult(ABORT, "setup", "--shard in the pytest args and --shards: the runner gives each guest "
                                             "its --shard I/N itself")
        if n > 1:
            return _run_shards(cfg, prep, n, out, tmp, t0)
        g = _make_guest(cfg, prep, tmp, cfg.pytest_args)
        _say_guest(cfg, prep, g, out)
        res = _boot(g.cmd, g.nonce, cfg, out, t0)
    except (OSError, ValueError, ModuleError) as e:
        res = RunResult(SKIP, "setup", f"cannot prepare the guest: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _run_shards(cfg: RunConfig, prep: _Prepared, n: int, out: TextIO, tmp: Path, t0: float) -> RunResult:
    """N guests side by side, one thread each watching its console; this (the main) thread waits, and
    on an exception (SIGTERM/SIGHUP as SystemExit, Ctrl-C) kills every QEMU before unwinding."""
    files = shard_args(cfg.pytest_args, 1, n)[1]
    for _, path in files:
        for i in range(1, n + 1):  # a stale file of an earlier run must not be merged
            _shard_file(cfg, path, i).unlink(missing_ok=True)
    guests = []
    for i in range(1, n + 1):
        try:
            guests.append(_make_guest(cfg, prep, tmp / f"shard{i}", shard_args(cfg.pytest_args, i, n)[0]))
        except (OSError, ValueError, ModuleError) as e:
            return RunResult(SKIP, "setup", f"cannot prepare the guest of shard {i}/{n}: {e}")
    _say_guest(cfg, prep, guests[0], out, n)
    _say(out, f"{n} shards: guest I runs the pytest args with --shard I/{n} (its share of the collection, balanced "
              f"on the cases' measured durations, cases/durations.json); its console lines start with [I/{n}]")
    ctl = _Guests()
    lock = threading.Lock()
    results: list[RunResult | None] = [None] * n

    def shard(k: int) -> None:
        sout = _Prefixed(out, f"[{k + 1}/{n}] ", lock)
        try:
            results[k] = _boot(guests[k].cmd, guests[k].nonce, cfg, sout, t0, ctl)
        except Exception as e:  # QEMU could not be started: the run cannot cover the selection
            results[k] = RunResult(SKIP, "setup", f"QEMU did not start: {e}")
            ctl.abort()
        finally:
            sout.close()

    threads = [threading.Thread(target=shard, args=(k,), name=f"kernel-runner-shard-{k + 1}", daemon=True)
               for k in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException as e:
        ctl.abort()  # every QEMU of the run, by its pid
        for t in threads:
            t.join(20)
        # what the shards wrote so far is merged (each cut-short file says so), not left as PATH.shardI
        why = f"the run was interrupted ({type(e).__name__})"
        try:
            _merge_results(cfg, files, [r or RunResult(SKIP, "interrupted", why) for r in results], out)
        except Exception as me:  # the interruption goes on; the shard files stay for a look
            _say(out, f"could not merge the shards' result files after the interruption: {me!r}")
        raise
    done = [r if r is not None else RunResult(SKIP, "harness-died", "the shard's thread gave no result")
            for r in results]
    res = combine(done)
    _merge_results(cfg, files, done, out)
    return res


def _shard_file(cfg: RunConfig, path: str, i: int) -> Path:
    p = Path(path) if os.path.isabs(path) else Path(cfg.cwd) / path
    return p.with_name(f"{p.name}.shard{i}")


def _merge_results(cfg: RunConfig, files: list[tuple[str, str]], results: list[RunResult], out: TextIO) -> None:
    """PATH from the shards' PATH.shardI (then removed); without any shard file, only say so."""
    n = len(results)
    for kind, path in files:
        dest = Path(path) if os.path.isabs(path) else Path(cfg.cwd) / path
        parts_paths = [_shard_file(cfg, path, i) for i in range(1, n + 1)]
        if not any(p.exists() for p in parts_paths):
            _say(out, f"no shard wrote {path}.shardI: nothing to merge (the guest writes only under the "
                      f"results folder, RunConfig.outdir{': ' + str(cfg.outdir) if cfg.outdir else ', none given'})")
            continue
        parts = merge.read_parts(parts_paths, [f"shard {i}/{n}" for i in range(1, n + 1)],
                                 [f"{r.outcome}: {r.reason}" for r in results])
        try:
            merge.write_atomically(dest, merge.merge_ktap(parts) if kind == "ktap" else merge.merge_junit(parts))
        except Exception as e:  # the verdict stands; the shard files stay for a look
            _say(out, f"could not merge {kind} into {dest}: {e!r}; the shard files stay")
            continue
        for p in parts_paths:
            p.unlink(missing_ok=True)
        _say(out, f"merged {kind} of {sum(1 for p in parts if p.text is not None)}/{n} shards into {dest}")


class _Prefixed:
    """A shard's console for the shared output: whole lines, each with the shard's prefix, written
    under one lock so lines of different shards never mix."""

    def __init__(self, out: TextIO, prefix: str, lock: threading.Lock) -> None:
        self.out, self.prefix, self.lock = out, prefix, lock
        self._buf = ""

    def write(self, s: str) -> int:
        *lines, self._buf = (self._buf + s).split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.prefix}{ln}\n" for ln in lines))
                self.out.flush()
        return len(s)

    def flush(self) -> None:
        pass  # whole lines only: a partial one waits for its end (or close)

    def close(self) -> None:
        if self._buf:
            self.write("\n")


class _Guests:
    """The QEMU processes of a run: started only while the run goes on, all killed by abort()."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str]) -> subprocess.Popen | None:
        with self._lock:
            if self.stop.is_set():
                return None
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=_die_with_parent)
            self._procs.append(p)
            return p

    def abort(self) -> None:
        """Stop the run: no QEMU starts any more, every one running is killed by its pid (the threads
        watching them see `stop`, reap them and return)."""
        with self._lock:
            self.stop.set()
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.kill()


def _boot(cmd: list[str], nonce: str, cfg: RunConfig, out: TextIO, t0: float,
          guests: _Guests | None = None) -> RunResult:
    tail: collections.deque[str] = collections.deque(maxlen=cfg.tail_lines)
    stderr_tail: collections.deque[str] = collections.deque(maxlen=cfg.tail_lines)
    progress = GuestProgress()
    boot_s: float | None = None
    timed_out = stopped = False
    shard_cases: tuple[int, int] | None = None
    q: queue.Queue = queue.Queue()
    guests = guests or _Guests()
    proc = guests.start(cmd)
    if proc is None:
        return RunResult(SKIP, "stopped", "not started: the run was stopped", total_seconds=time.monotonic() - t0)
    try:
        threads = [threading.Thread(target=_reader, args=(s, n, q), daemon=True)
                   for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]
        for t in threads:
            t.start()
        partial = {"out": "", "err": ""}
        open_streams = 2
        start = time.monotonic()
        done_at: float | None = None
        last_word = ""
        while open_streams:
            now = time.monotonic()
            if done_at is None and (progress.result is not None or progress.exit_rc is not None):
                done_at = now  # the answer is in: give the guest a moment to power off, then stop
            if done_at is not None and now - done_at > cfg.grace:
                break
            if guests.stop.is_set():  # the run is stopping (interrupted, or another shard could not start)
                stopped = True
                break
            if done_at is None and not progress.booted and now - start > cfg.boot_timeout:
                timed_out = True
                break
            if done_at is None and now - start > cfg.timeout:
                timed_out = True
                break
            try:
                name, chunk = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if not chunk:
                open_streams -= 1
                continue
            text = chunk.decode(errors="replace")
            if name == "out":
                out.write(text.replace("\r", ""))
                out.flush()
            lines = (partial[name] + text).split("\n")
            partial[name] = lines.pop()
            for line in lines:
                line = line.rstrip("\r")
                (tail if name == "out" else stderr_tail).append(line)
                if name != "out":
                    continue
                s = parse_sentinel(line, nonce)
                if s is None:
                    if line.startswith(("bisect:", "kernel-runner(guest):")):
                        last_word = line  # the guest's own summary, for the closing line
                    elif shard_cases is None and (m := _SHARD_LINE.search(line)):
                        shard_cases = int(m.group(3)), int(m.group(4))
                    continue
                kind, num = s
                if kind == "BOOTED" and not progress.booted:
                    progress.booted = True
                    boot_s = time.monotonic() - start
                    _say(out, f"guest reached /init {boot_s:.1f} s after QEMU started")
                elif kind == "RESULT":
                    progress.result = num
                    progress.why = last_word
                elif kind == "EXIT":
                    progress.exit_rc = num
        for name, rest in partial.items():
            if rest.strip():
                (tail if name == "out" else stderr_tail).append(rest.rstrip("\r"))
    finally:
        qemu_rc = _stop(proc)
    if stopped and progress.result is None:
        code, outcome, reason = SKIP, "stopped", "stopped with the run (interrupted, or another shard could not start)"
    else:
        code, outcome, reason = verdict(progress, qemu_rc=qemu_rc, timed_out=timed_out, boot_failure=cfg.boot_failure,
                                        crash=cfg.crash,
                                        killed=any("terminating on signal" in e for e in stderr_tail))
    return RunResult(code, outcome, reason, boot_s, time.monotonic() - t0, list(tail), "\n".join(stderr_tail),
                     shard_cases)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dlopen in a child forked beside threads


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it if we die without reaching our finally (SIGKILL, OOM).
    "We" is the thread that started it (PR_SET_PDEATHSIG follows the thread): a shard's thread stops
    its QEMU before it returns."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP (make or git bisect interrupted) become SystemExit, so the finally blocks kill
    QEMU and remove the temporary files; only in the main thread, where handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(proc: subprocess.Popen) -> int | None:
    """QEMU's exit status if it ended by itself, else kill it by its pid and reap it."""
    try:
        return proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    proc.kill()  # SIGKILL to this pid only
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for s in (proc.stdout, proc.stderr):
        if s:
            s.close()
    return None


def report(res: RunResult, out: TextIO) -> None:
    """The closing lines: the verdict, and for anything but a verdict the console's last lines."""
    word = {GOOD: "good", BAD: "bad", SKIP: "cannot test (skip)"}.get(res.code, "?")
    if res.outcome not in ("verdict",):
        _say(out, f"{res.outcome}: {res.reason}")
        if res.console_tail:
            _say(out, f"last {len(res.console_tail)} console lines:")
            for line in res.console_tail:
                out.write(f"  | {line}\n")
        elif res.outcome != "setup":
            _say(out, "the console stayed empty")
        if res.qemu_stderr.strip():
            _say(out, "QEMU stderr:")
            for line in res.qemu_stderr.splitlines():
                out.write(f"  ! {line}\n")
    for i, r in enumerate(res.shards, 1):
        cases = f", ran {r.shard_cases[0]} of {r.shard_cases[1]} cases" if r.shard_cases else ""
        boot_i = f", boot {r.boot_seconds:.1f} s" if r.boot_seconds is not None else ""
        _say(out, f"shard {i}/{len(res.shards)}: {r.outcome}, exit {r.code}{cases}{boot_i}, "
                  f"{r.total_seconds:.1f} s")
    boot = f"boot {res.boot_seconds:.1f} s, " if res.boot_seconds is not None else ""
    _say(out, f"{res.reason} -> {word}, exit {res.code} ({boot}total {res.total_seconds:.1f} s)")
    out.flush()
