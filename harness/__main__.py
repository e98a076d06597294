"""Command line: `python -m harness <command> ...`; each command is a module in harness/cli/ with
`register(subparsers)` adding its parser and `run(args) -> int` (its exit code)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import harness.cli


def _commands() -> dict[str, object]:
    mods = {}
    for info in pkgutil.iter_modules(harness.cli.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"harness.cli.{info.name}")
        if hasattr(mod, "register") and hasattr(mod, "run"):
            mods[info.name] = mod
    return mods


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cmds = _commands()
    argv = sys.argv[1:] if argv is None else argv
    if argv and getattr(cmds.get(argv[0]), "RAW_ARGS", False):
        # a command with actions of its own parses everything after its name itself
        return cmds[argv[0]].run(argparse.Namespace(cmd=argv[0], argv=argv[1:]))  # type: ignore[attr-defined]
    for mod in cmds.values():
        mod.register(sub)
    args = ap.parse_args(argv)
    return cmds[args.cmd].run(args)


if __name__ == "__main__":
    sys.exit(main())
