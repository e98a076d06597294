"""KVM rebuilt from source for a packaged kernel (harness/qemu/kvmbuild.py, kvmcompile.py, kconfig.py,
buildenv.py).

Pure logic first (names, the cache key, Kconfig parsing and the option checks, the Makefile rewrite,
the composed modules tree, the step log's failure report, the lock), no network and no chroot. Then
one real boot of `debian:7.3.4+KVM_SW_PROTECTED_VM=y` under QEMU that checks KVM_CAP_VM_TYPES has
bit 1; it runs only when that build is cached (`python -m harness kernel build-kvm debian:7.3.4
--config KVM_SW_PROTECTED_VM=y`, or `make kvm-build`) and skips saying so otherwise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.kvm.errors import HarnessError
from harness.qemu import initramfs, kconfig, kvmbuild, kvmcompile, runner
from harness.qemu.buildenv import BuildStepError, Lock, StepLog
from harness.qemu.kconfig import ConfigError, evaluate, parse_config, parse_kconfig, validate
from harness.qemu.kvmbuild import KvmBuildError, cache_key, parse_name, rebuild_name
from harness.qemu.modules import ModuleTree

REPO = Path(__file__).resolve().parents[1]


# ---- names and the cache key ---------------------------------------------------------------------------

def test_parse_name_base_and_options():
    assert parse_name("debian:7.3.4+KVM_SW_PROTECTED_VM=y+KVM_PROVE_MMU=y") == (
        "debian:7.3.4", {"KVM_SW_PROTECTED_VM": "y", "KVM_PROVE_MMU": "y"})
    assert parse_name("debian:7.3+CONFIG_KVM_SW_PROTECTED_VM=y") == ("debian:7.3", {"KVM_SW_PROTECTED_VM": "y"})
    # an ABI name carries a '+' of its own; options are the parts with '='
    assert parse_name("debian:7.2.6+deb13+KVM_PROVE_MMU=y") == ("debian:7.2.6+deb13", {"KVM_PROVE_MMU": "y"})
    assert parse_name("debian:latest+KVM_PROVE_MMU=y+KVM_PROVE_MMU=y")[1] == {"KVM_PROVE_MMU": "y"}
    assert kvmbuild.is_rebuild("debian:7.3.4+KVM_SW_PROTECTED_VM=y")
    assert not kvmbuild.is_rebuild("debian:7.2.6+deb13") and not kvmbuild.is_rebuild("/boot/vmlinuz+x=y")


@pytest.mark.parametrize("name,match", [
    ("debian:7.3.4+KVM_SW_PROTECTED_VM", r"needs a value \(KVM_SW_PROTECTED_VM=y\)"),
    ("debian:7.3.4+KVM_SW_PROTECTED_VM=y+deb13", "after the options"),
    ("debian:7.3.4++KVM_PROVE_MMU=y", "empty part"),
    ("debian:KVM_PROVE_MMU=y", "no kernel version before the options"),
    ("debian:7.3.4+KVM_PROVE_MMU=y+KVM_PROVE_MMU=n", "given twice"),
    ("debian:7.3.4+kvm_prove_mmu=y", "NAME=VALUE in capitals"),
    ("debian:7.3.4+KVM_PROVE_MMU=", "NAME=VALUE"),
    ("/boot/vmlinuz+KVM_PROVE_MMU=y", "only Debian's packaged kernels"),
])
def test_parse_name_refuses_bad_names(name, match):
    with pytest.raises(KvmBuildError, match=match):
        parse_name(name)


def test_cache_key_is_order_independent_and_names_are_canonical():
    a = cache_key("7.3.4-1~bpo13+1", {"KVM_SW_PROTECTED_VM": "y", "KVM_PROVE_MMU": "y"})
    b = cache_key("7.3.4-1~bpo13+1", {"KVM_PROVE_MMU": "y", "KVM_SW_PROTECTED_VM": "y"})
    assert a == b == "7.3.4-1~bpo13+1+KVM_PROVE_MMU=y+KVM_SW_PROTECTED_VM=y"
    assert cache_key("7.3.4-1~bpo13+1", {"KVM_PROVE_MMU": "y"}) != a  # the options are part of it
    assert rebuild_name("debian:7.3", {"KVM_SW_PROTECTED_VM": "y", "KVM_PROVE_MMU": "y"}) == \
        "debian:7.3+KVM_PROVE_MMU=y+KVM_SW_PROTECTED_VM=y"
    with pytest.raises(KvmBuildError, match="at least one option"):
        cache_key("7.3.4-1~bpo13+1", {})


def test_compiler_from_the_config_and_the_suite_to_bootstrap():
    c = kvmcompile.compiler('CONFIG_X=y\nCONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"\n')
    assert (c.cc, c.package, c.version) == ("x86_64-linux-gnu-gcc-14", "gcc-14", "14.2.0-19")
    assert kvmcompile.compiler('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"').package == "gcc-12"
    with pytest.raises(KvmBuildError, match="only Debian's gcc"):
        kvmcompile.compiler('CONFIG_CC_VERSION_TEXT="Debian clang version 19.1.7 (3)"')
    with pytest.raises(KvmBuildError, match="no CONFIG_CC_VERSION_TEXT"):
        kvmcompile.compiler("CONFIG_X=y\n")
    assert [kvmcompile.base_suite(s) for s in ("trixie-backports", "bookworm", "experimental", "unstable")] == \
        ["trixie", "bookworm", "unstable", "unstable"]


# ---- Kconfig and the option checks -----------------------------------------------------------------------

KCONFIG = textwrap.dedent("""\
    # SPDX-License-Identifier: GPL-2.0
    menuconfig VIRTUALIZATION
    \tbool "Virtualization"
    \tdefault y

    if VIRTUALIZATION

    config KVM_X86
    \tdef_tristate KVM if (KVM_INTEL != n || KVM_AMD != n)
    \tselect KVM_COMMON

    config KVM
    \ttristate "Kernel-based Virtual Machine (KVM) support"
    \tdepends on X86_LOCAL_APIC

    config KVM_SW_PROTECTED_VM
    \tbool "Enable support for KVM software-protected VMs"
    \tdepends on EXPERT
    \tdepends on KVM_X86 && X86_64
    \tselect KVM_GENERIC_MEMORY_ATTRIBUTES
    \thelp
    \t  Enable support for KVM software-protected VMs. # not a comment
    \t  config NOT_A_SYMBOL (help text)

    config KVM_INTEL_PROVE_VE
    \tbool "Check that guests do not receive #VE exceptions"
    \tdepends on KVM_INTEL && EXPERT

    config X86_SGX_KVM
    \tbool "Software Guard eXtensions (SGX) Virtualization"
    \tdepends on X86_SGX && KVM_INTEL

    config KVM_PROVE_MMU
    \tbool "Prove KVM MMU correctness"
    \tdepends on DEBUG_KERNEL
    \tdepends on KVM_X86

    config KVM_XEN
    \tbool "Support for Xen hypercall interface"
    \tdepends on KVM_X86

    config KVM_MAX_NR_VCPUS
    \tint "Maximum number of vCPUs per KVM guest"
    \tdepends on KVM_X86
    \trange 1024 4096

    endif # VIRTUALIZATION

    config KVM_GENERIC_MEMORY_ATTRIBUTES
    \tbool
    """)

PACKAGED = textwrap.dedent("""\
    CONFIG_X86_64=y
    CONFIG_EXPERT=y
    CONFIG_DEBUG_KERNEL=y
    CONFIG_VIRTUALIZATION=y
    CONFIG_KVM_X86=m
    CONFIG_KVM=m
    CONFIG_KVM_INTEL=m
    CONFIG_KVM_AMD=m
    # CONFIG_KVM_SW_PROTECTED_VM is not set
    # CONFIG_KVM_INTEL_PROVE_VE is not set
    CONFIG_X86_SGX=y
    # CONFIG_X86_SGX_KVM is not set
    # CONFIG_KVM_PROVE_MMU is not set
    CONFIG_KVM_XEN=y
    CONFIG_KVM_MAX_NR_VCPUS=4096
    CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES=y
    """)


@pytest.fixture
def syms() -> dict[str, kconfig.Symbol]:
    return parse_kconfig(KCONFIG, "arch/x86/kvm/Kconfig")


def test_parse_kconfig(syms):
    sw = syms["KVM_SW_PROTECTED_VM"]
    assert (sw.type, sw.prompt) == ("bool", True)
    assert sw.depends == ["VIRTUALIZATION", "EXPERT", "KVM_X86 && X86_64"]  # the enclosing `if` included
    assert sw.selects == [("KVM_GENERIC_MEMORY_ATTRIBUTES", None)]
    assert "NOT_A_SYMBOL" not in syms  # help text is not parsed as entries
    assert syms["KVM_INTEL_PROVE_VE"].prompt  # a '#' inside the prompt is not a comment
    assert (syms["KVM_X86"].type, syms["KVM_X86"].prompt) == ("tristate", False)
    assert syms["KVM_GENERIC_MEMORY_ATTRIBUTES"].depends == []  # after endif
    assert syms["KVM_MAX_NR_VCPUS"].type == "int"


def test_evaluate_tristate_logic():
    cfg = parse_config(PACKAGED)
    assert cfg["KVM"] == "m" and cfg["KVM_PROVE_MMU"] == "n" and cfg["KVM_MAX_NR_VCPUS"] == "4096"
    assert evaluate("KVM_X86 && X86_64", cfg) == 1  # m && y = m
    assert evaluate("KVM_INTEL != n || KVM_AMD != n", cfg) == 2
    assert evaluate("!(KVM_AMD=y && CRYPTO_DEV_CCP_DD=m)", cfg) == 2
    assert evaluate("X86_SGX && !KVM_PROVE_MMU", cfg) == 2 and evaluate("INTEL_TDX_HOST", cfg) == 0
    with pytest.raises(ConfigError):
        evaluate("KVM && (X86_64", cfg)


def test_validate_accepts_a_kvm_only_option(syms):
    refs = {"KVM_PROVE_MMU": ["arch/x86/include/asm/kvm_host.h"], "KVM_SW_PROTECTED_VM": []}
    ok = validate({"KVM_SW_PROTECTED_VM": "y", "KVM_PROVE_MMU": "y"}, syms, parse_config(PACKAGED), refs)
    assert ok.options == {"KVM_PROVE_MMU": "y", "KVM_SW_PROTECTED_VM": "y"}
    # a public header that reads it is compiled into the rebuilt modules: a note, not a refusal
    assert len(ok.notes) == 1 and "kvm_host.h" in ok.notes[0]


@pytest.mark.parametrize("opts,packaged_edit,match", [
    ({"KVM_SW_PROTECTD_VM": "y"}, None, "not a KVM option.*did you mean KVM_SW_PROTECTED_VM"),
    ({"KVM": "y"}, None, "a tristate decides which modules exist"),
    ({"KVM_GENERIC_MEMORY_ATTRIBUTES": "y"}, None, "no prompt.*KVM_SW_PROTECTED_VM"),
    ({"KVM_SW_PROTECTED_VM": "m"}, None, "a bool takes y or n"),
    ({"KVM_XEN": "y"}, None, "already y in the packaged kernel: nothing to rebuild"),
    ({"KVM_XEN": "n"}, None, "autoconf.h sets CONFIG_KVM_XEN=y"),
    ({"KVM_MAX_NR_VCPUS": "1024"}, None, "autoconf.h sets CONFIG_KVM_MAX_NR_VCPUS=4096"),
    ({"KVM_PROVE_MMU": "y"}, ("CONFIG_DEBUG_KERNEL=y", "# CONFIG_DEBUG_KERNEL is not set"),
     r"depends on DEBUG_KERNEL, which the packaged kernel does not satisfy \(DEBUG_KERNEL=n\)"),
    ({"KVM_SW_PROTECTED_VM": "y"}, ("CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES=y", ""),
     "selects KVM_GENERIC_MEMORY_ATTRIBUTES, which is off in the packaged kernel"),
    ({"X86_SGX_KVM": "y"}, None, "also used outside arch/x86/kvm and virt/kvm.*feat_ctl.c"),
])
def test_validate_refuses_with_the_reason(syms, opts, packaged_edit, match):
    text = PACKAGED.replace(*packaged_edit) if packaged_edit else PACKAGED
    refs = {"X86_SGX_KVM": ["arch/x86/include/asm/sgx.h", "arch/x86/kernel/cpu/feat_ctl.c"]}
    with pytest.raises(ConfigError, match=match):
        validate(opts, syms, parse_config(text), refs)


def test_validate_lists_every_refusal_at_once(syms):
    with pytest.raises(ConfigError) as e:
        validate({"KVM_XEN": "y", "KVM": "y", "NOPE": "y"}, syms, parse_config(PACKAGED), {})
    assert str(e.value).count("\n  ") == 3


# 6.12's layout: KVM_SW_PROTECTED_VM selects nothing itself; KVM_X86 selects KVM_GENERIC_PRIVATE_MEM when it is on
KCONFIG_612 = textwrap.dedent("""\
    config KVM_X86
    \tdef_tristate KVM if (KVM_INTEL != n || KVM_AMD != n)
    \tselect KVM_COMMON
    \tselect HAVE_KVM_PM_NOTIFIER if PM
    \tselect KVM_GENERIC_PRIVATE_MEM if KVM_SW_PROTECTED_VM

    config KVM
    \ttristate "Kernel-based Virtual Machine (KVM) support"

    config KVM_SW_PROTECTED_VM
    \tbool "Enable support for KVM software-protected VMs"
    \tdepends on EXPERT
    \tdepends on KVM && X86_64

    config KVM_GENERIC_PRIVATE_MEM
    \tselect KVM_GENERIC_MEMORY_ATTRIBUTES
    \tbool
    """)


def test_validate_6_12_layout_checks_what_another_symbol_selects_because_of_the_option():
    syms = parse_kconfig(KCONFIG_612, "arch/x86/kvm/Kconfig")
    assert syms["KVM_X86"].selects[-1] == ("KVM_GENERIC_PRIVATE_MEM", "KVM_SW_PROTECTED_VM")
    assert syms["KVM_SW_PROTECTED_VM"].selects == []
    packaged = PACKAGED + "CONFIG_KVM_GENERIC_PRIVATE_MEM=y\n"  # Debian's 6.12: on (KVM_AMD_SEV selects it)
    assert validate({"KVM_SW_PROTECTED_VM": "y"}, syms, parse_config(packaged), {}).options == \
        {"KVM_SW_PROTECTED_VM": "y"}
    # off in the packaged kernel: KVM_X86 would select it only because of the option -> refused
    match = (r"makes KVM_X86 select KVM_GENERIC_PRIVATE_MEM \(`select KVM_GENERIC_PRIVATE_MEM if "
             r"KVM_SW_PROTECTED_VM` in KVM_X86\), which is off")
    with pytest.raises(ConfigError, match=match):
        validate({"KVM_SW_PROTECTED_VM": "y"}, syms, parse_config(PACKAGED), {})
    # a condition already true in the packaged kernel (PM) is not the option's doing
    assert kconfig._selected_because("KVM_SW_PROTECTED_VM", syms, {"PM": "y", "KVM_X86": "m"},
                                     {"PM": "y", "KVM_X86": "m", "KVM_SW_PROTECTED_VM": "y"}) == \
        [("KVM_X86", "KVM_GENERIC_PRIVATE_MEM", "KVM_SW_PROTECTED_VM")]
    # KVM_X86 off: nothing selects anything
    assert kconfig._selected_because("KVM_SW_PROTECTED_VM", syms, {}, {"KVM_SW_PROTECTED_VM": "y"}) == []


def test_config_with_options():
    out = kconfig.with_options(PACKAGED, {"KVM_SW_PROTECTED_VM": "y", "KVM_NEW_THING": "y"})
    cfg = parse_config(out)
    assert cfg["KVM_SW_PROTECTED_VM"] == "y" and cfg["KVM_NEW_THING"] == "y" and cfg["KVM_XEN"] == "y"
    assert out.count("KVM_SW_PROTECTED_VM") == 1  # replaced in place


# ---- the chroot's packages: per-version differences ----------------------------------------------------

# linux-headers-VER-amd64's Depends, as the archive has them
DEPENDS_612 = ("linux-base (>= 4.12~), linux-headers-6.12.117+deb13-common (= 6.12.117-1), "
               "linux-image-6.12.117+deb13-amd64 (= 6.12.117-1) | linux-image-6.12.117+deb13-amd64-unsigned "
               "(= 6.12.117-1), linux-kbuild-6.12.117+deb13, gcc-14")
DEPENDS_734 = ("gcc-14-for-host, linux-base (>= 4.12~), linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
               "linux-headers-7.3.4+deb13-common (= 7.3.4-1~bpo13+1), linux-kbuild-7.3.4+deb13")


def test_compiler_of_each_packaged_kernel():
    texts = {"6.12.117": "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0",
             "7.2.13": "x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0",  # unstable's: an unstable chroot
             "6.1.176": "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"}
    got = {v: kvmcompile.compiler(f'CONFIG_CC_VERSION_TEXT="{t}"') for v, t in texts.items()}
    assert (got["7.2.13"].cc, got["7.2.13"].package, got["7.2.13"].version) == \
        ("x86_64-linux-gnu-gcc-16", "gcc-16", "16.2.0-4")
    assert (got["6.1.176"].cc, got["6.1.176"].package, got["6.1.176"].version) == \
        ("gcc-12", "gcc-12", "12.2.0-14+deb12u1")


def test_6x_headers_depend_on_the_image_which_a_placeholder_stands_in_for():
    assert kvmcompile.image_dependencies(DEPENDS_612, "6.12.117-1") == \
        [("linux-image-6.12.117+deb13-amd64", "6.12.117-1")]
    assert kvmcompile.image_dependencies(DEPENDS_734, "7.3.4-1~bpo13+1") == []  # 7.x: linux-base-VER instead
    assert kvmcompile.image_dependencies("linux-image-6.1.0-50-amd64, linux-kbuild-6.1", "6.1.176-1") == \
        [("linux-image-6.1.0-50-amd64", "6.1.176-1")]


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="no dpkg-deb")
def test_placeholder_deb_is_an_empty_package_of_that_name_and_version(tmp_path):
    import subprocess

    log = StepLog(tmp_path / "build.log", lambda _: None)
    p = kvmcompile.placeholder_deb("linux-image-6.12.117+deb13-amd64", "6.12.117-1", tmp_path, log)
    log.close()
    assert p.name == "linux-image-6.12.117+deb13-amd64_6.12.117-1_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "--show", "--showformat", "${Package} ${Version} ${Architecture}", str(p)],
                            capture_output=True, text=True, check=True).stdout
    assert fields == "linux-image-6.12.117+deb13-amd64 6.12.117-1 amd64"
    assert subprocess.run(["dpkg-deb", "--contents", str(p)], capture_output=True, text=True,
                          check=True).stdout.count("\n") == 1  # ./ only
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".placeholder")] == []


def test_the_chroots_apt_follows_the_hosts_release_date_checks():
    dump = 'APT "";\nAcquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\nAcquire::Retries "3";\n'
    assert kvmcompile.host_apt_freshness(dump) == ["-o", "Acquire::Check-Valid-Until=false",
                                                   "-o", "Acquire::Check-Date=false"]
    assert kvmcompile.host_apt_freshness('Acquire::Check-Valid-Until "true";\n') == []
    assert kvmcompile.host_apt_freshness('APT "";\n') == []


def test_an_expired_release_file_is_named_in_the_packages_failure(tmp_path, monkeypatch):
    line = ("E: Release file for http://deb.debian.org/debian/dists/unstable/InRelease is expired "
            "(invalid since 29d 0h 1min 54s). Updates for this repository will not be applied.")
    assert kvmcompile.expired_release(["Reading package lists...", line]) == \
        "the Release file http://deb.debian.org/debian/dists/unstable/InRelease expired 29d 0h 1min 54s ago"
    assert kvmcompile.expired_release(["E: Unable to locate package gcc-16"]) is None

    from harness.qemu import debian
    from harness.qemu.buildenv import Chroot

    k = debian.Kernel("7.2.13+deb14-amd64", "linux-image-7.2.13+deb14-amd64", "7.2.13-1", "7.2.13", ())

    class Archive:
        def _apt(self, tool, *args, **kw):
            if args[0] == "show":
                return "Package: linux-headers-7.2.13+deb14-amd64\nDepends: linux-kbuild-7.2.13+deb14\n"
            (kw["cwd"] / f"{args[1].split('=')[0]}_7.2.13-1_amd64.deb").write_bytes(b"")
            return ""

        def mirror(self):
            return "http://deb.debian.org/debian"

    class FakeChroot(Chroot):
        def run(self, step, argv, log, timeout, cwd="/", env=None, nice=10):
            if argv[-1] == "update":  # what apt in an unstable chroot says of a stale mirror
                log.run(step, ["sh", "-c", f"echo '{line}'; exit 100"], timeout=30, what=" ".join(argv))
            raise AssertionError(argv)

    monkeypatch.setattr(kvmcompile, "host_apt_freshness", lambda: [])
    ch = FakeChroot(tmp_path / "unstable", "unstable")
    comp = kvmcompile.compiler('CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0"')
    log = StepLog(tmp_path / "build.log", lambda _: None)
    with pytest.raises(BuildStepError) as e:
        kvmcompile.install_packages(Archive(), ch, k, comp, log)
    log.close()
    msg = str(e.value)
    assert msg.startswith("step 'packages' failed: the Release file http://deb.debian.org/debian/dists/unstable/"
                          "InRelease expired 29d 0h 1min 54s ago: http://deb.debian.org/debian serves an "
                          "out-of-date unstable (a frozen mirror or snapshot)")
    assert 'Acquire::Check-Valid-Until "false"' in msg


# ---- the Makefile rewrite --------------------------------------------------------------------------------

MAKEFILE = textwrap.dedent("""\
    ccflags-y += -I $(srctree)/arch/x86/kvm
    ccflags-$(CONFIG_KVM_WERROR) += -Werror

    include $(srctree)/virt/kvm/Makefile.kvm

    kvm-y += x86.o
    obj-$(CONFIG_KVM_X86) += kvm.o
    exports_grep_trailer := -nrw $(srctree)/virt/kvm $(srctree)/arch/x86/kvm
    """)


def test_rewrite_makefile_points_at_the_copies_and_defines_the_options():
    out = kvmcompile.rewrite_makefile(MAKEFILE, {"KVM_SW_PROTECTED_VM": "y", "KVM_WERROR": "y"},
                                    x86="/kh/b/arch/x86/kvm", virt="/kh/b/virt/kvm",
                                    trace_include="/kh/b/kh-include/trace")
    assert "$(srctree)" not in out
    assert "include $(KH_VIRT_KVM)/Makefile.kvm" in out and "-I $(KH_X86_KVM)" in out
    assert "KH_X86_KVM := /kh/b/arch/x86/kvm" in out and "KH_VIRT_KVM := /kh/b/virt/kvm" in out
    # IS_ENABLED()/#ifdef in C and asm, and the Makefile's own ccflags-$(CONFIG_...) logic
    assert "ccflags-y += -DCONFIG_KVM_SW_PROTECTED_VM=1" in out and "asflags-y += -DCONFIG_KVM_SW_PROTECTED_VM=1" in out
    assert "CONFIG_KVM_WERROR := y" in out
    assert "ccflags-y += -I/kh/b/kh-include/trace" in out  # trace.h's ../../arch/x86/kvm lands on the copy
    assert out.index("CONFIG_KVM_WERROR := y") < out.index("ccflags-$(CONFIG_KVM_WERROR)")  # set before use


def test_rewrite_makefile_refuses_an_unknown_layout():
    with pytest.raises(KvmBuildError, match="layout"):
        kvmcompile.rewrite_makefile("obj-m += kvm.o\n", {"X": "y"}, x86="/a", virt="/b", trace_include="/c")


# ---- the composed modules tree ----------------------------------------------------------------------------

def test_composed_tree_puts_the_built_kvm_modules_in_place_of_the_packaged(tmp_path):
    pkg = tmp_path / "kernels/debian/7.3.4+deb13-amd64/root/usr/lib/modules/7.3.4+deb13-amd64"
    for rel in ("kernel/arch/x86/kvm/kvm.ko.xz", "kernel/arch/x86/kvm/kvm-amd.ko.xz",
                "kernel/arch/x86/kvm/kvm-intel.ko.xz", "kernel/virt/lib/irqbypass.ko.xz",
                "kernel/drivers/crypto/ccp/ccp.ko.xz", "kernel/drivers/gpu/drm/i915/kvmgt.ko.xz",
                "modules.order", "vmlinuz", "config"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(b"packaged " + rel.encode())
    build = tmp_path / "kvm-builds/KEY"
    built = {}
    for name, f in kvmcompile.KO_FILES.items():
        (build / "ko").mkdir(parents=True, exist_ok=True)
        (build / "ko" / f).write_bytes(b"built " + f.encode())
        built[name] = build / "ko" / f
    dest = kvmcompile.compose_tree(pkg, pkg / "vmlinuz", "CONFIG_KVM_SW_PROTECTED_VM=y\n", built, build / "modules")
    tree = ModuleTree.scan(dest)
    assert {n: tree.files[n].name for n in ("kvm", "kvm_amd", "kvm_intel")} == \
        {"kvm": "kvm.ko", "kvm_amd": "kvm-amd.ko", "kvm_intel": "kvm-intel.ko"}
    assert tree.files["kvm"].parent == dest / "kernel/arch/x86/kvm"  # where the packaged one was
    assert tree.files["kvm"].read_bytes() == b"built kvm.ko"
    assert tree.files["irqbypass"].read_bytes() == b"packaged kernel/virt/lib/irqbypass.ko.xz"
    assert "kvmgt" in tree.files  # every other module still there (a symlink to the packaged one)
    assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in tree.files.values())
    # the runner finds the config beside the image, so the matrix and known issues see the option
    assert (dest / "vmlinuz").read_bytes() == b"packaged vmlinuz"
    assert runner.kernel_config(dest / "vmlinuz") == {"CONFIG_KVM_SW_PROTECTED_VM": "y"}
    # composing again replaces the tree (no .new left over)
    kvmcompile.compose_tree(pkg, pkg / "vmlinuz", "", built, build / "modules")
    assert not (build / "modules.new").exists() and (build / "modules/config").read_text() == ""


# ---- the step log and the lock -------------------------------------------------------------------------

def test_a_failed_step_names_itself_the_log_tail_and_the_log(tmp_path):
    said = []
    log = StepLog(tmp_path / "build.log", said.append)
    log.progress("[6/7] build: make")
    with pytest.raises(BuildStepError) as e:
        log.run("build", ["sh", "-c", "echo compiling; echo 'error: objtool: it broke' >&2; exit 2"], timeout=30,
                what="make modules", where=" (in the trixie chroot)")
    msg = str(e.value)
    assert msg.startswith("step 'build' failed: `make modules` (in the trixie chroot) exited 2")
    assert "    error: objtool: it broke" in msg and f"full log: {tmp_path / 'build.log'}" in msg
    assert said == ["kvm-build: [6/7] build: make"]
    t = time.monotonic()
    with pytest.raises(BuildStepError, match="did not finish within 1 s"):
        log.run("build", ["sleep", "30"], timeout=1)
    assert time.monotonic() - t < 20
    log.close()


def test_the_lock_makes_a_second_build_of_the_key_wait(tmp_path):
    said = []
    with Lock(tmp_path / "k.lock", "the build of X", said.append):
        with pytest.raises(HarnessError, match="still locked"), \
                Lock(tmp_path / "k.lock", "the build of X", said.append, timeout=0.5):
            pass
        assert said and "is busy (pid " in said[0]
    with Lock(tmp_path / "k.lock", "the build of X", said.append, timeout=0.5):  # free again
        pass


def test_a_cached_build_is_a_hit_without_building(tmp_path, monkeypatch):
    from harness.qemu import debian

    k = debian.Kernel("7.3.4+deb13-amd64", "linux-image-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1", "7.3.4", ())

    class Archive:  # no network: what build() asks of the archive
        fetched = []

        def resolve(self, name):
            assert name in ("debian:7.3.4", "debian:7.3")
            return k

        def fetch(self, kernel, log=print):
            self.fetched.append(kernel)

    monkeypatch.setattr(kvmbuild, "ROOT", tmp_path)
    d = tmp_path / cache_key(k.version, {"KVM_SW_PROTECTED_VM": "y"})
    (d / "ko").mkdir(parents=True)
    (d / "modules").mkdir()
    for f in kvmcompile.KO_FILES.values():
        (d / "ko" / f).write_bytes(b"x")
    (d / "modules" / "vmlinuz").write_bytes(b"k")
    (d / "build.json").write_text(json.dumps({"name": "debian:7.3.4+KVM_SW_PROTECTED_VM=y",
                                              "modules": {f: 1 for f in kvmcompile.KO_FILES.values()}}))
    said: list[str] = []
    t = time.monotonic()
    b = kvmbuild.build("debian:7.3+KVM_SW_PROTECTED_VM=y", say=said.append, archive=Archive())
    assert time.monotonic() - t < 1.0
    assert b.hit and b.name == "debian:7.3+KVM_SW_PROTECTED_VM=y" and b.modules == d / "modules"
    assert b.vmlinuz == d / "modules" / "vmlinuz" and Archive.fetched == [k]  # the packaged kernel kept fetched
    assert "cached in" in said[0]
    assert kvmbuild.cached()[0]["name"] == "debian:7.3.4+KVM_SW_PROTECTED_VM=y"
    with pytest.raises(KvmBuildError, match="at least one option"):
        kvmbuild.build("debian:7.3.4", archive=Archive())
    # an exact version with a finished build is found without apt (no resolve(): lists may be stale)
    meta = json.loads((d / "build.json").read_text())
    meta.update(kernel={"name": "debian:7.3.4", "abi": k.abi, "version": k.version},
                options={"KVM_SW_PROTECTED_VM": "y"})
    (d / "build.json").write_text(json.dumps(meta))

    class Offline(Archive):
        cache = tmp_path / "kernels"

        def resolve(self, name):
            raise AssertionError("an exact cached build needs no package lists")

    for name in ("debian:7.3.4+KVM_SW_PROTECTED_VM=y", "debian:7.3.4+deb13+CONFIG_KVM_SW_PROTECTED_VM=y"):
        assert kvmbuild.build(name, say=said.append, archive=Offline()).modules == d / "modules"


# ---- the command line ------------------------------------------------------------------------------------

def test_cli_build_kvm_refuses_a_malformed_option_before_any_download(capsys):
    from harness.__main__ import main

    assert main(["kernel", "build-kvm", "debian:7.3.4", "--config", "kvm_sw_protected_vm"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_resolve_kernel_builds_a_rebuild_name(monkeypatch, tmp_path):
    from harness.cli import kernel as kernel_cli

    seen = []
    built = kvmbuild.Built("debian:7.3.4+KVM_SW_PROTECTED_VM=y", "k", tmp_path, tmp_path / "vmlinuz", tmp_path)
    monkeypatch.setattr(kvmbuild, "ensure", lambda name, say=print: seen.append(name) or built)
    assert kernel_cli.resolve_kernel("debian:7.3.4+KVM_SW_PROTECTED_VM=y") == (tmp_path / "vmlinuz", tmp_path)
    assert kernel_cli.resolve_kernel("debian:7.3.4+KVM_SW_PROTECTED_VM=y", Path("/m"))[1] == Path("/m")
    assert seen == ["debian:7.3.4+KVM_SW_PROTECTED_VM=y"] * 2
    assert kernel_cli.resolve_kernel("/some/bzImage") == (Path("/some/bzImage"), None)


# ---- a real boot of the rebuilt kernel ---------------------------------------------------------------

def _sw_protected_build() -> dict | None:
    for b in kvmbuild.cached():
        if (b.get("options") == {"KVM_SW_PROTECTED_VM": "y"} and b["kernel"]["name"] == "debian:7.3.4"
                and (Path(b["dir"]) / "modules" / "vmlinuz").exists()):
            return b
    return None


def _real_skip_reason() -> str | None:
    if not shutil.which(runner.QEMU):
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    if not initramfs.find_busybox():
        return "busybox missing (apt-get install busybox-static)"
    if _sw_protected_build() is None:
        return ("debian:7.3.4+KVM_SW_PROTECTED_VM=y is not built: `python -m harness kernel build-kvm debian:7.3.4 "
                "--config KVM_SW_PROTECTED_VM=y` (or `make kvm-build`), about 5 min the first time")
    return None


@pytest.mark.real_boot(seconds=190)
@pytest.mark.skipif(_real_skip_reason() is not None, reason=str(_real_skip_reason()))
def test_real_rebuilt_kvm_offers_sw_protected_vms():
    b = _sw_protected_build()
    assert b is not None
    mods = Path(b["dir"]) / "modules"
    case = REPO / ".cache" / "kernels" / "selftest" / f"test_sw_protected_{os.getpid()}.py"  # git-ignored
    case.parent.mkdir(parents=True, exist_ok=True)
    case.write_text(textwrap.dedent(f"""
        import subprocess, sys
        from harness.kvm.caps import Cap, VmType

        def test_vm_types_has_sw_protected(kvm):
            info = subprocess.run([sys.executable, "-m", "harness", "info"], capture_output=True, text=True,
                                  timeout=120, cwd={str(REPO)!r}).stdout
            print(next(ln for ln in info.splitlines() if ln.startswith("vm types:")))
            mask = kvm.check_extension(Cap.VM_TYPES)
            print(f"KVM_CAP_VM_TYPES {{mask:#x}}")
            assert mask & (1 << VmType.SW_PROTECTED), mask
            kvm.create_vm(VmType.SW_PROTECTED).close()
    """))
    out = io.StringIO()
    try:
        res = runner.run(runner.RunConfig(kernel=mods / "vmlinuz", modules=mods, boot_timeout=120.0, timeout=600.0,
                                          pytest_args=[str(case.relative_to(REPO)), "-s", "-p", "no:cacheprovider"]),
                         out)
    finally:
        case.unlink()
    runner.report(res, out)
    text = out.getvalue()
    sys.stdout.write(text[-3000:])
    assert (res.code, res.outcome) == (runner.GOOD, "verdict"), res.reason
    assert "vm types:      DEFAULT, SW_PROTECTED" in text and "KVM_CAP_VM_TYPES 0x3" in text
    assert f"modules from {mods}" in text
