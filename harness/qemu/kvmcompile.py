"""The compiling half of kvmbuild.py: which compiler and Debian suite, the chroot's packages, the
rewritten KVM Makefile, `make M=... modules`, and the modules tree the runner is given.

- `compiler()` reads CONFIG_CC_VERSION_TEXT; `choose_suite()` finds the suite that ships exactly that
  gcc (`apt-cache madison` over the private apt of debian.py), which the chroot is made of.
- `install_packages()` downloads the kernel's linux-headers-*, linux-headers-*-common,
  linux-kbuild-* (and linux-base-*) debs with that private apt and installs them in the chroot with
  the chroot's own apt, which brings gcc-N, make, pahole and the libraries kbuild's tools need.
  Per version: 6.x headers depend on linux-image-VER itself (7.x on linux-base-VER), for which an
  empty placeholder package stands in (`image_dependencies()`, `placeholder_deb()`); the chroot's
  apt checks Release dates as the host's does (`host_apt_freshness()`: an unstable chroot from a
  frozen mirror), and an expired Release file is named as the reason when it does (`expired_release()`).
- `rewrite_makefile()` + `compile_modules()`: the KVM sources copied into the chroot, built out of
  tree against /usr/src/linux-headers-VER, stripped (--strip-debug: they travel uncompressed in the
  initramfs), their vermagic checked against the packaged kvm.ko.
- `compose_tree()`: the packaged modules dir as symlinks with the built kvm*.ko in place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.qemu import debian
from harness.qemu.buildenv import BuildStepError, Chroot, KvmBuildError, StepLog, safe_rmtree
from harness.qemu.kvmsource import Sources
from harness.qemu.modules import SUFFIXES, ModuleError, modinfo, modname, read_ko

KO_FILES = {"kvm": "kvm.ko", "kvm_amd": "kvm-amd.ko", "kvm_intel": "kvm-intel.ko"}


@dataclass(frozen=True)
class Compiler:
    cc: str  # x86_64-linux-gnu-gcc-14: the CC make gets, so the version text matches the kernel's
    package: str  # gcc-14
    version: str  # 14.2.0-19 (Debian's), "" when the text has none
    text: str  # CONFIG_CC_VERSION_TEXT as is


def compiler(config_text: str) -> Compiler:
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="(.*)"$', config_text, re.M)
    if not m:
        raise KvmBuildError("the kernel's config has no CONFIG_CC_VERSION_TEXT: cannot tell its compiler")
    text = m.group(1)
    g = re.match(r"(\S*gcc(?:-(\d+))?)\s+\((?:Debian|Ubuntu)\s+([^)]+)\)\s+(\d+)", text)
    if not g:
        raise KvmBuildError(f"the kernel was built by {text!r}: only Debian's gcc is supported here")
    cc, major, deb, upstream_major = g.groups()
    return Compiler(cc, f"gcc-{major or upstream_major.split('.')[0]}", deb, text)


def base_suite(suite: str) -> str:
    """A suite debootstrap can make: trixie for trixie-backports, unstable for experimental."""
    return "unstable" if suite == "experimental" else suite.removesuffix("-backports")


def madison(archive: debian.Archive, package: str) -> list[tuple[str, str]]:
    """(version, suite) of a package in the private apt's suites."""
    out = []
    for line in archive._apt("apt-cache", "madison", package, check=False).splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) == 3 and cols[0] == package:
            where = cols[2].split()
            if len(where) >= 2:
                out.append((cols[1], where[1].split("/")[0]))
    return out


def choose_suite(archive: debian.Archive, comp: Compiler, k: debian.Kernel) -> tuple[str, str]:
    """(suite, why): the suite with exactly the kernel's compiler, else the kernel's own."""
    for ver, suite in madison(archive, comp.package):
        if ver == comp.version:
            return base_suite(suite), f"{comp.package} {ver} is in {suite}"
    for ver, suite in madison(archive, k.package):
        if ver == k.version:
            return base_suite(suite), (f"no suite has {comp.package} {comp.version} any more; the kernel's own "
                                       f"suite {suite} (its {comp.package} may differ)")
    raise KvmBuildError(f"no suite offers {comp.package} {comp.version} or {k.package} {k.version}")


# ---- the build tree ---------------------------------------------------------------------------------

