"""Debian's packaged kernels by name: list what the archive offers, fetch and unpack one into the cache.

apt runs with a private configuration under `.cache/kernels/apt/` (its own sources, lists and
package cache; never the machine's own state), over the suites that carry kernels: bookworm
(6.1), bookworm-backports and trixie (6.12), trixie-backports (6.16 .. 7.3), unstable and
experimental (release candidates). The archive's address is the machine's own: taken from its apt
sources (the entry that serves bookworm), so a local mirror keeps working.

Names (`resolve`):

    debian:7.3.4          the package whose upstream version is 7.3.4
    debian:6.12           the newest 6.12.x
    debian:latest         the newest release (release candidates only when asked by name)
    debian:7.2.6+deb13    an exact ABI name (linux-image-7.2.6+deb13-amd64)
    debian:7.3-rc7        a release candidate

6.x kernels are one package (boot/vmlinuz-VER, lib/modules/VER); newer ones split `linux-image-VER`
into a meta package over `linux-binary-VER` (vmlinuz under usr/lib/modules/VER/), `linux-modules-VER`
(.ko.xz) and `linux-base-VER` (config, System.map). All unpack to `.cache/kernels/debian/<abi>/root`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.kvm.errors import HarnessError

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KVM_HARNESS_KERNEL_CACHE") or REPO / ".cache" / "kernels")
SUITES = ("bookworm", "bookworm-backports", "trixie", "trixie-backports", "unstable", "experimental")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LIST_MAX_AGE = 6 * 3600  # seconds before `kernel list` refreshes the package lists
DEFAULT_CACHE_LIMIT = 12 << 30  # unpacked kernels kept, bytes; least recently used go first
_IMAGE = re.compile(r"^linux-image-(\d+\.\d+(?:\.\d+)?(?:-\d+)?(?:\+[a-z0-9.]+)?)-amd64$")


class KernelFetchError(HarnessError):
    """A kernel name that does not resolve, or apt / dpkg-deb that failed (the message says which)."""


@dataclass(frozen=True)
class Kernel:
    """One packaged kernel: `abi` names its files (7.3.4+deb13-amd64), `upstream` orders them."""

    abi: str  # 7.3.4+deb13-amd64, 6.1.0-50-amd64, 7.3-amd64
    package: str  # linux-image-<abi>
    version: str  # the package's version: 7.3.4-1~bpo13+1, 6.1.176-1, 7.3~rc7-1~exp1
    upstream: str  # 7.3.4, 6.1.176, 7.3-rc7
    parts: tuple[str, ...]  # packages to unpack: the image itself (6.x), or binary + modules + base (7.x)
    complete: bool = True  # every part that carries vmlinuz or modules is downloadable at this version

    @property
    def name(self) -> str:
        return f"debian:{self.upstream}"

    @property
    def key(self) -> tuple:
        """Sort key: upstream version, a release candidate before its release."""
        m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-rc(\d+))?", self.upstream)
        assert m, self.upstream
        major, minor, patch, rc = m.groups()
        return (int(major), int(minor), int(patch or 0), int(rc) if rc else 1 << 30)

    @property
    def is_rc(self) -> bool:
        return "-rc" in self.upstream


def upstream_of(version: str) -> str:
    """Package version -> upstream: 7.3.4-1~bpo13+1 -> 7.3.4; 7.3~rc7-1~exp1 -> 7.3-rc7."""
    up = version.split("-", 1)[0]
    return up.replace("~rc", "-rc")


@dataclass
class Fetched:
    """An unpacked kernel: what the runner needs."""

    kernel: Kernel
    root: Path
    vmlinuz: Path
    modules: Path
    config: Path | None

    def to_json(self) -> dict:
        d = {k: str(v) for k, v in asdict(self).items() if k != "kernel"}
        d["kernel"] = asdict(self.kernel)
        return d


class Archive:
    """Debian's archive through a private apt configuration under `cache/apt`."""

    def __init__(self, cache: Path = CACHE) -> None:
        self.cache = Path(cache)
        self.apt = self.cache / "apt"

    # ---- apt set-up ---------------------------------------------------------------------------
    def mirror(self) -> str:
        """The archive address the machine's own apt sources use for bookworm (or $KVM_HARNESS_DEBIAN_MIRROR)."""
        env = os.environ.get("KVM_HARNESS_DEBIAN_MIRROR")
        if env:
            return env
        for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
            try:
                text = f.read_text()
            except OSError:
                continue
            if f.suffix == ".sources":
                for stanza in re.split(r"\n\s*\n", text):
                    uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                    suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                    if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                        return uris.group(1)
            else:
                for line in text.splitlines():
                    m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
                    if m:
                        return m.group(1)
        raise KernelFetchError("no apt source for Debian bookworm on this machine to take the archive's address "
                               "from; set KVM_HARNESS_DEBIAN_MIRROR")

    def _opts(self) -> list[str]:
        a = self.apt
        return ["-o", "Dir::Etc::sourcelist=/dev/null", "-o", f"Dir::Etc::SourceParts={a / 'sources.list.d'}",
                "-o", f"Dir::State::Lists={a / 'lists'}", "-o", f"Dir::Cache={a / 'cache'}",
                "-o", "Dir::Etc::preferencesparts=/dev/null", "-o", "APT::Architecture=amd64",
                "-o", "Acquire::Languages=none", "-o", "APT::Sandbox::User=root", "-q"]

    def _setup(self) -> None:
        if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
            raise KernelFetchError("no apt-get/dpkg-deb on this machine: Debian's kernels cannot be fetched")
        for d in ("sources.list.d", "lists/partial", "cache/archives/partial"):
            (self.apt / d).mkdir(parents=True, exist_ok=True)
        src = (f"Types: deb\nURIs: {self.mirror()}\nSuites: {' '.join(SUITES)}\nComponents: main\n"
               f"Signed-By: {KEYRING}\n")
        p = self.apt / "sources.list.d" / "kvm-harness.sources"
        if not p.exists() or p.read_text() != src:
            p.write_text(src)
            (self.apt / "lists" / ".updated").unlink(missing_ok=True)

    def _apt(self, tool: str, *args: str, timeout: float = 600, cwd: Path | None = None, check: bool = True) -> str:
        cmd = [tool, *self._opts(), *args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise KernelFetchError(f"{tool} {' '.join(args)}: no answer in {timeout:g} s") from None
        if r.returncode != 0 and check:
            raise KernelFetchError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-600:]}")
        return r.stdout

    def update(self, force: bool = False) -> bool:
        """Refresh the package lists when older than LIST_MAX_AGE; True if it ran."""
        self._setup()
        stamp = self.apt / "lists" / ".updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LIST_MAX_AGE:
            return False
        self._apt("apt-get", "update", timeout=900)
        stamp.touch()
        return True

    # ---- what the archive offers ---------------------------------------------------------------
    def kernels(self) -> list[Kernel]:
        """Every amd64 kernel image the suites offer (signed generic flavour), oldest first."""
        ran = self.update()
        memo = self.apt / "kernels.json"
        if not ran and memo.exists():  # apt-cache over ~100 packages takes tens of seconds
            return [Kernel(**{**d, "parts": tuple(d["parts"])}) for d in json.loads(memo.read_text())]
        names = []
        for line in self._apt("apt-cache", "search", "--names-only", r"^linux-image-[0-9].*-amd64$").splitlines():
            pkg = line.split(" - ", 1)[0].strip()
            if _IMAGE.match(pkg):
                names.append(pkg)
        if not names:
            raise KernelFetchError("the archive lists no linux-image-*-amd64 package (is the mirror reachable?)")
        out: dict[str, Kernel] = {}
        for stanza in re.split(r"\n\s*\n", self._apt("apt-cache", "show", "--no-all-versions", *names)):
            pkg = re.search(r"^Package:\s*(\S+)", stanza, re.M)
            ver = re.search(r"^Version:\s*(\S+)", stanza, re.M)
            if not (pkg and ver):
                continue
            abi = _IMAGE.match(pkg.group(1)).group(1) + "-amd64"  # type: ignore[union-attr]
            deps = re.search(r"^Depends:\s*(.+)$", stanza, re.M)
            # 7.x: a meta package over linux-binary (vmlinuz), linux-modules and linux-base (config)
            parts = tuple(sorted(set(re.findall(rf"\b(linux-(?:binary|modules|base)-{re.escape(abi)})\b",
                                                deps.group(1) if deps else ""))))
            # the image package itself first: some carry vmlinuz themselves and a linux-base the archive
            # no longer has (6.18.5); fetch() takes what is there and then checks what it got
            out[pkg.group(1)] = Kernel(abi, pkg.group(1), ver.group(1), upstream_of(ver.group(1)),
                                       (pkg.group(1), *parts))
        # Backports keep old images longer than their modules: a version whose parts are gone cannot boot.
        parts = sorted({p for k in out.values() for p in k.parts if p != k.package})
        have = set()
        if parts:
            for stanza in re.split(r"\n\s*\n", self._apt("apt-cache", "show", *parts, check=False)):
                pkg, ver = re.search(r"^Package:\s*(\S+)", stanza, re.M), re.search(r"^Version:\s*(\S+)", stanza, re.M)
                if pkg and ver:
                    have.add((pkg.group(1), ver.group(1)))
        for name, k in out.items():
            needed = [p for p in k.parts if p.startswith(("linux-binary-", "linux-modules-"))]
            if any((p, k.version) not in have for p in needed):
                out[name] = Kernel(k.abi, k.package, k.version, k.upstream, k.parts, complete=False)
        ks = sorted(out.values(), key=lambda k: k.key)
        memo.write_text(json.dumps([asdict(k) for k in ks]))
        return ks

    def resolve(self, name: str) -> Kernel:
        """`debian:7.3.4`, `debian:6.12`, `debian:latest`, `debian:7.2.6+deb13`, `debian:7.3-rc7`."""
        if not name.startswith("debian:"):
            raise KernelFetchError(f"{name!r}: not a packaged kernel name (debian:VERSION, debian:latest)")
        want = name.split(":", 1)[1]
        if "=" in want:  # debian:7.3.4+KVM_SW_PROTECTED_VM=y: a packaged kernel with KVM rebuilt
            raise KernelFetchError(f"{name}: a packaged kernel with KVM rebuilt (harness/qemu/kvmbuild.py): "
                                   "`kernel build-kvm` or `--kernel` build it; this command takes packaged "
                                   "kernels only (the part before the first +NAME=VALUE)")
        ks = self.kernels()
        if want == "latest":
            rel = [k for k in ks if not k.is_rc and k.complete]
            return rel[-1]
        exact = [k for k in ks if want in (k.upstream, k.abi, k.version)]
        if exact:
            return exact[-1]
        # "7.3" is the newest 7.3.x release, even though the 7.3 release candidate's ABI is "7.3-amd64"
        prefix = [k for k in ks if not k.is_rc and k.complete and k.upstream.startswith(want + ".")]
        if prefix:
            return prefix[-1]
        by_abi = [k for k in ks if k.abi.removesuffix("-amd64") == want]  # "7.2.6+deb13", "6.1.0-50"
        if by_abi:
            return by_abi[-1]
        near = ", ".join(k.upstream for k in ks if k.upstream.split(".")[0] == want.split(".")[0])
        raise KernelFetchError(f"{name}: the archive has no such kernel (offers {near or 'none of that major'}); "
                               "`python -m harness kernel list` shows all")

    # ---- fetch + unpack ------------------------------------------------------------------------
    def kernel_dir(self, k: Kernel) -> Path:
        return self.cache / "debian" / k.abi

    def fetched(self, k: Kernel) -> Fetched | None:
        d = self.kernel_dir(k)
        meta = d / "fetched.json"
        if not meta.exists():
            return None
        return _locate(k, d / "root")

    def fetch(self, k: Kernel, log=print) -> Fetched:
        """Download (apt-get download) and unpack (dpkg-deb -x) the kernel unless cached."""
        if not k.complete:
            raise KernelFetchError(f"{k.name}: the archive still lists {k.package} but no longer has all of "
                                   f"{', '.join(k.parts[1:])} at {k.version}: this version cannot be booted")
        have = self.fetched(k)
        if have is not None:
            (self.kernel_dir(k) / "fetched.json").touch()  # LRU: used now
            return have
        # one fetch per version at a time: two processes (xdist workers, a matrix beside a bisect)
        # fetching the same kernel would each wipe the other's half-unpacked directory
        lock = self.cache / "debian" / f".{k.abi}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            have = self.fetched(k)
            if have is not None:
                log(f"kernel fetch: {k.name} was fetched by another process meanwhile")
                return have
            return self._fetch_locked(k, log)

    def _fetch_locked(self, k: Kernel, log=print) -> Fetched:
        self._setup()
        d = self.kernel_dir(k)
        shutil.rmtree(d, ignore_errors=True)
        debs = d / "deb"
        debs.mkdir(parents=True)
        pkgs = [f"{p}={k.version}" for p in k.parts]
        t0 = time.monotonic()
        log(f"kernel fetch: {k.name} ({k.abi}, {k.version}): apt-get download {' '.join(pkgs)}")
        for p in pkgs:
            try:
                self._apt("apt-get", "download", p, timeout=1200, cwd=debs)
            except KernelFetchError as e:
                if p.startswith(k.package + "="):
                    raise
                log(f"kernel fetch: {p} not downloadable ({str(e)[-120:]}); going on without it")
        for deb in sorted(debs.glob("*.deb")):
            r = subprocess.run(["dpkg-deb", "-x", str(deb), str(d / "root")], capture_output=True, text=True)
            if r.returncode != 0:
                raise KernelFetchError(f"dpkg-deb -x {deb.name}: {r.stderr.strip()[-400:]}")
        shutil.rmtree(debs)
        f = _locate(k, d / "root")
        if f is None:
            raise KernelFetchError(f"{k.name}: unpacked, but no vmlinuz/modules found under {d / 'root'}")
        (d / "fetched.json").write_text(json.dumps(f.to_json(), indent=1))
        log(f"kernel fetch: {k.name} unpacked in {time.monotonic() - t0:.0f} s: {f.vmlinuz} "
            f"({_size(d) >> 20} MiB)")
        self.prune(keep={k.abi})
        return f

    # ---- cache ---------------------------------------------------------------------------------
    def cached(self) -> list[tuple[str, int, float]]:
        """(abi, bytes, last used) of every unpacked kernel."""
        out = []
        for meta in (self.cache / "debian").glob("*/fetched.json"):
            out.append((meta.parent.name, _size(meta.parent), meta.stat().st_mtime))
        return sorted(out, key=lambda t: t[2])

    def prune(self, limit: int | None = None, keep: set[str] | None = None) -> list[str]:
        """Remove least recently used kernels until the cache is under `limit` bytes."""
        limit = int(os.environ.get("KVM_HARNESS_KERNEL_CACHE_LIMIT", DEFAULT_CACHE_LIMIT)) if limit is None else limit
        cached = self.cached()
        total = sum(s for _, s, _ in cached)
        gone = []
        for abi, size, _ in cached:
            if total <= limit:
                break
            if keep and abi in keep:
                continue
            shutil.rmtree(self.cache / "debian" / abi, ignore_errors=True)
            total -= size
            gone.append(abi)
        return gone


def _locate(k: Kernel, root: Path) -> Fetched | None:
    for base in (root / "usr" / "lib" / "modules" / k.abi, root / "lib" / "modules" / k.abi):
        if base.is_dir():
            modules = base
            break
    else:
        return None
    vmlinuz = next((p for p in (root / "boot" / f"vmlinuz-{k.abi}", modules / "vmlinuz") if p.is_file()), None)
    if vmlinuz is None:
        return None
    config = next((p for p in (root / "boot" / f"config-{k.abi}", modules / "config") if p.is_file()), None)
    return Fetched(k, root, vmlinuz, modules, config)


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
