"""Which KVM config options an out-of-tree rebuild of kvm*.ko can honestly change (harness/qemu/kvmbuild.py).

A rebuild compiles arch/x86/kvm and virt/kvm against the packaged kernel's headers, whose
include/generated/autoconf.h is the packaged config. `-DCONFIG_X=1` in the KVM Makefile reaches
every #ifdef and IS_ENABLED() in those sources (and `CONFIG_X := y` there the Makefile's own
`kvm-$(CONFIG_X)` lines), but it cannot reach the core kernel already built into vmlinuz, nor take
back what autoconf.h defines. So an option is accepted only when all of these hold:

- it is defined in arch/x86/kvm/Kconfig or virt/kvm/Kconfig, has a prompt (a user-settable option,
  not one only other options select), and is a bool (a tristate decides which modules exist);
- it changes the packaged value from unset to set (autoconf.h cannot be undone; setting what is
  already set rebuilds nothing);
- its `depends on` (and enclosing `if`) hold with the packaged config plus the other requested options;
- everything it selects is already on in the packaged kernel (a selected symbol off there would
  need core-kernel code that vmlinuz lacks), and so is everything another symbol selects only because
  of it (`select KVM_GENERIC_PRIVATE_MEM if KVM_SW_PROTECTED_VM` in 6.12's KVM_X86);
- no file outside arch/x86/kvm, virt/kvm (and Documentation/, tools/, other architectures) uses it,
  except public headers (include/, arch/x86/include/): those are compiled into the rebuilt modules
  too, which is noted, since other modules built against the packaged headers keep the old view.

Pure logic: the Kconfig text, the packaged config and the reference index come in as values.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from harness.kvm.errors import HarnessError

KCONFIGS = ("arch/x86/kvm/Kconfig", "virt/kvm/Kconfig")
# The reference index (kvmbuild's source scan) keeps only files that mention one of these, so it can
# only vouch for symbols whose name holds one of them.
INDEXED = ("KVM", "VIRT")
_TOKEN = re.compile(r'\s*(\(|\)|!=|<=|>=|=|<|>|!|&&|\|\||"[^"]*"|\'[^\']*\'|[A-Za-z0-9_.+-]+)')
_VALUE = {"n": 0, "m": 1, "y": 2}


class ConfigError(HarnessError):
    """Requested KVM options that an out-of-tree rebuild cannot honour; the message says why, per option."""


@dataclass
class Symbol:
    name: str
    type: str = ""  # bool, tristate, int, hex, string
    prompt: bool = False
    depends: list[str] = field(default_factory=list)  # ANDed, enclosing `if` blocks included
    selects: list[tuple[str, str | None]] = field(default_factory=list)  # (symbol, `if` condition)
    file: str = ""


def parse_kconfig(text: str, file: str = "") -> dict[str, Symbol]:
    """The config entries of one Kconfig file (menus, choices and `source` are not followed)."""
    lines = text.replace("\\\n", " ").splitlines()
    syms: dict[str, Symbol] = {}
    ifs: list[str] = []
    cur: Symbol | None = None
    help_indent: int | None = None  # inside a help text: its indentation (None before its first line)
    in_help = False
    for raw in lines:
        if in_help:
            if not raw.strip():
                continue
            indent = len(raw.expandtabs()) - len(raw.expandtabs().lstrip())
            if help_indent is None:
                help_indent = indent
                continue
            if indent >= help_indent:
                continue
            in_help = False
        line = _strip_comment(raw).strip()
        if not line:
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word in ("config", "menuconfig"):
            cur = Symbol(rest, depends=list(ifs), file=file)
            syms[rest] = cur
        elif word == "if":
            ifs.append(rest)
            cur = None
        elif word == "endif":
            if ifs:
                ifs.pop()
            cur = None
        elif word in ("menu", "endmenu", "choice", "endchoice", "comment", "source", "mainmenu"):
            cur = None
        elif cur is None:
            continue
        elif word in ("bool", "tristate", "int", "hex", "string"):
            cur.type = word
            cur.prompt = cur.prompt or rest.startswith('"')
        elif word in ("def_bool", "def_tristate"):
            cur.type = word[4:]
        elif word == "prompt":
            cur.prompt = True
        elif word == "depends" and rest.startswith("on "):
            cur.depends.append(rest[3:].strip())
        elif word == "select":
            sym, _, cond = rest.partition(" if ")
            cur.selects.append((sym.strip(), cond.strip() or None))
        elif word in ("help", "---help---"):
            in_help, help_indent = True, None
    return syms


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside a quoted prompt stays)."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#":
            return line[:i]
    return line


def parse_config(text: str) -> dict[str, str]:
    """A .config: NAME (no CONFIG_ prefix) -> value (y, m, a number, a quoted string); unset -> n."""
    cfg: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            cfg[k[7:]] = v.strip()
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            cfg[line[9:].split()[0]] = "n"
    return cfg


def evaluate(expr: str, config: dict[str, str]) -> int:
    """A Kconfig expression's tristate value (0 n, 1 m, 2 y) under `config` (absent symbols are n)."""
    toks = _TOKEN.findall(expr)
    if "".join(toks).replace(" ", "") != expr.replace(" ", "").replace("\t", ""):
        raise ConfigError(f"cannot parse Kconfig expression {expr!r}")
    pos = 0

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(toks):
            raise ConfigError(f"Kconfig expression {expr!r} ends early")
        pos += 1
        return toks[pos - 1]

    def raw(tok: str) -> str:
        if tok[:1] in "\"'":
            return tok[1:-1]
        return tok if tok in _VALUE else config.get(tok, "n")

    def primary() -> int:
        tok = take()
        if tok == "(":
            v = or_()
            if take() != ")":
                raise ConfigError(f"unbalanced parentheses in {expr!r}")
            return v
        if tok == "!":
            return 2 - primary()
        if peek() in ("=", "!=", "<", ">", "<=", ">="):
            op, other = take(), take()
            a, b = raw(tok), raw(other)
            if op in ("=", "!="):
                return 2 if (a == b) == (op == "=") else 0
            try:
                x, y = int(a, 0), int(b, 0)
            except ValueError:
                x, y = _VALUE.get(a, 0), _VALUE.get(b, 0)
            return 2 if {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op] else 0
        return _VALUE.get(raw(tok), 0)

    def and_() -> int:
        v = primary()
        while peek() == "&&":
            take()
            v = min(v, primary())
        return v

    def or_() -> int:
        v = and_()
        while peek() == "||":
            take()
            v = max(v, and_())
        return v

    v = or_()
    if pos != len(toks):
        raise ConfigError(f"trailing tokens in Kconfig expression {expr!r}")
    return v