def rewrite_makefile(text: str, options: dict[str, str], *, x86: str, virt: str, trace_include: str) -> str:
    """arch/x86/kvm/Makefile for an out-of-tree build: $(srctree)'s KVM dirs (absent from the headers
    package) become the copies, and each option reaches both the Makefile's own logic
    (`kvm-$(CONFIG_X)`) and the C and asm sources (#ifdef, IS_ENABLED: CONFIG_X defined as 1).
    trace.h includes itself as `../../arch/x86/kvm/trace.h` through TRACE_INCLUDE_PATH: the extra
    include dir sits two levels below the tree's root so that path lands on the copy."""
    if "$(srctree)/virt/kvm/Makefile.kvm" not in text:
        raise KvmBuildError("arch/x86/kvm/Makefile does not include $(srctree)/virt/kvm/Makefile.kvm: a layout "
                            "this rebuild does not know")
    body = text.replace("$(srctree)/arch/x86/kvm", "$(KH_X86_KVM)").replace("$(srctree)/virt/kvm", "$(KH_VIRT_KVM)")
    head = ["# kvm-harness (harness/qemu/kvmbuild.py): KVM built out of tree against the packaged headers with "
            + " ".join(f"CONFIG_{k}={v}" for k, v in sorted(options.items())),
            f"KH_X86_KVM := {x86}", f"KH_VIRT_KVM := {virt}", f"ccflags-y += -I{trace_include}"]
    for name, value in sorted(options.items()):
        if value == "n":
            head.append(f"CONFIG_{name} :=")
            continue
        define = "1" if value in ("y", "m") else value if re.fullmatch(r"-?\d+|0x[0-9a-fA-F]+", value) \
            else "'\"" + value.strip('"') + "\"'"
        head += [f"CONFIG_{name} := {value}", f"ccflags-y += -DCONFIG_{name}={define}",
                 f"asflags-y += -DCONFIG_{name}={define}"]
    return "\n".join(head) + "\n\n" + body


def compose_tree(packaged: Path, vmlinuz: Path, config_text: str, built: dict[str, Path], dest: Path) -> Path:
    """dest/: the packaged modules dir as relative symlinks, except the modules in `built` (name ->
    .ko), which link to the built files at the packaged ones' place; plus vmlinuz (a symlink) and
    config (written), where the runner looks beside the image."""
    tmp = dest.with_name(dest.name + ".new")
    safe_rmtree(tmp)
    tmp.mkdir(parents=True)
    where: dict[str, str] = {}
    for dirpath, dirnames, files in os.walk(packaged):
        dirnames.sort()
        rel = os.path.relpath(dirpath, packaged)
        for f in sorted(files):
            if f.endswith(SUFFIXES) and modname(f) in built:
                where.setdefault(modname(f), rel)
                continue
            if rel == "." and f in ("vmlinuz", "config"):
                continue
            d = tmp / rel
            d.mkdir(parents=True, exist_ok=True)
            # relative to dest, which is tmp's sibling: the same path from either
            (d / f).symlink_to(os.path.relpath(os.path.join(dirpath, f), dest / rel))
    for name, ko in built.items():
        rel = where.get(name, "kernel/arch/x86/kvm")
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        (tmp / rel / ko.name).symlink_to(os.path.relpath(ko, dest / rel))
    (tmp / "vmlinuz").symlink_to(os.path.relpath(vmlinuz, dest))
    (tmp / "config").write_text(config_text)
    safe_rmtree(dest)
    tmp.rename(dest)
    return dest


