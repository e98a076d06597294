"""The two bottom layers import one way: harness.kvm (the binding) never imports harness.lib (what a
test needs on top), not even through another package, and inside each package the imports have no
cycle. Every import counts: module level, inside functions and under TYPE_CHECKING.

    python tests/test_layering.py      # prints the import graph of kvm/ and lib/ and the verdict
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("harness.kvm", "harness.lib")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "harness").rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The harness modules `path` imports, anywhere in the file. `from pkg import name` is the
    module pkg.name when there is one, else pkg itself."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            out.update(subs or {node.module})
            if len(subs) < len(node.names):
                out.add(node.module)  # some names come from the package itself
    return out


def direct_graph() -> dict[str, set[str]]:
    """harness module -> the harness modules its own import statements name."""
    known = all_modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def graph() -> dict[str, set[str]]:
    """direct_graph() plus the packages whose __init__ an import runs (harness.memory's, for
    harness.memory.hostmem): what an import really executes."""
    known = all_modules()
    g: dict[str, set[str]] = {}
    for name, deps in direct_graph().items():
        deps = set(deps)
        for d in list(deps):  # importing a.b.c runs a.b's __init__ (outside the module's own package)
            parts = d.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in known and not name.startswith(pkg + ".") and name != pkg:
                    deps.add(pkg)
        g[name] = deps - {name}
    return g


def layer(name: str) -> str | None:
    return next((lay for lay in LAYERS if name == lay or name.startswith(lay + ".")), None)


def kvm_reaches_lib(g: dict[str, set[str]]) -> list[list[str]]:
    """Import chains from a harness.kvm module to a harness.lib one (through any package)."""
    found = []
    for start in sorted(m for m in g if layer(m) == "harness.kvm"):
        seen = {start}
        stack = [[start]]
        while stack:
            chain = stack.pop()
            for d in sorted(g[chain[-1]]):
                if layer(d) == "harness.lib":
                    found.append([*chain, d])
                elif d not in seen:
                    seen.add(d)
                    stack.append([*chain, d])
    return found


def cycles_within(g: dict[str, set[str]], pkg: str) -> list[list[str]]:
    """Import cycles among the modules of one package (its __init__ left out: it only re-exports)."""
    mods = {m for m in g if m.startswith(pkg + ".")}
    sub = {m: g[m] & mods for m in mods}
    out: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(sub[m]):
            if state.get(d) == 1:
                out.append([*path[path.index(d):], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    return out


def test_kvm_never_imports_lib() -> None:
    chains = kvm_reaches_lib(graph())
    assert not chains, "harness.kvm reaches harness.lib:\n" + "\n".join(" -> ".join(c) for c in chains)


def test_no_import_cycle_inside_kvm_or_lib() -> None:
    g = graph()
    for pkg in LAYERS:
        cyc = cycles_within(g, pkg)
        assert not cyc, f"import cycles in {pkg}:\n" + "\n".join(" -> ".join(c) for c in cyc)


def main() -> int:
    g, direct = graph(), direct_graph()
    for pkg in LAYERS:
        print(f"{pkg} (direct imports of kvm/ and lib/ modules):")
        for m in sorted(x for x in g if layer(x) == pkg):
            deps = sorted(d for d in direct[m] if layer(d))
            print(f"  {m.removeprefix('harness.')} -> {', '.join(d.removeprefix('harness.') for d in deps) or '-'}")
    chains = kvm_reaches_lib(g)
    cyc = [c for pkg in LAYERS for c in cycles_within(g, pkg)]
    print(f"kvm -> lib chains: {len(chains)}; cycles inside kvm/ or lib/: {len(cyc)}")
    for c in chains + cyc:
        print("  " + " -> ".join(c))
    return 1 if chains or cyc else 0


if __name__ == "__main__":
    sys.exit(main())


@pytest.mark.parametrize("module", ["harness.unsupported", "harness.kvm.errors", "harness.memory",
                                    "harness.race", "harness.lib", "harness.vhost"])
def test_module_imports_first(module):
    """Each layer's entry imports on its own in a fresh interpreter: a cycle that only bites when
    a module is imported first (harness.unsupported once did) shows here."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
