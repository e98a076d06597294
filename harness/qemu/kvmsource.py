"""KVM's sources of one packaged kernel, from Debian's `linux-source-X.Y` at exactly its version.

One pass over the package's tarball (`dpkg-deb --fsys-tarfile`, then the .tar.xz inside, both
streamed: the 1.3 GB tree is never written out) keeps arch/x86/kvm and virt/kvm and indexes, for
every other file the packaged kernel is built from, which CONFIG_ symbols it uses (only files that
mention KVM or VIRT, see kconfig.INDEXED): kconfig.validate() refuses options used outside KVM.

    .cache/kvm-builds/sources/<package version>/
        tree/arch/x86/kvm/..., tree/virt/kvm/...   the sources (Debian's patches applied)
        refs.json                                  KVM Kconfig symbol -> files outside KVM using it
        done.json                                  the step finished (package, sha256, seconds)
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from harness.qemu import debian, kconfig
from harness.qemu.buildenv import BuildStepError, StepLog, safe_rmtree

KEEP = ("arch/x86/kvm/", "virt/kvm/")
# not part of what the packaged x86 kernel is built from
SKIP = ("Documentation/", "tools/", "samples/", "LICENSES/", "debian/")
_CFG = re.compile(rb"\bCONFIG_(\w+)")
_WORD = re.compile(rb"\b([A-Z][A-Z0-9_]+)\b")


def source_package(k: debian.Kernel) -> str:
    """linux-source-7.3 for 7.3.4 and 7.3-rc7; linux-source-6.1 for 6.1.176."""
    m = re.match(r"(\d+\.\d+)", k.upstream)
    if not m:
        raise debian.KernelFetchError(f"{k.name}: cannot tell the source package from version {k.upstream!r}")
    return f"linux-source-{m.group(1)}"


def outside(name: str) -> bool:
    """A file of the x86 kernel other than KVM's own (what the index covers)."""
    if name.startswith(KEEP) or name.startswith(SKIP):
        return False
    return not (name.startswith("arch/") and not name.startswith("arch/x86/"))


class Sources:
    """The sources step's directory for one package version."""

    def __init__(self, root: Path, k: debian.Kernel) -> None:
        self.kernel = k
        self.dir = root / "sources" / k.version
        self.tree = self.dir / "tree"
        self.package = source_package(k)

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists() and (self.tree / "arch/x86/kvm/Makefile").exists()

    def symbols(self) -> dict[str, kconfig.Symbol]:
        syms: dict[str, kconfig.Symbol] = {}
        for rel in kconfig.KCONFIGS:
            p = self.tree / rel
            if p.exists():
                syms.update(kconfig.parse_kconfig(p.read_text(errors="replace"), rel))
        return syms

    def refs(self) -> dict[str, list[str]]:
        return json.loads((self.dir / "refs.json").read_text())

    def fetch(self, archive: debian.Archive, log: StepLog, timeout: float = 1800) -> bool:
        """Download (unless a verified copy is there) and unpack; False when done before."""
        if self.done:
            return False
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        want = f"{self.package}={self.kernel.version}"
        info = archive._apt("apt-cache", "show", want, check=False)
        sha = re.search(r"^SHA256:\s*(\S+)", info, re.M)
        fname = re.search(r"^Filename:\s*(\S+)", info, re.M)
        if not (sha and fname):
            raise log.fail("sources", f"the archive has no {want} (Debian publishes the sources of a version "
                                      "as linux-source-X.Y at the same version)")
        deb = self.dir / Path(fname.group(1)).name
        if deb.exists() and _sha256(deb) == sha.group(1):
            log.write(f"==== {deb.name}: already downloaded, sha256 verified")
        else:
            deb.unlink(missing_ok=True)
            log.write(f"==== apt-get download {want}")
            try:
                archive._apt("apt-get", "download", want, timeout=timeout, cwd=self.dir)
            except debian.KernelFetchError as e:
                raise log.fail("sources", str(e)) from None
            if not deb.exists() or _sha256(deb) != sha.group(1):
                raise log.fail("sources", f"{deb.name}: missing or its sha256 is not the archive's after download")
        log.progress(f"sources: {deb.name} ({deb.stat().st_size >> 20} MiB) in {time.monotonic() - t0:.0f} s; "
                     "unpacking arch/x86/kvm, virt/kvm and indexing the rest (one pass, ~30-60 s)")
        safe_rmtree(self.tree)
        refs = self._unpack(deb, log, timeout)
        (self.dir / "refs.json").write_text(json.dumps(refs, indent=0, sort_keys=True))
        (self.dir / "done.json").write_text(json.dumps({"package": want, "sha256": sha.group(1),
                                                        "seconds": round(time.monotonic() - t0, 1)}))
        deb.unlink()  # 100-200 MiB; the unpacked KVM tree is all later steps read
        return True

    def _unpack(self, deb: Path, log: StepLog, timeout: float) -> dict[str, list[str]]:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        timer = threading.Timer(timeout, proc.kill)  # bounds the whole pass: reads fail once it is killed
        timer.start()
        index: dict[str, set[str]] = collections.defaultdict(set)
        kept = 0
        try:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
                for m in outer:
                    if not re.fullmatch(r"\./usr/src/linux-source-[\d.]+\.tar\.xz", m.name):
                        continue
                    with tarfile.open(fileobj=outer.extractfile(m), mode="r|xz") as inner:
                        for f in inner:
                            if not f.isfile() or "/" not in f.name:
                                continue
                            rel = f.name.split("/", 1)[1]
                            if rel.startswith(KEEP):
                                if ".." in rel.split("/"):
                                    raise log.fail("sources", f"unsafe path in the tarball: {f.name}")
                                dest = self.tree / rel
                                dest.parent.mkdir(parents=True, exist_ok=True)
                                dest.write_bytes(inner.extractfile(f).read())  # type: ignore[union-attr]
                                dest.chmod(0o755 if f.mode & 0o100 else 0o644)
                                kept += 1
                            elif outside(rel):
                                data = inner.extractfile(f).read()  # type: ignore[union-attr]
                                if not any(w.encode() in data for w in kconfig.INDEXED):
                                    continue
                                toks = set(_CFG.findall(data))
                                if "Kconfig" in rel.rsplit("/", 1)[-1]:
                                    toks |= set(_WORD.findall(data))
                                for t in toks:
                                    index[t.decode()].add(rel)
                    break
        except (tarfile.TarError, EOFError, OSError) as e:
            proc.kill()
            raise log.fail("sources", f"cannot read {deb.name}: {e}") from None
        finally:
            timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()  # dpkg-deb may still be writing what follows the tarball: let it stop
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            proc.wait(timeout=60)
        if not kept or not (self.tree / "arch/x86/kvm/Makefile").exists():
            raise BuildStepError("sources", f"no arch/x86/kvm in {deb.name} {err.strip()[-300:]}", log.path)
        syms = self.symbols()
        log.write(f"==== kept {kept} files of arch/x86/kvm and virt/kvm; {len(syms)} Kconfig symbols indexed")
        return {s: sorted(index.get(s, ())) for s in syms}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
