r"""Known kernel issues: cases that catch a real bug stay strict, and CI on the affected kernels still
passes because they are expected to fail there (strict xfail: an unexpected pass shows as XPASS,
which tells the user the kernel got fixed).

The expectations live in known-issues.toml at the top of the repo:

    [[issue]]
    id = "short-name"
    cases = ["cases/test_file.py::test_name[*]"]   # node-id patterns: * and ? wildcards
    backend = "kvm_pvm"                            # optional: harness.backends.name()
    kernel = ">=6.18, <6.19"                       # optional: release range
    config = ["CONFIG_KVM_PROVE_MMU=y"]            # optional: all must be in /proc/config.gz or /boot/config-*
    kmsg = 'dirty_ring\.c:\d+ kvm_dirty_ring_push'  # optional: regex of the splat the bug
                                                   # prints; the kernel-log oracle accepts it in every
                                                   # case while the issue is in force (under -n N the
                                                   # splat lands in other workers' windows too)
    environment = "tcg"                            # optional: an emulator artefact, in force only
                                                   # in the QEMU runner under TCG (not a kernel bug)
    paging = "tdp"                                 # optional: "tdp" (NPT/EPT) or "shadow":
                                                   # harness.backends.paging()
    reproducer = "reproducers/<id>.c"              # optional: a standalone C reproducer (exit 0 fixed,
                                                   # 1 reproduced, 4 cannot test), run by
                                                   # cases/test_reproducers.py (name that case too)
    strict = false                                 # optional, default true: false only where the bug
                                                   # reproduces by chance (evidence gives the rate),
                                                   # so a pass proves nothing
    reason = "what the case catches"
    evidence = "the failure line / dmesg that shows it"
    fix = "upstream commit or thread, where known"
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness import backends as backend

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "known-issues.toml"
ENV_FILE = "KVM_HARNESS_KNOWN_ISSUES"  # another file instead (the harness's own tests; a lab's list)


def default_file() -> Path:
    """known-issues.toml of this checkout, or the file $KVM_HARNESS_KNOWN_ISSUES names."""
    return Path(os.environ.get(ENV_FILE) or DEFAULT_FILE)


@dataclass(frozen=True)
class KnownIssue:
    id: str
    cases: tuple[str, ...]
    reason: str
    evidence: str = ""
    fix: str = ""
    backend: str | None = None
    kernel: str | None = None
    config: tuple[str, ...] = field(default_factory=tuple)
    kmsg: str | None = None
    strict: bool = True
    reproducer: str = ""  # a standalone program that shows the bug (path from the file's folder)
    environment: str | None = None  # "tcg": an artefact of the emulator, in force only under it
    paging: str | None = None  # "tdp" / "shadow": in force only when KVM maps the guest so

    @property
    def what(self) -> str:
        return f"{self.environment} emulator artefact" if self.environment else "kernel issue"

    def applies(self, release: str | None = None, backend_name: str | None = None,
                config: frozenset[str] | None = None, environment: str | None = None,
                paging: str | None = None) -> bool:
        if self.environment and self.environment != (environment or current_environment()):
            return False
        if self.paging and self.paging != (paging or backend.paging()):
            return False
        if self.backend and self.backend != (backend_name or backend.name()):
            return False
        if self.kernel and not release_in_range(release or platform.release(), self.kernel):
            return False
        if self.config:
            have = kernel_config() if config is None else config
            if not all(c in have for c in self.config):
                return False
        return True

    def matches(self, nodeid: str) -> bool:
        return case_matches(self.cases, nodeid)

    def xfail_reason(self) -> str:
        s = f"known {self.what} {self.id}: {self.reason}"
        if not self.strict:
            s += " [reproduces by chance: not strict]"
        if self.fix:
            s += f" (fix: {self.fix})"
        return s


def current_environment() -> str:
    """"tcg" / "kvm" inside the QEMU kernel runner (it sets KVM_HARNESS_ACCEL in the guest), "" elsewhere."""
    return os.environ.get("KVM_HARNESS_ACCEL", "")


def case_matches(patterns: tuple[str, ...], nodeid: str) -> bool:
    """nodeid matches one of the node-id patterns (`*` and `?` wildcards)."""
    return any(_glob(p).fullmatch(nodeid) for p in patterns)


def _glob(pattern: str) -> re.Pattern[str]:
    """`*` and `?` wildcards only: node ids carry literal [brackets] that fnmatch would misread."""
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."))


def _version(s: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", s.strip())
    if not m:
        raise ValueError(f"not a kernel release: {s!r}")
    return tuple(int(x or 0) for x in m.groups())


def release_in_range(release: str, spec: str) -> bool:
    """`spec` is comma-separated comparisons, e.g. '>=6.18, <6.19' or '==6.18.44'."""
    have = _version(release)
    for part in spec.split(","):
        part = part.strip()
        m = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", part)
        if not m:
            raise ValueError(f"bad kernel range {spec!r}")
        op, ver = m.groups()
        want = _version(ver)
        ok = {">=": have >= want, "<=": have <= want, "==": have == want, "!=": have != want,
              ">": have > want, "<": have < want}[op]
        if not ok:
            return False
    return True


_config_cache: frozenset[str] | None = None


CONFIG_ENV = "KVM_HARNESS_KERNEL_CONFIG"  # harness.qemu.runner sets it in the guest


def kernel_config() -> frozenset[str]:
    global _config_cache
    if _config_cache is None:
        text = ""
        given = os.environ.get(CONFIG_ENV)  # the kernel runner's guest: the booted image's config
        if given and os.path.exists(given):
            text = Path(given).read_text(errors="replace")
        else:
            try:
                with gzip.open("/proc/config.gz", "rt") as f:
                    text = f.read()
            except OSError:
                p = f"/boot/config-{platform.release()}"
                if os.path.exists(p):
                    text = Path(p).read_text()
        _config_cache = frozenset(
            line.strip() for line in text.splitlines() if line.startswith("CONFIG_")
        )
    return _config_cache


def load(path: Path | str | None = None) -> list[KnownIssue]:
    p = Path(path) if path is not None else default_file()
    if not p.exists():
        return []
    data = tomllib.loads(p.read_text())
    out = []
    for i, d in enumerate(data.get("issue", [])):
        missing = {"id", "cases", "reason"} - set(d)
        if missing:
            raise ValueError(f"{p}: issue #{i} lacks {sorted(missing)}")
        unknown = set(d) - _KEYS
        if unknown:  # a typo would silently widen or narrow an expectation
            raise ValueError(f"{p}: issue {d['id']!r} has unknown keys {sorted(unknown)}")
        if d.get("kmsg"):
            re.compile(d["kmsg"])
        if d.get("reproducer") and not (p.parent / d["reproducer"]).is_file():
            raise ValueError(f"{p}: issue {d['id']!r} names reproducer {d['reproducer']!r}, which does not exist")
        cfg = d.get("config", ())
        out.append(KnownIssue(
            id=d["id"], cases=tuple(d["cases"]), reason=d["reason"], evidence=d.get("evidence", ""),
            fix=d.get("fix", ""), backend=d.get("backend"), kernel=d.get("kernel"),
            config=tuple([cfg] if isinstance(cfg, str) else cfg), kmsg=d.get("kmsg"),
            strict=bool(d.get("strict", True)), reproducer=d.get("reproducer", ""),
            environment=d.get("environment"), paging=d.get("paging"),
        ))
    return out


_KEYS = {"id", "cases", "reason", "evidence", "fix", "backend", "kernel", "config", "kmsg", "strict", "environment",
         "reproducer", "paging"}


def in_force(issues: list[KnownIssue] | None = None) -> list[KnownIssue]:
    return [i for i in (load() if issues is None else issues) if i.applies()]