def symbols_in(expr: str) -> list[str]:
    return [t for t in _TOKEN.findall(expr) if re.fullmatch(r"[A-Z][A-Z0-9_]*", t)]


def is_header(path: str) -> bool:
    """A public header compiled into whatever includes it (the rebuilt modules among them)."""
    return path.endswith(".h") and path.startswith(("include/", "arch/x86/include/"))


@dataclass
class Checked:
    """validate()'s answer: the options as accepted and notes worth printing."""

    options: dict[str, str]
    notes: list[str]


def validate(requested: dict[str, str], symbols: dict[str, Symbol], packaged: dict[str, str],
             refs: dict[str, list[str]]) -> Checked:
    """Every requested option checked (see the module's docstring); ConfigError lists every refusal."""
    env = {**packaged, **requested}
    problems: list[str] = []
    notes: list[str] = []
    for name, value in sorted(requested.items()):
        sym = symbols.get(name)
        if sym is None:
            near = difflib.get_close_matches(name, list(symbols), n=3)
            problems.append(f"{name}: not a KVM option (only options defined in {' or '.join(KCONFIGS)} can be "
                            f"rebuilt out of tree)" + (f"; did you mean {', '.join(near)}?" if near else ""))
            continue
        where = f"{name} ({sym.file or 'Kconfig'})"
        if sym.type == "tristate":
            problems.append(f"{where}: a tristate decides which modules exist (obj-$(CONFIG_{name})); an "
                            "out-of-tree rebuild of kvm*.ko cannot change that")
            continue
        if not sym.prompt:
            by = sorted(n for n, s in symbols.items() if any(t == name for t, _ in s.selects))
            problems.append(f"{where}: has no prompt, only other options select it"
                            + (f" ({', '.join(by)}): request one of those" if by else ""))
            continue
        bad = _bad_value(sym.type, value)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        have = packaged.get(name, "n")
        if have == value:
            problems.append(f"{where}: already {value} in the packaged kernel: nothing to rebuild")
            continue
        if have != "n":
            problems.append(f"{where}: the packaged headers' autoconf.h sets CONFIG_{name}={have}, which every KVM "
                            f"source sees and a rebuild cannot take back; {name}={value} needs a kernel built so")
            continue
        if value == "n":
            problems.append(f"{where}: already unset in the packaged kernel: nothing to rebuild")
            continue
        for dep in sym.depends:
            if evaluate(dep, env) == 0:
                vals = ", ".join(f"{s}={env.get(s, 'n')}" for s in dict.fromkeys(symbols_in(dep)))
                problems.append(f"{where}: depends on {dep}, which the packaged kernel does not satisfy ({vals})")
        for target, cond in sym.selects:
            if cond is not None and evaluate(cond, env) == 0:
                continue
            if env.get(target, "n") == "n":
                problems.append(f"{where}: selects {target}, which is off in the packaged kernel (core-kernel "
                                "code the packaged vmlinuz does not have)")
        for other, target, cond in _selected_because(name, symbols, packaged, env):
            problems.append(f"{where}: makes {other} select {target} (`select {target} if {cond}` in "
                            f"{other}), which is off in the packaged kernel (core-kernel code the packaged vmlinuz "
                            "does not have)")
        if not any(k in name for k in INDEXED):
            problems.append(f"{where}: the source index only covers names with {' or '.join(INDEXED)}: "
                            "cannot tell whether code outside KVM uses it")
            continue
        used = refs.get(name, [])
        core = [p for p in used if not is_header(p)]
        if core:
            more = f" and {len(core) - 6} more" if len(core) > 6 else ""
            problems.append(f"{where}: also used outside arch/x86/kvm and virt/kvm, by code built into the "
                            f"packaged kernel or other modules: {', '.join(core[:6])}{more}")
        elif used:
            notes.append(f"{name}: also read by the headers {', '.join(used)} (compiled into the rebuilt modules; "
                         "other modules built against the packaged headers keep the packaged view)")
    if problems:
        raise ConfigError("cannot rebuild KVM with " + ", ".join(f"{k}={v}" for k, v in sorted(requested.items()))
                          + ":\n  " + "\n  ".join(problems))
    return Checked(dict(sorted(requested.items())), notes)