def install_packages(a: debian.Archive, ch: Chroot, k: debian.Kernel, comp: Compiler, log: StepLog) -> str:
    """Install the compiler, make and this kernel's headers in the chroot (once per kernel version);
    the compiler's version line, which is checked against the kernel's."""
    marker = ch.path(f"/kh/installed/{k.version}")
    cc = ch.path(f"/usr/bin/{comp.cc}")
    if not (marker.exists() and cc.exists()):
        headers = f"linux-headers-{k.abi}"
        info = a._apt("apt-cache", "show", f"{headers}={k.version}", check=False)
        deps = re.search(r"^Depends:\s*(.+)$", info, re.M)
        if not deps:
            raise log.fail("packages", f"the archive has no {headers}={k.version}")
        names = [headers, *dict.fromkeys(re.findall(r"\b(linux-(?:headers|kbuild|base)-[^\s,(|]+)", deps.group(1)))]
        inside = f"/kh/debs/{k.version}"
        debs = ch.path(inside)
        debs.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not list(debs.glob(f"{n}_*.deb")):
                try:
                    a._apt("apt-get", "download", f"{n}={k.version}", timeout=1200, cwd=debs)
                except debian.KernelFetchError as e:
                    if n == headers:
                        raise log.fail("packages", str(e)) from None
                    log.write(f"==== {n}={k.version} not downloadable; apt in the chroot resolves it: {e}")
        for image, version in image_dependencies(deps.group(1), k.version):
            # 6.x headers depend on the kernel image itself (7.x: on linux-base-VER); the image is not
            # needed to build modules, and installing it brings initramfs-tools, systemd and udev
            # (+300 MiB per version) and runs update-initramfs in the chroot
            p = placeholder_deb(image, version, debs, log)
            log.write(f"==== {image}={version}: a placeholder package stands in for the image ({p.name})")
        files = sorted(f"{inside}/{p.name}" for p in debs.glob("*.deb"))
        log.write(f"==== to install: {' '.join(files)}")
        fresh = host_apt_freshness()
        if fresh:
            log.write(f"==== the host's apt does not check Release dates ({' '.join(fresh)}); nor does the chroot's")
        try:
            ch.run("packages", ["apt-get", *fresh, "-q", "update"], log, timeout=900)
        except BuildStepError as e:
            why = expired_release(log.tail(200))
            if why is None:
                raise
            raise log.fail("packages", f"{why}: {a.mirror()} serves an out-of-date {ch.suite} (a frozen "
                                       "mirror or snapshot), and this machine's apt checks Release dates "
                                       "(Acquire::Check-Valid-Until); the chroot's apt follows the host's setting, "
                                       "so set Acquire::Check-Valid-Until \"false\" in /etc/apt/apt.conf.d or use "
                                       "a current mirror (KVM_HARNESS_DEBIAN_MIRROR)") from e
        ch.run("packages", ["apt-get", *fresh, "-q", "install", "-y", "--no-install-recommends", "make",
                            comp.package, "binutils", *files], log, timeout=1800)
        ch.run("packages", ["apt-get", "clean"], log, timeout=300)
        if not cc.exists():
            raise log.fail("packages", f"{comp.cc} is not in the chroot after installing {comp.package}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("\n".join(names) + "\n")
        shutil.rmtree(debs, ignore_errors=True)
    else:
        log.progress("packages: done before")
    have = ch.output([comp.cc, "--version"]).split("\n", 1)[0].strip()
    if have != comp.text:
        log.progress(f"warning: the chroot's compiler says {have!r}; the kernel was built by {comp.text!r}")
    return have


def image_dependencies(depends: str, version: str) -> list[tuple[str, str]]:
    """(package, version) of each linux-image-* that a headers package's Depends names first in an
    alternative group: `linux-image-6.12.117+deb13-amd64 (= 6.12.117-1) | linux-image-...-unsigned (= ...)`
    -> [("linux-image-6.12.117+deb13-amd64", "6.12.117-1")]; an unversioned one gets `version`."""
    out = []
    for group in depends.split(","):
        first = group.split("|")[0].strip()
        m = re.fullmatch(r"(linux-image-[^\s(]+)(?:\s*\(\s*(=|>=)\s*([^)\s]+)\s*\))?", first)
        if m:
            out.append((m.group(1), m.group(3) or version))
    return out


def placeholder_deb(package: str, version: str, dest: Path, log: StepLog) -> Path:
    """An empty .deb named `package` at `version` (dpkg-deb --build), which satisfies a dependency on
    it without its files."""
    work = dest / f".placeholder-{package}"
    safe_rmtree(work)
    (work / "DEBIAN").mkdir(parents=True)
    (work / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: amd64\nMaintainer: kvm-harness <nobody@invalid>\n"
        "Section: kernel\nPriority: optional\nDescription: kvm-harness placeholder (no files)\n"
        " Satisfies linux-headers' dependency on the kernel image in a chroot that only builds modules.\n")
    out = dest / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    log.run("packages", ["dpkg-deb", "--root-owner-group", "--build", str(work), str(out)], timeout=120)
    safe_rmtree(work)
    return out


def host_apt_freshness(dump: str | None = None) -> list[str]:
    """The host's apt settings that turn off Release date checks (Acquire::Check-Valid-Until,
    Acquire::Check-Date), as `-o` options for the chroot's apt. The private apt that chose the
    packages reads the host's apt.conf.d, so it accepted Release files the chroot's apt, left to its
    defaults, would refuse as expired when the archive is a frozen mirror (unstable's Release is valid
    for a week). Only what the host sets is passed on; signatures are still checked."""
    if dump is None:
        try:
            dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
    out = []
    for key in ("Acquire::Check-Valid-Until", "Acquire::Check-Date"):
        m = re.search(rf'^{re.escape(key)} "([^"]*)";$', dump, re.M | re.I)
        if m and m.group(1).lower() in ("false", "no", "0", "off"):
            out += ["-o", f"{key}=false"]
    return out


def expired_release(lines: list[str]) -> str | None:
    """apt's complaint about an expired Release file in a log tail, e.g. "the Release file
    http://deb.debian.org/debian/dists/unstable/InRelease expired 29d 0h 1min 54s ago"; None if none."""
    for ln in reversed(lines):
        m = re.search(r"Release file for (\S+) is expired \(invalid since ([^)]+)\)", ln)
        if m:
            return f"the Release file {m.group(1)} expired {m.group(2).removeprefix('invalid since ')} ago"
    return None


def compile_modules(ch: Chroot, src: Sources, k: debian.Kernel, comp: Compiler, opts: dict[str, str], key: str, d: Path,
             jobs: int, log: StepLog, packaged: Path) -> tuple[dict[str, Path], str]:
    inside = f"/kh/build/{hashlib.sha1(key.encode()).hexdigest()[:12]}"  # no '=', '+' or '~' in make's paths
    bdir = ch.path(inside)
    makefile = rewrite_makefile((src.tree / "arch/x86/kvm/Makefile").read_text(), opts, x86=f"{inside}/arch/x86/kvm",
                                virt=f"{inside}/virt/kvm", trace_include=f"{inside}/kh-include/trace")
    mk = bdir / "arch/x86/kvm/Makefile"
    if mk.exists() and mk.read_text() == makefile:
        log.progress(f"build: resuming the build in {bdir}")
    else:
        safe_rmtree(bdir)
        shutil.copytree(src.tree, bdir, symlinks=True)
        mk.write_text(makefile)
        (bdir / "kh-include/trace").mkdir(parents=True)
    headers = f"/usr/src/linux-headers-{k.abi}"
    if not ch.path(headers).is_dir():
        raise log.fail("build", f"{headers} is not in the chroot (the packages step did not install it)")
    ch.run("build", ["make", "-C", headers, f"M={inside}/arch/x86/kvm", f"CC={comp.cc}", f"-j{max(1, jobs)}",
                     "modules"], log, timeout=3600)
    out = {n: bdir / "arch/x86/kvm" / f for n, f in KO_FILES.items()}
    missing = [p.name for p in out.values() if not p.is_file()]
    if missing:
        raise log.fail("build", f"make succeeded but did not make {', '.join(missing)}")
    ch.run("build", ["strip", "--strip-debug", *(f"{inside}/arch/x86/kvm/{f}" for f in KO_FILES.values())], log,
           timeout=300)
    dest = d / "ko"
    dest.mkdir(parents=True, exist_ok=True)
    vermagic = ""
    for name, p in out.items():
        try:
            vermagic = modinfo(read_ko(p)).get("vermagic", [""])[0]
        except ModuleError as e:
            raise log.fail("build", f"{p.name}: {e}") from None
        shutil.copy2(p, dest / p.name)
        log.write(f"==== {name}: {p.stat().st_size >> 10} KiB, vermagic {vermagic!r}")
    want = _vermagic_of(packaged)
    if want and vermagic != want:
        raise log.fail("build", f"vermagic {vermagic!r} differs from the packaged modules' {want!r}: the kernel "
                                "would refuse them")
    safe_rmtree(bdir)  # objects and unstripped modules: hundreds of MiB; the stripped .ko are kept
    return {n: dest / p.name for n, p in out.items()}, vermagic


def _vermagic_of(modules: Path) -> str:
    """The packaged kvm module's vermagic (the built ones must carry the same to load)."""
    for p in modules.rglob("kvm.ko*"):
        try:
            return modinfo(read_ko(p)).get("vermagic", [""])[0]
        except ModuleError:
            return ""
    return ""
