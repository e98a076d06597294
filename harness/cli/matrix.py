"""`python -m harness matrix --kernels host,debian:6.1,debian:7.3.4 -- <pytest args>`: the selection on
each kernel (the host directly, the others under QEMU), one table of cases x kernels in
results/matrix/ (matrix.txt, matrix.json, index.html; each kernel's KTAP, JUnit and console under
results/matrix/<kernel>/). Exit 0 only when no cell failed or strictly XPASSed and every kernel
gave a verdict. `--check-known-issues` also reports known-issues.toml entries whose kernel range
disagrees with the cells (with `--no-run`: on the results already there).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from harness import known_issues
from harness.cli import kernel as kernel_cli
from harness.matrix import known, report
from harness.matrix import run as mrun
from harness.matrix.cells import KernelRun
from harness.qemu import debian, kvmbuild, runner

DEFAULT_KERNELS = "host,debian:6.1,debian:6.12,debian:7.2,debian:7.3"
RAW_ARGS = True


def register(sub) -> None:
    p = sub.add_parser("matrix", help="run a selection on many kernels and tabulate the cells", add_help=False,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("argv", nargs=argparse.REMAINDER)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=DEFAULT_KERNELS, help="comma-separated: host, debian:VER, or image paths "
                   "(default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results/matrix"), help="results folder (default %(default)s)")
    p.add_argument("--host-args", default="-n 2", help="extra pytest args for the host run (default %(default)r)")
    p.add_argument("--check-known-issues", action="store_true",
                   help="report known-issues.toml entries whose kernel range disagrees with the cells")
    p.add_argument("--no-run", action="store_true", help="use the results already in --out")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown (for docs/), with the date "
                   "and command of the run")
    kernel_cli.add_run_options(p, kernel_required=False)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the pytest selection")
    return p


def run(args) -> int:
    ns = _parser().parse_args(list(args.argv))
    kernels = [k.strip() for k in ns.kernels.split(",") if k.strip()]
    rest = kernel_cli.pytest_rest(ns.pytest_args)
    command = ["python", "-m", "harness", "matrix", *args.argv]
    archive = debian.Archive()
    configs: dict[str, frozenset[str]] = {}
    runs: list[KernelRun] = []

    def resolve(name: str) -> tuple[Path, Path | None]:
        image, modules = kernel_cli.resolve_kernel(name, None, log=lambda m: print(f"[{name}] {m}"))
        # the config the runner itself finds beside the image, as the set known_issues.applies() takes
        configs[name] = frozenset(f"{k}={v}" for k, v in runner.kernel_config(image).items() if v != "n")
        return image, modules

    for k in kernels:
        if ns.no_run:
            kr = mrun.load_kernel(ns.out, k)
            if kr is None:
                print(f"matrix: no results for {k} in {ns.out}", file=sys.stderr)
                return 2
        else:
            print(f"matrix: {k}: starting ({len(runs) + 1}/{len(kernels)})", flush=True)
            kr = mrun.run_kernel(k, rest, ns.out, host_args=shlex.split(ns.host_args),
                                 make_config=lambda img, mods, a, d: kernel_cli.run_config(ns, img, mods, a, d),
                                 resolve=resolve)
            print(f"matrix: {k}: exit {kr.code} ({kr.outcome}) in {kr.seconds:.0f} s: "
                  + (", ".join(f"{v} {o}" for o, v in kr.counts().items()) or kr.reason), flush=True)
        if k == "host":
            configs[k] = known_issues.kernel_config()
        elif k not in configs and kvmbuild.is_rebuild(k):
            configs[k] = _rebuild_config(k)
        elif k not in configs and k.startswith("debian:"):
            try:
                f = archive.fetched(archive.resolve(k))
                configs[k] = known.config_of(f.config if f else None)
            except debian.KernelFetchError:
                configs[k] = frozenset()
        runs.append(kr)
    ran, date = shlex.join(command), None
    if ns.no_run and (ns.out / "matrix.json").exists():  # keep the run's own command and date
        prev = json.loads((ns.out / "matrix.json").read_text())
        ran, date = shlex.join(prev.get("command", command)), prev.get("date")
        command = prev.get("command", command)
    paths = report.write(runs, ns.out, command, date)
    if ns.markdown:
        ns.markdown.write_text(report.markdown(runs, ran, date or "now",
                                               shlex.join(["python", "-m", "harness", "matrix", *args.argv])))
        paths["markdown"] = ns.markdown
    print(report.text(runs, command, only_interesting=True))
    print("matrix: " + ", ".join(f"{k} {p}" for k, p in paths.items()))
    print("matrix: time per kernel: " + ", ".join(f"{r.kernel} {r.seconds:.0f} s" for r in runs))
    code = report.verdict(runs)
    if ns.check_known_issues:
        accel = runner.choose_accel(ns.accel, runner.nested_available() if ns.accel == "auto" else None)[0]
        envs = {k: ("" if k == "host" else accel) for k in kernels}
        found = known.disagreements(runs, known_issues.load(), configs, envs)
        for line in found:
            print(f"known issue range: {line}")
        print(f"matrix: known issues: {len(found)} disagreement(s) with the cells")
        if found:
            code = 1
    return code


def _rebuild_config(name: str) -> frozenset[str]:
    """The config of a cached KVM rebuild (--no-run: nothing is built), as the runner reads it beside
    the image; empty when no build of that version and options is cached."""
    base, opts = kvmbuild.parse_name(name)
    for meta in sorted(kvmbuild.cached(), key=lambda m: m.get("built", ""), reverse=True):
        k = meta.get("kernel") or {}
        full = str(k.get("name", ""))
        # debian:7.3 names 7.3.x, never 7.30 (a prefix of whole version components)
        if meta.get("options") == opts and (full == base or full.startswith((base + ".", base + "-", base + "+"))):
            image = Path(meta["dir"]) / "modules" / "vmlinuz"
            return frozenset(f"{a}={b}" for a, b in runner.kernel_config(image).items() if b != "n")
    return frozenset()