def _selected_because(name: str, symbols: dict[str, Symbol], packaged: dict[str, str],
                      env: dict[str, str]) -> list[tuple[str, str, str]]:
    """(symbol, target, condition) of each `select TARGET if COND` elsewhere whose COND names `name`,
    holds with the requested options but not in the packaged config, in a symbol that is on, and whose
    TARGET is off: the option would turn on TARGET through another symbol. (KVM_SW_PROTECTED_VM selects
    what it needs itself in 7.x; in 6.12 KVM_X86 has `select KVM_GENERIC_PRIVATE_MEM if
    KVM_SW_PROTECTED_VM`.)"""
    out = []
    for other, sym in sorted(symbols.items()):
        if other == name or env.get(other, "n") == "n":
            continue
        for target, cond in sym.selects:
            if cond is None or name not in symbols_in(cond) or env.get(target, "n") != "n":
                continue
            if evaluate(cond, env) != 0 and evaluate(cond, packaged) == 0:
                out.append((other, target, cond))
    return out


def _bad_value(typ: str, value: str) -> str | None:
    if typ == "bool":
        return None if value in ("y", "n") else f"a bool takes y or n, not {value!r}"
    if typ == "int":
        return None if re.fullmatch(r"-?\d+", value) else f"an int, not {value!r}"
    if typ == "hex":
        return None if re.fullmatch(r"0x[0-9a-fA-F]+", value) else f"a hex value (0x...), not {value!r}"
    if typ == "string":
        return None
    return f"of unknown type {typ or '(none)'}"


def with_options(config_text: str, options: dict[str, str]) -> str:
    """The packaged .config with the options set (a `# CONFIG_X is not set` line replaced in place)."""
    lines = config_text.splitlines()
    left = dict(options)
    for i, line in enumerate(lines):
        for name in list(left):
            if line == f"# CONFIG_{name} is not set" or line.startswith(f"CONFIG_{name}="):
                v = left.pop(name)
                lines[i] = f"# CONFIG_{name} is not set" if v == "n" else f"CONFIG_{name}={v}"
    lines += [f"CONFIG_{n}={v}" for n, v in sorted(left.items()) if v != "n"]
    return "\n".join(lines) + "\n"
