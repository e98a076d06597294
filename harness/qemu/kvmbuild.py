"""KVM modules rebuilt from source for a packaged Debian kernel: `debian:7.3.4+KVM_SW_PROTECTED_VM=y`.

    python -m harness kernel build-kvm debian:7.3.4 --config KVM_SW_PROTECTED_VM=y [--config KVM_PROVE_MMU=y]
    python -m harness kernel --kernel debian:7.3.4+KVM_SW_PROTECTED_VM=y -- cases/...   (built on first use)

kvm.ko, kvm-amd.ko and kvm-intel.ko are compiled out of tree from Debian's `linux-source-X.Y` at
exactly the kernel's package version, against its `linux-headers-*`/`linux-kbuild-*` packages, by
the compiler named in the kernel's CONFIG_CC_VERSION_TEXT, inside a `debootstrap --variant=minbase`
chroot of the Debian suite that ships that compiler. The runner then boots the packaged vmlinuz
with a composed modules tree: the built kvm*.ko, every other module a symlink to the packaged one.

Here: names, the cache and the steps in order; kvmcompile.py compiles (compiler, suite, packages,
Makefile, make, the composed tree), kvmsource.py gets the sources, kconfig.py checks the options,
buildenv.py holds the log, the locks and the chroot.

Steps (each is skipped when done before; the shared ones are shared between builds):

    kernel    the packaged kernel, fetched as `kernel fetch` does (.cache/kernels/)
    sources   linux-source-X.Y: arch/x86/kvm, virt/kvm + an index of CONFIG_ uses (kvmsource.py)
    validate  the options against the KVM Kconfig, the packaged config and the index (kconfig.py)
    chroot    debootstrap of the compiler's suite (.cache/chroots/<suite>)
    packages  gcc-N, make, the headers/kbuild debs of this kernel, installed in the chroot
    build     make M=... modules (resumes an interrupted build), strip, vermagic checked
    compose   .cache/kvm-builds/<key>/modules/: vmlinuz, config (with the options), the modules tree

The cache key is the package version plus the sorted options: `7.3.4-1~bpo13+1+KVM_SW_PROTECTED_VM=y`,
so `debian:7.3+...` and `debian:7.3.4+...` share one build. A lock per key (and per chroot) makes
concurrent builds take turns. Each build logs to <key>/build.log; a failure names its step, the log's
last lines and the log's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.qemu import debian, kconfig, kvmcompile
from harness.qemu.buildenv import BuildStepError, Chroot, KvmBuildError, Lock, StepLog, safe_rmtree, timed
from harness.qemu.kvmsource import Sources

ROOT = Path(os.environ.get("KVM_HARNESS_KVM_BUILDS") or debian.REPO / ".cache" / "kvm-builds")
CHROOTS = Path(os.environ.get("KVM_HARNESS_CHROOTS") or debian.REPO / ".cache" / "chroots")
STEPS = ("kernel", "sources", "validate", "chroot", "packages", "build", "compose")
_PART_NAME = re.compile(r"(?:CONFIG_)?([A-Z][A-Z0-9_]*)")


# ---- names -------------------------------------------------------------------------------------------

def is_rebuild(name: str) -> bool:
    """`debian:VER+NAME=VALUE...` names a packaged kernel with KVM rebuilt."""
    return name.startswith("debian:") and "=" in name


def parse_option(text: str) -> tuple[str, str]:
    """`KVM_SW_PROTECTED_VM=y` or `CONFIG_KVM_SW_PROTECTED_VM=y` -> ("KVM_SW_PROTECTED_VM", "y")."""
    name, sep, value = text.strip().partition("=")
    m = _PART_NAME.fullmatch(name)
    if not sep or not m or not value or any(c in value for c in " +,"):
        raise KvmBuildError(f"{text!r}: a KVM option is NAME=VALUE in capitals, e.g. KVM_SW_PROTECTED_VM=y")
    return m.group(1), value


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """`debian:7.3.4+KVM_SW_PROTECTED_VM=y+KVM_PROVE_MMU=y` -> ("debian:7.3.4", {options}); the base may
    carry a `+` of its own (`debian:7.2.6+deb13+KVM_PROVE_MMU=y`): options are the parts with `=`."""
    if not name.startswith("debian:"):
        raise KvmBuildError(f"{name!r}: only Debian's packaged kernels are rebuilt (debian:VER+NAME=VALUE)")
    base: list[str] = []
    opts: dict[str, str] = {}
    for part in name[len("debian:"):].split("+"):
        if "=" in part:
            k, v = parse_option(part)
            if opts.get(k, v) != v:
                raise KvmBuildError(f"{name!r}: {k} given twice ({opts[k]} and {v})")
            opts[k] = v
        elif not part:
            raise KvmBuildError(f"{name!r}: an empty part between '+' signs")
        elif opts:
            raise KvmBuildError(f"{name!r}: {part!r} after the options: the kernel's version comes first, "
                                "then +NAME=VALUE for each option")
        elif _PART_NAME.fullmatch(part) and part.upper() == part and "_" in part:
            raise KvmBuildError(f"{name!r}: {part} needs a value ({part}=y)")
        else:
            base.append(part)
    if not base:
        raise KvmBuildError(f"{name!r}: no kernel version before the options (debian:7.3.4+{'+'.join(opts)})")
    return "debian:" + "+".join(base), opts


def rebuild_name(base: str, options: dict[str, str]) -> str:
    """The canonical name: the base as given, the options sorted."""
    return "+".join([base, *(f"{k}={v}" for k, v in sorted(options.items()))])


def cache_key(version: str, options: dict[str, str]) -> str:
    """The cache's folder name: the package version and the sorted options (order-independent)."""
    if not options:
        raise KvmBuildError("a KVM rebuild needs at least one option (--config NAME=VALUE)")
    return "+".join([version, *(f"{k}={v}" for k, v in sorted(options.items()))])


