"""Run one selection on each kernel: the host directly, the others in the QEMU runner, each into
results/matrix/<kernel>/ (junit.xml, ktap.txt, console.log, run.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from harness.matrix.cells import KernelRun, from_junit, ktap_header
from harness.qemu import runner

REPO = Path(__file__).resolve().parents[2]


def slug(kernel: str) -> str:
    """debian:7.3.4 -> debian-7.3.4 (a folder name)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", kernel)


class _Tee:
    """Write the run's output to its log, and progress lines (pytest's percentages, the runner's
    own lines, the summary) to the terminal with the kernel's name in front."""

    _PROGRESS = re.compile(r"\[\s*\d+%\]|^(\[\d+/\d+\] )?kernel-runner|^=+ .* =+$|passed|failed|^kernel fetch"
                           r"|^ERROR|Oops|panic")

    def __init__(self, log: TextIO, term: TextIO, name: str) -> None:
        self.log, self.term, self.name = log, term, name
        self._buf = ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self.log.write(s)
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                if self._PROGRESS.search(line):
                    self.term.write(f"[{self.name}] {line[-160:]}\n")
                    self.term.flush()
        return len(s)

    def flush(self) -> None:
        self.log.flush()


def run_kernel(kernel: str, pytest_args: list[str], out_root: Path, *, host_args: list[str],
               make_config: Callable[[Path, Path | None, list[str], Path], runner.RunConfig],
               resolve: Callable[[str], tuple[Path, Path | None]], term: TextIO = sys.stdout) -> KernelRun:
    d = out_root / slug(kernel)
    d.mkdir(parents=True, exist_ok=True)
    for f in ("junit.xml", "ktap.txt", "console.log", "run.json"):
        (d / f).unlink(missing_ok=True)
    d = d.resolve()
    args = [*pytest_args, f"--junitxml={d / 'junit.xml'}", f"--ktap={d / 'ktap.txt'}", "-p", "no:cacheprovider"]
    kr = KernelRun(kernel)
    t0 = time.monotonic()
    with open(d / "console.log", "w") as log:
        tee = _Tee(log, term, kernel)
        if kernel == "host":
            cmd = [sys.executable, "-m", "pytest", *host_args, *args]
            tee.write(f"matrix: host: {' '.join(cmd)}\n")
            p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert p.stdout is not None
            for line in p.stdout:
                tee.write(line)
            kr.code = p.wait()
            kr.outcome = "verdict"
        else:
            try:
                image, modules = resolve(kernel)
            except Exception as e:  # a kernel that cannot be had is a row of its own
                kr.code, kr.outcome, kr.reason = runner.SKIP, "setup", str(e)
                tee.write(f"matrix: {kernel}: {e}\n")
            else:
                res = runner.run(make_config(image, modules, args, d), tee)
                runner.report(res, tee)
                kr.code, kr.outcome, kr.reason = res.code, res.outcome, res.reason
    kr.seconds = time.monotonic() - t0
    if (d / "junit.xml").exists():
        kr.cells = from_junit(d / "junit.xml")
    hdr = ktap_header(d / "ktap.txt")
    kr.release, kr.backend, kr.paging = hdr.get("release", ""), hdr.get("backend", ""), hdr.get("paging", "")
    (d / "run.json").write_text(json.dumps({"kernel": kernel, "release": kr.release, "backend": kr.backend,
                                            "paging": kr.paging,
                                            "code": kr.code, "outcome": kr.outcome, "reason": kr.reason,
                                            "seconds": kr.seconds}, indent=1))
    return kr


def load_kernel(out_root: Path, kernel: str) -> KernelRun | None:
    """A kernel's earlier results (for --no-run)."""
    d = out_root / slug(kernel)
    if not (d / "run.json").exists():
        return None
    meta = json.loads((d / "run.json").read_text())
    kr = KernelRun(kernel, meta.get("release", ""), meta.get("backend", ""), meta.get("code"),
                   meta.get("outcome", ""), meta.get("reason", ""), meta.get("seconds", 0.0))
    kr.paging = meta.get("paging", "")
    if (d / "junit.xml").exists():
        kr.cells = from_junit(d / "junit.xml")
    return kr