# ---- the build ----------------------------------------------------------------------------------------

@dataclass
class Built:
    name: str  # debian:7.3.4+KVM_SW_PROTECTED_VM=y
    key: str
    dir: Path
    vmlinuz: Path  # dir/modules/vmlinuz -> the packaged one
    modules: Path  # dir/modules: what the runner scans
    hit: bool = False
    meta: dict = field(default_factory=dict)


def _hit(d: Path) -> dict | None:
    try:
        meta = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    ok = all((d / "ko" / f).is_file() for f in meta.get("modules", {})) and (d / "modules" / "vmlinuz").exists()
    return meta if ok and meta.get("modules") else None


def _exact(base: str, opts: dict[str, str]) -> tuple[Path, dict] | None:
    """A finished build of exactly this version (debian:7.3.4, debian:7.3.4+deb13) and options whose
    packaged kernel is still there; a prefix like debian:7.3 needs the package lists to resolve."""
    for meta_path in ROOT.glob("*/build.json"):
        try:
            meta = json.loads(meta_path.read_text())
            names = (meta["kernel"]["name"], "debian:" + meta["kernel"]["abi"].removesuffix("-amd64"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if meta.get("options") == opts and base in names and _hit(meta_path.parent) is not None:
            return meta_path.parent, meta
    return None


def ensure(name: str, say: Callable[[str], None] = print, **kw) -> Built:
    """The rebuilt kernel `debian:VER+NAME=VALUE...`, built first unless cached."""
    return build(name, say=say, **kw)


def build(name: str, options: dict[str, str] | None = None, *, jobs: int = 2, rebuild: bool = False,
          say: Callable[[str], None] = print, archive: debian.Archive | None = None) -> Built:
    t0 = time.monotonic()
    base, opts = parse_name(name) if "=" in name else (name, {})
    for k, v in (options or {}).items():
        if opts.get(k, v) != v:
            raise KvmBuildError(f"{k} given twice ({opts[k]} and {v})")
        opts[k] = v
    if not opts:
        raise KvmBuildError(f"{name}: a KVM rebuild needs at least one option (--config NAME=VALUE, or "
                            f"{name}+NAME=VALUE)")
    if not rebuild and (known := _exact(base, opts)) is not None:
        # an exact version already built, its packaged kernel still unpacked: no apt at all (resolve()
        # would refresh package lists older than six hours first)
        d, meta = known
        a = archive or debian.Archive()
        used = a.cache / "debian" / meta["kernel"]["abi"] / "fetched.json"
        if used.exists():
            used.touch()  # the kernel cache's LRU: used now
        canonical = rebuild_name(base, opts)
        say(f"kvm-build: {canonical}: cached in {d} ({time.monotonic() - t0:.2f} s)")
        return Built(canonical, d.name, d, d / "modules" / "vmlinuz", d / "modules", True, meta)
    a = archive or debian.Archive()
    k = a.resolve(base)
    key = cache_key(k.version, opts)
    canonical, d = rebuild_name(base, opts), ROOT / key
    if not rebuild and (meta := _hit(d)) is not None:
        a.fetch(k, log=say)  # the packaged kernel the tree points into (the kernel cache may have pruned it)
        say(f"kvm-build: {canonical}: cached in {d} ({time.monotonic() - t0:.2f} s)")
        return Built(canonical, key, d, d / "modules" / "vmlinuz", d / "modules", True, meta)
    with Lock(ROOT / "locks" / f"{key}.lock", f"the build of {canonical}", say):
        if not rebuild and (meta := _hit(d)) is not None:  # built meanwhile by whoever held the lock
            a.fetch(k, log=say)
            say(f"kvm-build: {canonical}: built meanwhile by another process, cached in {d}")
            return Built(canonical, key, d, d / "modules" / "vmlinuz", d / "modules", True, meta)
        (d / "build.json").unlink(missing_ok=True)
        for stale in ("ko", "modules"):
            safe_rmtree(d / stale)
        log = StepLog(d / "build.log", say)
        times: dict[str, float] = {}
        try:
            meta = _build(a, k, opts, canonical, key, d, jobs, log, times)
        except kconfig.ConfigError:
            log.close()
            shutil.rmtree(d, ignore_errors=True)  # a refusal leaves nothing behind: its message says it all
            raise
        finally:
            total = time.monotonic() - t0
            line = ", ".join(f"{s} {times[s]:.1f} s" for s in STEPS if s in times)
            if not log.closed:
                log.write(f"==== times: {line}; total {total:.1f} s")
                say(f"kvm-build: times: {line}; total {total:.1f} s")
                log.close()
        meta["times"] = {**{s: round(times[s], 1) for s in times}, "total": round(total, 1)}
        (d / "build.json").write_text(json.dumps(meta, indent=1))
        say(f"kvm-build: {canonical}: ready: {d / 'modules'}")
        return Built(canonical, key, d, d / "modules" / "vmlinuz", d / "modules", False, meta)


def _build(a: debian.Archive, k: debian.Kernel, opts: dict[str, str], canonical: str, key: str, d: Path,
           jobs: int, log: StepLog, times: dict[str, float]) -> dict:
    log.progress(f"{canonical}: kvm.ko, kvm-amd.ko, kvm-intel.ko of {k.name} ({k.abi}, {k.version}) with "
                 + " ".join(f"{n}={v}" for n, v in sorted(opts.items())) + f"; log {log.path}")
    with timed(times, "kernel"):
        log.progress(f"[1/7] kernel: {k.name}")
        f = a.fetch(k, log=log.progress)
        if f.config is None:
            raise log.fail("kernel", f"{k.name}: no config beside {f.vmlinuz}: cannot tell its compiler or options")
        config_text = f.config.read_text(errors="replace")
        try:
            comp = kvmcompile.compiler(config_text)
        except KvmBuildError as e:
            raise log.fail("kernel", str(e)) from None
    src = Sources(ROOT, k)
    with timed(times, "sources"), Lock(ROOT / "locks" / f"sources-{k.version}.lock", f"the sources of {k.name}",
                                       log.say):
        log.progress(f"[2/7] sources: {src.package} {k.version} -> {src.tree}")
        if not src.fetch(a, log):
            log.progress("sources: done before")
    with timed(times, "validate"):
        log.progress("[3/7] validate: against arch/x86/kvm/Kconfig, virt/kvm/Kconfig and the packaged config")
        checked = kconfig.validate(opts, src.symbols(), kconfig.parse_config(config_text), src.refs())
        for note in checked.notes:
            log.progress(f"note: {note}")
    with timed(times, "chroot"):
        try:
            suite, why = kvmcompile.choose_suite(a, comp, k)
        except KvmBuildError as e:
            raise log.fail("chroot", str(e)) from None
    ch = Chroot(CHROOTS / suite, suite)
    with Lock(ch.lock_path, f"the {suite} chroot", log.say):
        with timed(times, "chroot"):
            log.progress(f"[4/7] chroot: {ch.root} (debootstrap --variant=minbase {suite}: {why})")
            if not ch.create(a.mirror(), log):
                log.progress("chroot: done before")
        with timed(times, "packages"):
            log.progress(f"[5/7] packages: {comp.package}, make, linux-headers-{k.abi} and its kbuild, in the chroot")
            cc_text = kvmcompile.install_packages(a, ch, k, comp, log)
    with timed(times, "build"):
        log.progress(f"[6/7] build: make -j{jobs} M=arch/x86/kvm CC={comp.cc} modules")
        kos, vermagic = kvmcompile.compile_modules(ch, src, k, comp, opts, key, d, jobs, log, f.modules)
    with timed(times, "compose"):
        log.progress(f"[7/7] compose: {d / 'modules'}")
        kvmcompile.compose_tree(f.modules, f.vmlinuz, kconfig.with_options(config_text, opts), kos, d / "modules")
    return {"name": rebuild_name(k.name, opts), "key": key,  # the exact version: debian:7.3 moves on
            "kernel": {"name": k.name, "abi": k.abi, "version": k.version},
            "options": opts, "suite": suite, "compiler": comp.text, "compiler_in_chroot": cc_text,
            "vermagic": vermagic, "notes": checked.notes, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "modules": {p.name: p.stat().st_size for p in kos.values()}}


# ---- the cache ------------------------------------------------------------------------------------------

def cached() -> list[dict]:
    """Every finished build: name, key, dir, bytes, built, times."""
    out = []
    for meta_path in sorted(ROOT.glob("*/build.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        meta["dir"] = str(meta_path.parent)
        meta["bytes"] = debian._size(meta_path.parent)
        out.append(meta)
    return out


def shared_dirs() -> list[tuple[str, Path, int]]:
    """(what, dir, bytes) of the shared steps' caches: chroots and unpacked sources."""
    out = [(f"chroot {p.name}", p, debian._size(p)) for p in sorted(CHROOTS.glob("*")) if p.is_dir()]
    out += [(f"sources {p.name}", p, debian._size(p)) for p in sorted((ROOT / "sources").glob("*")) if p.is_dir()]
    return out


__all__ = ["BuildStepError", "Built", "KvmBuildError", "build", "cache_key", "cached", "ensure", "is_rebuild",
           "parse_name", "parse_option", "rebuild_name", "shared_dirs"]
