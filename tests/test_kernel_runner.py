"""The QEMU kernel runner (harness/qemu, `python -m harness kernel`).

Pure logic first (sentinels, exit-code mapping, command lines, the cpio, module order), then the run
loop against a fake QEMU (a script: boots, hangs, crashes on cue; fast, no emulator), then real boots
of Debian's packaged 6.1 kernel under QEMU. The real boots need qemu-system-x86, busybox-static and
the kernel in the cache (`make kernel-fetch`); without them they skip saying which. They run in
`make test` when the kernel is cached (about 1-2 min of the run) and on their own in `make kernel-smoke`.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.qemu import image, initramfs, runner
from harness.qemu.modules import ModuleError, ModuleTree, modname
from harness.qemu.runner import BAD, GOOD, SKIP, GuestProgress, RunConfig, parse_sentinel, verdict
from harness.report.ktap_parser import parse_ktap

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / ".cache" / "kernels" / "debian" / "current"


# ---- sentinels and the exit-code mapping ------------------------------------------------------------

def test_parse_sentinel_kinds_and_interleaved_printk():
    n = "0123abcd"
    assert parse_sentinel(f"@@KH-BOOTED {n}@@ uptime 2.31", n) == ("BOOTED", None)
    assert parse_sentinel(f"@@KH-RESULT {n} 1@@", n) == ("RESULT", 1)
    assert parse_sentinel(f"@@KH-EXIT {n} 125@@", n) == ("EXIT", 125)
    # printk can land on the same console line as the sentinel
    assert parse_sentinel(f"[   12.5] kvm: something@@KH-RESULT {n} 0@@", n) == ("RESULT", 0)


def test_parse_sentinel_ignores_other_nonces_and_malformed_lines():
    assert parse_sentinel("@@KH-RESULT ffff 0@@", "0123abcd") is None  # e.g. a nested run's output
    assert parse_sentinel("@@KH-RESULT 0123abcd@@", "0123abcd") is None  # a RESULT needs its number
    assert parse_sentinel("bisect: 3 passed -> good, exit 0", "0123abcd") is None


@pytest.mark.parametrize("result", [GOOD, BAD, SKIP])
def test_verdict_is_the_inner_result(result):
    p = GuestProgress(booted=True, result=result, exit_rc=result, why="bisect: 0 passed ... exit 125")
    code, outcome, reason = verdict(p, qemu_rc=0, timed_out=False)
    assert (code, outcome) == (result, "verdict") and reason.endswith("(bisect: 0 passed ... exit 125)")


def test_verdict_maps_everything_else_to_bisect_codes():
    booted = GuestProgress(booted=True)
    assert verdict(GuestProgress(booted=True, result=3), qemu_rc=0, timed_out=False)[:2] == (SKIP, "harness-died")
    assert verdict(GuestProgress(booted=True, exit_rc=1), qemu_rc=0, timed_out=False)[:2] == (SKIP, "harness-died")
    # never reached /init: the --boot-failure code, whether QEMU quit or the boot bound expired
    assert verdict(GuestProgress(), qemu_rc=1, timed_out=False)[:2] == (SKIP, "boot-failure")
    assert verdict(GuestProgress(), qemu_rc=None, timed_out=True, boot_failure=BAD)[:2] == (BAD, "boot-failure")
    # died after boot without a verdict (a panic resets the guest, -no-reboot ends QEMU): --crash
    assert verdict(booted, qemu_rc=0, timed_out=False)[:2] == (BAD, "crash")
    assert verdict(booted, qemu_rc=0, timed_out=False, crash=SKIP)[:2] == (SKIP, "crash")
    # overall timeout after boot: slow or hung cannot be told apart, so cannot test
    assert verdict(booted, qemu_rc=None, timed_out=True)[:2] == (SKIP, "timeout")
    assert verdict(booted, qemu_rc=0, timed_out=False, killed=True)[:2] == (SKIP, "killed")


# ---- command lines ---------------------------------------------------------------------------------

def _cmd(**kw):
    args = dict(qemu="qemu-system-x86_64", accel="tcg", machine="microvm", kernel=Path("/k/vmlinux"),
                initrd=Path("/t/initramfs.cpio"), cpus=2, mem="2G", cmdline="console=ttyS0", phys_bits=48)
    args.update(kw)
    return runner.qemu_command(**args)


def _opt(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_qemu_command_tcg_microvm():
    cmd = _cmd()
    assert _opt(cmd, "-accel") == ["tcg"] and _opt(cmd, "-cpu") == ["max,phys-bits=48"]
    assert _opt(cmd, "-M") == ["microvm"] and _opt(cmd, "-smp") == ["2"] and _opt(cmd, "-m") == ["2G"]
    assert "-no-reboot" in cmd and _opt(cmd, "-serial") == ["stdio"]
    assert _opt(cmd, "-kernel") == ["/k/vmlinux"] and _opt(cmd, "-initrd") == ["/t/initramfs.cpio"]
    (fsdev,) = _opt(cmd, "-fsdev")
    assert "path=/," in fsdev and "readonly=on" in fsdev and "id=hostroot" in fsdev
    assert _opt(cmd, "-device") == ["virtio-9p-device,fsdev=hostroot,mount_tag=hostroot"]


def test_qemu_command_kvm_q35():
    cmd = _cmd(accel="kvm", machine="q35", phys_bits=None)
    assert _opt(cmd, "-accel") == ["kvm"] and _opt(cmd, "-cpu") == ["host"]
    assert _opt(cmd, "-device") == ["virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]


@pytest.mark.parametrize("mem,cpus", [("lots", 2), ("2G", 0)])
def test_qemu_command_rejects_bad_sizes(mem, cpus):
    with pytest.raises(ValueError):
        _cmd(mem=mem, cpus=cpus)


def test_kernel_cmdline():
    tcg = runner.kernel_cmdline("tcg", "oops=panic", 2596124).split()
    assert tcg[0] == "console=ttyS0" and "panic=-1" in tcg and "reboot=t" in tcg
    assert "tsc_early_khz=2596124" in tcg and tcg[-1] == "oops=panic"
    assert "tsc_early_khz" not in runner.kernel_cmdline("kvm", "", 2596124)  # kvmclock there
    assert "tsc_early_khz" not in runner.kernel_cmdline("tcg", "", None)


CMA_CONFIG = {"CONFIG_CMA": "y", "CONFIG_HUGETLB_PAGE": "y"}


@pytest.mark.parametrize(("requested", "mem", "config", "append", "want"), [
    ("auto", "6G", CMA_CONFIG, "", "3G"),  # the default guest: two 1 GiB pages and a range to spare
    ("auto", "16G", CMA_CONFIG, "", "3G"),  # never more than that
    ("auto", "4G", CMA_CONFIG, "", "1G"),  # q35 puts 2G below 4 GiB: 4G has 2G above, 1G of it CMA
    ("auto", "5G", CMA_CONFIG, "", "2G"),
    ("auto", "2G", CMA_CONFIG, "", None),  # nothing above 4 GiB: the 1 GiB cases skip, saying so
    ("auto", "6G", {"CONFIG_HUGETLB_PAGE": "y"}, "", None),
    ("auto", "6G", {}, "", None),  # config unknown
    ("auto", "6G", CMA_CONFIG, "quiet hugetlb_cma=1G", None),  # the user's own wins
    ("off", "6G", CMA_CONFIG, "", None),
    ("3G", "2G", {}, "", "3G"),  # explicit: as given
])
def test_choose_hugetlb_cma(requested, mem, config, append, want):
    got, why = runner.choose_hugetlb_cma(requested, mem, config, append)
    assert got == want and why
    if want is None and requested == "auto" and config:
        assert ("--mem" in why) == (mem == "2G")


@pytest.mark.parametrize("bad", ["lots", "1536M"])
def test_hugetlb_cma_must_be_whole_gib(bad):
    with pytest.raises(ValueError, match="whole GiB"):
        runner.choose_hugetlb_cma(bad, "6G", CMA_CONFIG, "")


def test_choose_accel_and_machine():
    assert runner.choose_accel("auto", None)[0] == "kvm"
    accel, why = runner.choose_accel("auto", "the host's KVM is kvm_pvm")
    assert accel == "tcg" and "kvm_pvm" in why
    assert runner.choose_accel("tcg", None)[0] == "tcg"
    assert runner.choose_machine("auto", {}) == "microvm"
    assert runner.choose_machine("auto", {"CONFIG_VIRTIO_MMIO": "m"}) == "microvm"
    assert runner.choose_machine("auto", {"CONFIG_VIRTIO_MMIO": "n"}) == "q35"
    assert runner.choose_machine("q35", {"CONFIG_VIRTIO_MMIO": "y"}) == "q35"


def test_default_cpus():
    assert runner.default_cpus("tcg") == 1  # TCG vCPUs share one thread; two only lose wakeups
    assert runner.default_cpus("kvm") == 2


def test_host_probes_are_plausible_here():
    bits, khz = runner.host_phys_bits(), runner.host_tsc_khz()
    assert bits is None or 32 <= bits <= 52
    assert khz is None or 100_000 < khz < 10_000_000
    assert runner.nested_available() is None or isinstance(runner.nested_available(), str)


def test_default_modules_dir_and_config(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "boot").mkdir(parents=True)
    (pkg / "lib/modules/6.1.0-9-amd64").mkdir(parents=True)
    k = pkg / "boot/vmlinuz-6.1.0-9-amd64"
    k.write_bytes(b"x")
    (pkg / "boot/config-6.1.0-9-amd64").write_text("CONFIG_VIRTIO_MMIO=m\n# CONFIG_PVH is not set\n")
    assert runner.default_modules_dir(k) == pkg / "lib/modules/6.1.0-9-amd64"
    assert runner.kernel_config(k) == {"CONFIG_VIRTIO_MMIO": "m", "CONFIG_PVH": "n"}
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "modules.order").write_text("")
    bz = tree / "arch/x86/boot/bzImage"
    bz.write_bytes(b"x")
    assert runner.default_modules_dir(bz) == tree
    assert runner.default_modules_dir(tmp_path / "elsewhere/bzImage") is None


# ---- the initramfs ----------------------------------------------------------------------------------

def _read_cpio(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (mode, rdevmajor, data), an independent newc reader."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, namesize = f[1], f[6], f[9], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, rmaj, body)


def test_initramfs_carries_init_busybox_args_and_console(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake busybox")
    spec = initramfs.GuestSpec(["cases/x.py", "-k", "a b"], "/work/main", "/venv/bin/python", "cafe01",
                               {"KVM_HARNESS_X": "1"})
    dest = tmp_path / "initramfs.cpio"
    assert initramfs.build(dest, spec, None, str(bb)) == {"base": [], "amd": [], "intel": []}
    files = _read_cpio(dest.read_bytes())
    mode, _, init = files["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and init.startswith(b"#!/bin/busybox sh")
    text = init.decode()
    assert "@@KH-BOOTED cafe01@@" in text and "@@KH-EXIT cafe01 $1@@" in text
    assert "chroot $R /venv/bin/python -B -m harness.qemu.guest" in text
    assert files["bin/busybox"][2] == bb.read_bytes()
    mode, major, _ = files["dev/console"]
    assert stat.S_ISCHR(mode) and major == 5
    assert json.loads(files["kh/args.json"][2]) == {"pytest_args": ["cases/x.py", "-k", "a b"], "cwd": "/work/main",
                                                     "nonce": "cafe01", "env": {"KVM_HARNESS_X": "1"}}


def _fake_ko(path: Path, depends: str) -> None:
    """A real ELF object with a .modinfo section: all that dependency resolution reads."""
    src = path.with_suffix(".c")
    src.write_text(f'const char mi[] __attribute__((section(".modinfo"))) = "license=GPL\\0depends={depends}";\n')
    subprocess.run(["gcc", "-c", "-o", str(path), str(src)], check=True, timeout=60)
    src.unlink()


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc (to make module-like ELF objects) is missing")
def test_module_load_order_from_modinfo(tmp_path):
    d = tmp_path / "kernel" / "arch"
    d.mkdir(parents=True)
    _fake_ko(d / "kvm-amd.ko", "kvm,ccp")
    _fake_ko(d / "kvm.ko", "irqbypass")
    _fake_ko(d / "irqbypass.ko", "")
    _fake_ko(d / "ccp.ko", "")
    xz = d / "ccp.ko"
    (d / "ccp.ko.xz").write_bytes(lzma.compress(xz.read_bytes()))
    xz.unlink()  # compressed modules are decompressed on the host
    tree = ModuleTree.scan(tmp_path)
    assert set(tree.files) == {"kvm_amd", "kvm", "irqbypass", "ccp"}
    order = tree.load_order(["kvm_amd", "virtio_mmio"])  # virtio_mmio absent: taken as built in
    assert order.index("irqbypass") < order.index("kvm") < order.index("kvm_amd")
    assert order.index("ccp") < order.index("kvm_amd") and "virtio_mmio" not in order
    assert tree.data("ccp").startswith(b"\x7fELF")
    assert modname("9pnet_virtio.ko.zst") == "9pnet_virtio"


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc (to make module-like ELF objects) is missing")
def test_module_dependency_cycle_is_named(tmp_path):
    _fake_ko(tmp_path / "a.ko", "b")
    _fake_ko(tmp_path / "b.ko", "a")
    with pytest.raises(ModuleError, match="cycle: a -> b -> a"):
        ModuleTree.scan(tmp_path).load_order(["a"])


def test_image_identify(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(8192))
    assert image.identify(garbage).kind == "unknown"
    bz = bytearray(8192)
    bz[0x202:0x206] = b"HdrS"
    (tmp_path / "bz").write_bytes(bytes(bz))
    assert image.identify(tmp_path / "bz").kind == "bzimage"
    assert image.extract_vmlinux(tmp_path / "bz", tmp_path / "out") is None  # no payload: boot it as is
    assert image.identify(Path(sys.executable).resolve()) == image.KernelImage(Path(sys.executable).resolve(),
                                                                                 "elf", False)


# ---- the run loop, against a fake QEMU -------------------------------------------------------------

FAKE_QEMU = r'''#!{python}
import os, re, sys, time
args = sys.argv[1:]
initrd = open(args[args.index("-initrd") + 1], "rb").read()
nonce = re.search(rb"@@KH-BOOTED ([0-9a-f]+)@@", initrd).group(1).decode()
open({record!r}, "w").write(f"{{os.getpid()}} {{args[args.index('-initrd') + 1]}}")
mode = {mode!r}
say = lambda s: (sys.stdout.write(s + "\r\n"), sys.stdout.flush())
if mode == "hang":
    time.sleep(120)
say("[    0.1] Linux version fake")
say(f"@@KH-BOOTED {{nonce}}@@ uptime 0.2")
if mode == "pass":
    say("1 passed in 0.1s"); say(f"@@KH-RESULT {{nonce}} 0@@"); say(f"@@KH-EXIT {{nonce}} 0@@")
elif mode == "fail":
    say("1 failed in 0.1s"); say(f"@@KH-RESULT {{nonce}} 1@@"); say(f"@@KH-EXIT {{nonce}} 1@@")
elif mode == "died":
    say("Traceback: ImportError"); say(f"@@KH-EXIT {{nonce}} 1@@")
elif mode == "panic":
    say("Kernel panic - not syncing: Fatal exception"); sys.exit(0)
elif mode == "linger":  # answers, then never powers off
    say(f"@@KH-RESULT {{nonce}} 0@@"); say(f"@@KH-EXIT {{nonce}} 0@@"); time.sleep(120)
elif mode == "slow":
    time.sleep(120)
'''


def _fake_run(tmp_path: Path, mode: str, monkeypatch, **kw) -> tuple[runner.RunResult, str, int, Path]:
    bb = tmp_path / "busybox"  # the fake never runs it: no busybox-static needed for these
    bb.write_bytes(b"\x7fELF")
    monkeypatch.setattr(initramfs, "find_busybox", lambda: str(bb))
    q = tmp_path / "qemu"
    record = tmp_path / "record"
    q.write_text(FAKE_QEMU.format(python=sys.executable, record=str(record), mode=mode))
    q.chmod(0o755)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not really a kernel")
    out = io.StringIO()
    kw = {"boot_timeout": 2.0, "timeout": 4.0, **kw}
    cfg = RunConfig(kernel=kernel, pytest_args=["cases/test_system.py"], qemu=str(q), **kw)
    res = runner.run(cfg, out)
    runner.report(res, out)
    pid, initrd = record.read_text().split()
    return res, out.getvalue(), int(pid), Path(initrd)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("mode,code,outcome", [("pass", GOOD, "verdict"), ("fail", BAD, "verdict"),
                                               ("died", SKIP, "harness-died"), ("panic", BAD, "crash")])
def test_fake_qemu_outcomes(tmp_path, monkeypatch, mode, code, outcome):
    res, out, pid, initrd = _fake_run(tmp_path, mode, monkeypatch)
    assert (res.code, res.outcome) == (code, outcome)
    assert "@@KH-BOOTED" in out and res.boot_seconds is not None  # streamed live, \r dropped
    assert "\r" not in out
    assert _gone(pid) and not initrd.parent.exists()  # QEMU reaped, temporary directory removed
    if mode == "panic":
        assert "Kernel panic - not syncing" in out  # the console tail is in the report


def test_fake_qemu_boot_timeout_kills_it(tmp_path, monkeypatch):
    t = time.monotonic()
    res, out, pid, initrd = _fake_run(tmp_path, "hang", monkeypatch, boot_failure=BAD)
    assert (res.code, res.outcome) == (BAD, "boot-failure") and res.boot_seconds is None
    assert time.monotonic() - t < 15 and _gone(pid) and not initrd.parent.exists()
    assert "did not reach /init within the boot timeout" in out


def test_fake_qemu_overall_timeout_is_cannot_test(tmp_path, monkeypatch):
    res, _, pid, _ = _fake_run(tmp_path, "slow", monkeypatch)
    assert (res.code, res.outcome) == (SKIP, "timeout") and res.total_seconds < 15
    assert _gone(pid)


def test_fake_qemu_lingering_after_verdict_is_killed(tmp_path, monkeypatch):
    t = time.monotonic()
    res, _, pid, _ = _fake_run(tmp_path, "linger", monkeypatch, timeout=60.0, grace=0.5)
    assert (res.code, res.outcome) == (GOOD, "verdict")  # the verdict stands; QEMU is stopped for it
    assert time.monotonic() - t < 10 and _gone(pid)


def test_sigterm_to_the_runner_kills_qemu_and_cleans_up(tmp_path):
    """make or git bisect interrupted: SIGTERM unwinds through the finally blocks."""
    record = tmp_path / "record"
    q = tmp_path / "qemu"
    q.write_text(FAKE_QEMU.format(python=sys.executable, record=str(record), mode="slow"))
    q.chmod(0o755)
    (tmp_path / "bzImage").write_bytes(b"x")
    (tmp_path / "busybox").write_bytes(b"\x7fELF")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from harness.qemu import initramfs, runner
        initramfs.find_busybox = lambda: {str(tmp_path / "busybox")!r}
        runner.run(runner.RunConfig(kernel=Path({str(tmp_path / "bzImage")!r}), pytest_args=["x"],
                                    qemu={str(q)!r}, timeout=60.0))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (record.exists() and record.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid, initrd = record.read_text().split()
        time.sleep(0.3)  # into the run loop
        p.terminate()
        assert p.wait(timeout=20) == 128 + 15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 5
    while not _gone(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(int(pid)) and not Path(initrd).parent.exists()


def test_cli_missing_kernel_is_the_boot_failure_code(tmp_path, capsys):
    from harness.__main__ import main

    assert main(["kernel", "--kernel", str(tmp_path / "nope"), "--", "cases/test_system.py"]) == SKIP
    assert main(["kernel", "--kernel", str(tmp_path / "nope"), "--boot-failure", "bad", "--", "x"]) == BAD
    out = capsys.readouterr().out
    assert "no such kernel image" in out and "-> bad, exit 1" in out


def test_cli_adds_no_cacheprovider(monkeypatch):
    seen = {}
    monkeypatch.setattr(runner, "run", lambda cfg, out: seen.setdefault("cfg", cfg) and runner.RunResult(
        GOOD, "verdict", "the cases passed"))
    from harness.__main__ import main

    assert main(["kernel", "--kernel", "/k", "--cpus", "1", "--mem", "1G", "--", "cases/a.py", "-x"]) == GOOD
    cfg = seen["cfg"]
    assert cfg.pytest_args == ["cases/a.py", "-x", "-p", "no:cacheprovider"]
    assert (cfg.cpus, cfg.mem, cfg.boot_failure) == (1, "1G", SKIP)
    # `run` may be named; the other actions parse their own options
    assert main(["kernel", "run", "--kernel", "/k", "--", "cases/b.py"]) == GOOD
    assert seen["cfg"].pytest_args[0] == "cases/a.py"  # setdefault: first call kept; the second ran too


def test_cli_refuses_known_unreliable_settings(tmp_path, capsys):
    # two vCPUs under TCG crash 7.3.4 guests in __schedule: refused with the reason unless --force
    from harness.__main__ import main

    k = tmp_path / "bzImage"
    k.write_bytes(b"\0" * 4096)
    if not shutil.which(runner.QEMU) or not initramfs.find_busybox():
        pytest.skip("needs qemu-system-x86_64 and busybox to get as far as choosing the accelerator")
    assert main(["kernel", "--kernel", str(k), "--accel", "tcg", "--cpus", "2", "--", "x"]) == SKIP
    assert "refused: 2 vCPUs under TCG" in capsys.readouterr().out


# ---- shards: pure parts ------------------------------------------------------------------------------

def test_shard_args_rewrite_result_files_and_add_the_shard():
    args = ["cases/", "--junitxml=/o/j.xml", "--ktap", "/o/k.txt", "-q", "-p", "no:cacheprovider"]
    out, files = runner.shard_args(args, 2, 3)
    assert out == ["--shard", "2/3", "cases/", "--junitxml=/o/j.xml.shard2", "--ktap", "/o/k.txt.shard2", "-q",
                   "-p", "no:cacheprovider"]
    assert files == [("junit", "/o/j.xml"), ("ktap", "/o/k.txt")]
    out, files = runner.shard_args(["--junit-xml", "r/j.xml", "--ktap=r/k.txt", "x.py"], 1, 2)
    assert out[2:] == ["--junit-xml", "r/j.xml.shard1", "--ktap=r/k.txt.shard1", "x.py"]
    assert files == [("junit", "r/j.xml"), ("ktap", "r/k.txt")]
    # --ktap alone, --ktap - and --ktap before an option are stdout: nothing to merge, left alone
    for args in (["--ktap", "x.py"][:1], ["--ktap", "-", "x.py"], ["--ktap", "-q"], ["--ktap=-"]):
        out, files = runner.shard_args(args, 1, 2)
        assert out[2:] == args and files == []
    out, files = runner.shard_args(["x.py", "--", "--ktap=k"], 1, 2)  # after --: positional
    assert out == ["--shard", "1/2", "x.py", "--", "--ktap=k"] and files == []


def test_result_files_give_the_folder_the_guest_writes_back(tmp_path):
    """Without RunConfig.outdir a guest wrote --junitxml into its own tmpfs, lost at power-off: the
    folder of the result files the args name is shared read-write (one folder per guest)."""
    assert runner.result_outdir(["cases/", "-q"], tmp_path) is None
    assert runner.result_outdir(["--junitxml=/o/j.xml", "--ktap", "/o/k.txt"], tmp_path) == Path("/o")
    assert runner.result_outdir(["--ktap=r/k.txt", "--junit-xml", "r/j.xml"], tmp_path) == tmp_path / "r"
    with pytest.raises(ValueError, match=r"in 2 folders .*same folder"):
        runner.result_outdir(["--junitxml=/o/j.xml", "--ktap=/p/k.txt"], tmp_path)
    res = runner.run(runner.RunConfig(kernel=tmp_path / "none", pytest_args=["--junitxml=/o/j", "--ktap=/p/k"]))
    assert (res.code, res.outcome) == (runner.ABORT, "setup") and "same folder" in res.reason


def _r(code, outcome="verdict", reason="", boot=None, total=1.0, cases=None):
    return runner.RunResult(code, outcome, reason or f"said {code}", boot, total, [f"tail {code}"], "",
                            shard_cases=cases)


@pytest.mark.parametrize("codes,want", [
    ([GOOD, GOOD], GOOD),
    ([GOOD, BAD], BAD),
    ([BAD, runner.ABORT], runner.ABORT),
    ([SKIP, BAD], BAD),
    ([GOOD, SKIP], GOOD),  # the guest's own 125 (its cases all skipped) beside a pass: a run with skips
    ([SKIP, SKIP], SKIP),
    ([GOOD, GOOD, SKIP], GOOD),
])
def test_combine_verdicts(codes, want):
    res = runner.combine([_r(c) for c in codes])
    assert res.code == want and res.outcome == "verdict" and len(res.shards) == len(codes)


def test_combine_names_the_deciding_shard_and_takes_its_console():
    res = runner.combine([_r(GOOD, reason="the cases passed", boot=30.0, total=50.0),
                          _r(BAD, "crash", "the guest died", boot=41.0, total=60.0),
                          _r(BAD, reason="a case failed", boot=35.0)])
    assert (res.code, res.outcome) == (BAD, "crash")  # of the two 1s, the one without a verdict shows why
    assert res.reason.startswith("shard 2/3: the guest died [crash]; shard 1/3: the cases passed; shard 3/3: ")
    assert res.console_tail == ["tail 1"] and res.boot_seconds == 41.0


def test_combine_outside_125_wins_over_a_pass_and_setup_over_a_failure():
    res = runner.combine([_r(GOOD), _r(SKIP, "timeout", "the overall timeout expired")])
    assert (res.code, res.outcome) == (SKIP, "timeout") and res.reason.startswith("shard 2/2: the overall")
    res = runner.combine([_r(BAD), _r(SKIP, "setup", "QEMU did not start")])
    assert (res.code, res.outcome) == (SKIP, "setup") and res.reason.startswith("shard 2/2: QEMU did not start")
    res = runner.combine([_r(BAD), _r(SKIP, "stopped", "stopped with the run")])
    assert res.code == BAD


def test_combine_a_shard_without_cases_does_not_count():
    empty = _r(runner.ABORT, reason="the selection is wrong", cases=(0, 1))
    res = runner.combine([_r(GOOD, cases=(1, 1)), empty])
    assert res.code == GOOD and "shard 2/2: none of the 1 collected cases fell to it" in res.reason
    nothing = _r(runner.ABORT, reason="collected no cases", cases=(0, 0))  # the selection itself is empty
    assert runner.combine([nothing, nothing]).code == runner.ABORT
    assert runner.combine([empty, empty]).code == runner.ABORT


def test_auto_shards():
    assert runner.auto_shards("tcg", 2, "2G", 20000) == 2
    assert runner.auto_shards("tcg", 16, "2G", None) == runner.MAX_AUTO_SHARDS
    assert runner.auto_shards("tcg", 8, "2G", 5000) == 2  # what MemAvailable holds
    assert runner.auto_shards("tcg", 8, "2G", 100) == 1
    assert runner.auto_shards("kvm", 8, "2G", 20000) == 1


def test_cli_shards_option(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(runner, "run", lambda cfg, out: seen.append(cfg) or runner.RunResult(GOOD, "verdict", "ok"))
    from harness.__main__ import main

    assert main(["kernel", "--kernel", "/k", "--shards", "2", "--", "x.py"]) == GOOD
    assert main(["kernel", "--kernel", "/k", "--shards", "auto", "--", "x.py"]) == GOOD
    assert main(["kernel", "--kernel", "/k", "--", "x.py"]) == GOOD
    assert [c.shards for c in seen] == [2, 0, 1]
    with pytest.raises(SystemExit):
        main(["kernel", "--kernel", "/k", "--shards", "0", "--", "x.py"])
    assert "at least 1 guest" in capsys.readouterr().err
    from harness.cli import matrix

    assert matrix._parser().parse_args(["--shards", "3", "--", "x.py"]).shards == 3  # matrix and bisect too


# ---- shards against a fake QEMU ---------------------------------------------------------------------

FAKE_SHARD_QEMU = r'''#!{python}
import json, os, re, sys, time
sys.path.insert(0, {repo!r})
from harness.report.ktap import KtapResult, KtapWriter
args = sys.argv[1:]
initrd = open(args[args.index("-initrd") + 1], "rb").read()
nonce = re.search(rb"@@KH-BOOTED ([0-9a-f]+)@@", initrd).group(1).decode()
spec = json.JSONDecoder().raw_decode(initrd[initrd.index(b'{{"pytest_args"'):].decode("utf-8", "replace"))[0]
pa = spec["pytest_args"]
i, n = map(int, pa[pa.index("--shard") + 1].split("/"))
with open({record!r}, "a") as f:
    f.write(f"{{i}} {{os.getpid()}} {{args[args.index('-initrd') + 1]}}\n")
mode = {modes!r}[i - 1]
say = lambda s: (sys.stdout.write(s + "\r\n"), sys.stdout.flush())
say(f"@@KH-BOOTED {{nonce}}@@ uptime 0.2")
if mode == "slow":
    time.sleep(120)
cases = [f"cases/test_f.py::test_{{k}}" for k in range(3)][i - 1::n] if mode != "empty" else []
say(f"shard {{i}}/{{n}}: runs {{len(cases)}} of 3 collected cases (round-robin)")
files = [a.split("=", 1) for a in pa if "=" in a] + [[a, b] for a, b in zip(pa, pa[1:]) if a.startswith("--")]
for opt, path in files:
    if opt == "--ktap":
        with open(path, "w") as f:
            w = KtapWriter(f, len(cases), suite="kvm")
            w.diagnostic("kernel fake-7.3 (x86_64)"); w.diagnostic("backend kvm_amd")
            for c in cases:
                w.add(KtapResult(c, "fail" if mode == "fail" else "pass", "boom" if mode == "fail" else ""))
            w.close()
    if opt == "--junitxml":
        tcs = "".join(f'<testcase classname="cases.test_f" name="{{c.split("::")[1]}}" time="0.1" />' for c in cases)
        open(path, "w").write(f'<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="0" '
                                f'tests="{{len(cases)}}" time="1.0">{{tcs}}</testsuite></testsuites>')
if mode == "hang":  # its results written, it never ends
    time.sleep(120)
code = {{"pass": 0, "fail": 1, "empty": 128}}[mode]
for k in range(5):
    say(f"line {{k}} of shard {{i}}")
say(f"bisect: shard {{i}} says {{code}}")
say(f"@@KH-RESULT {{nonce}} {{code}}@@"); say(f"@@KH-EXIT {{nonce}} {{code}}@@")
'''


def _fake_shards(tmp_path: Path, modes: list[str], monkeypatch=None) -> tuple[Path, Path, Path]:
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF")
    if monkeypatch is not None:
        monkeypatch.setattr(initramfs, "find_busybox", lambda: str(bb))
    q = tmp_path / "qemu"
    record = tmp_path / "record"
    q.write_text(FAKE_SHARD_QEMU.format(python=sys.executable, repo=str(REPO), record=str(record), modes=modes))
    q.chmod(0o755)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not really a kernel")
    return q, kernel, record


def _records(record: Path) -> list[tuple[int, int, Path]]:
    rows = [ln.split() for ln in record.read_text().splitlines()] if record.exists() else []
    return [(int(i), int(pid), Path(initrd)) for i, pid, initrd in rows]


def test_fake_shards_run_side_by_side_and_merge(tmp_path, monkeypatch):
    q, kernel, record = _fake_shards(tmp_path, ["pass", "fail"], monkeypatch)
    res_dir = tmp_path / "res"
    args = ["cases/", f"--junitxml={res_dir / 'j.xml'}", "--ktap", str(res_dir / "k.txt")]
    res_dir.mkdir()
    (res_dir / "k.txt.shard2").write_text("stale, from an earlier run")
    out = io.StringIO()
    cfg = RunConfig(kernel=kernel, pytest_args=args, qemu=str(q), boot_timeout=5.0, timeout=20.0, shards=2,
                    outdir=res_dir)
    res = runner.run(cfg, out)
    runner.report(res, out)
    text = out.getvalue()
    assert (res.code, res.outcome) == (BAD, "verdict"), text
    assert res.reason.startswith("shard 2/2: a case failed (bisect: shard 2 says 1); shard 1/2: the cases passed")
    assert [r.shard_cases for r in res.shards] == [(2, 3), (1, 3)]
    for line in text.splitlines():  # every console line whole and under its shard's prefix
        if "line " in line or "@@KH-" in line:
            assert re.match(r"\[(\d)/2\] ", line) and (f"shard {line[1]}" in line or "@@KH-" in line), line
    assert "[1/2] line 4 of shard 1" in text and "[2/2] line 4 of shard 2" in text
    assert "kernel-runner: shard 2/2: verdict, exit 1, ran 1 of 3 cases" in text
    rows = _records(record)
    assert sorted(i for i, _, _ in rows) == [1, 2] and len({p for _, _, p in rows}) == 2  # own initramfs each
    assert all(_gone(pid) for _, pid, _ in rows) and not any(p.parent.exists() for _, _, p in rows)
    doc = parse_ktap((res_dir / "k.txt").read_text())
    assert [t.description for t in doc.tests] == ["cases/test_f.py::test_0", "cases/test_f.py::test_2",
                                                  "cases/test_f.py::test_1"]
    assert [t.ok for t in doc.tests] == [True, True, False]
    junit = (res_dir / "j.xml").read_text()
    assert junit.count("<testcase") == 3 and 'tests="3"' in junit
    assert sorted(f.name for f in res_dir.iterdir()) == ["j.xml", "k.txt"]  # shard files merged and removed


def test_fake_shards_one_without_cases(tmp_path, monkeypatch):
    q, kernel, _ = _fake_shards(tmp_path, ["pass", "empty", "empty"], monkeypatch)
    out = io.StringIO()
    res = runner.run(RunConfig(kernel=kernel, pytest_args=["x"], qemu=str(q), boot_timeout=5.0, timeout=20.0,
                               shards=3), out)
    assert res.code == GOOD, res.reason
    assert "no shard wrote" not in out.getvalue()  # no result files asked for: nothing said


def test_fake_shards_timeout_stops_every_qemu(tmp_path, monkeypatch):
    q, kernel, record = _fake_shards(tmp_path, ["pass", "slow"], monkeypatch)
    t = time.monotonic()
    res = runner.run(RunConfig(kernel=kernel, pytest_args=["x"], qemu=str(q), boot_timeout=5.0, timeout=4.0,
                               shards=2), io.StringIO())
    assert (res.code, res.outcome) == (SKIP, "timeout") and res.reason.startswith("shard 2/2: the overall timeout")
    assert time.monotonic() - t < 15 and res.boot_seconds is not None
    assert all(_gone(pid) for _, pid, _ in _records(record))


def test_fake_shards_a_guest_that_cannot_be_made_is_125(tmp_path, monkeypatch):
    q, kernel, record = _fake_shards(tmp_path, ["pass", "pass"], monkeypatch)
    real_make = runner._make_guest

    def make(cfg, prep, gdir, args):
        if "2/2" in args:
            raise OSError(28, "No space left on device")
        return real_make(cfg, prep, gdir, args)

    monkeypatch.setattr(runner, "_make_guest", make)
    res = runner.run(RunConfig(kernel=kernel, pytest_args=["x"], qemu=str(q), shards=2), io.StringIO())
    assert (res.code, res.outcome) == (SKIP, "setup") and "shard 2/2" in res.reason and "No space" in res.reason
    assert not _records(record)  # no QEMU was started


def test_sigterm_to_a_sharded_run_kills_every_qemu(tmp_path):
    """...and merges what the shards wrote: shard 1 wrote its KTAP and hangs, shard 2 wrote nothing."""
    q, kernel, record = _fake_shards(tmp_path, ["hang", "slow"])
    res_dir = tmp_path / "res"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from harness.qemu import initramfs, runner
        initramfs.find_busybox = lambda: {str(tmp_path / "busybox")!r}
        runner.run(runner.RunConfig(kernel=Path({str(kernel)!r}), pytest_args=["x", "--ktap={res_dir}/k.txt"],
                                    qemu={str(q)!r}, timeout=60.0, shards=2))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(_records(record)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        while not (res_dir / "k.txt.shard1").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the run loops
        p.terminate()
        assert p.wait(timeout=30) == 128 + 15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    rows = _records(record)
    assert len(rows) == 2
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for _, pid, _ in rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for _, pid, _ in rows) and not any(p.parent.exists() for _, _, p in rows)
    assert sorted(f.name for f in res_dir.iterdir()) == ["k.txt"]  # merged, the shard file removed
    doc = parse_ktap((res_dir / "k.txt").read_text())
    assert [t.description for t in doc.tests][:2] == ["cases/test_f.py::test_0", "cases/test_f.py::test_2"]
    assert doc.tests[-1].directive == "ERROR" and "wrote no KTAP file (stopped" in doc.tests[-1].reason


# ---- real boots: Debian's 6.1 kernel under QEMU --------------------------------------------------

def _debian_kernel() -> Path | None:
    found = sorted(DEBIAN.glob("boot/vmlinuz-*")) if DEBIAN.exists() else []
    return found[-1] if found else None


def _real_skip_reason() -> str | None:
    if not shutil.which(runner.QEMU):
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    if not initramfs.find_busybox():
        return "busybox missing (apt-get install busybox-static)"
    if _debian_kernel() is None:
        if not shutil.which("apt-get"):
            return "no apt on this machine: Debian's kernel cannot be fetched"
        return f"Debian's kernel is not in {DEBIAN.parent}: run `make kernel-fetch`"
    return None


def real(f):
    """A real boot of Debian's 6.1 under QEMU (tests/conftest.py: real_boot)."""
    skip = pytest.mark.skipif(_real_skip_reason() is not None, reason=str(_real_skip_reason()))
    return pytest.mark.real_boot(seconds=60)(skip(f))
SMOKE = ["cases/test_system.py", "cases/test_guest_modes.py::test_checksum_in_every_mode",
         "cases/test_backings.py::test_guest_memfd_source", "-p", "no:cacheprovider", "-rs"]


def _real_run(args: list[str], **kw) -> tuple[runner.RunResult, str]:
    out = io.StringIO()
    cfg = RunConfig(kernel=_debian_kernel(), pytest_args=args, boot_timeout=120.0, timeout=400.0, **kw)
    res = runner.run(cfg, out)
    runner.report(res, out)
    sys.stdout.write(out.getvalue()[-3000:])  # the guest's summary, for -s and for failures
    return res, out.getvalue()


@real
def test_real_smoke_subset_passes_on_debian_61():
    res, out = _real_run(SMOKE)
    assert (res.code, res.outcome) == (GOOD, "verdict"), res.reason
    assert "/dev/kvm present" in out and "6.1." in out
    assert "test_checksum_in_every_mode[pae32] PASSED" in out or "passed" in out
    # 6.1 has no guest_memfd: those cases skip, naming the capability
    assert "KVM_CAP_GUEST_MEMFD" in out
    assert res.boot_seconds is not None and res.boot_seconds < 120
    print(f"\nsmoke: boot {res.boot_seconds:.1f} s, total {res.total_seconds:.1f} s")


@real
def test_real_failing_case_exits_1():
    # the guest sees the host's files (its /tmp aside), so a case written under the repo runs there;
    # .cache/ is git-ignored and the file is removed afterwards
    case = REPO / ".cache" / "kernels" / "selftest" / f"test_made_to_fail_{os.getpid()}.py"
    case.parent.mkdir(parents=True, exist_ok=True)
    case.write_text(textwrap.dedent("""
        def test_api_version_is_13_on_purpose(kvm):
            assert kvm.api_version == 13
    """))
    try:
        res, out = _real_run([str(case.relative_to(REPO)), "-p", "no:cacheprovider"])
    finally:
        case.unlink()
    assert (res.code, res.outcome) == (BAD, "verdict"), res.reason
    assert "1 failed" in out and "assert 12 == 13" in out


@real
def test_real_no_kvm_in_the_guest_is_cannot_test(tmp_path):
    # every module but KVM's: the guest boots and mounts the host, but has no /dev/kvm
    mods = _debian_kernel().parent.parent / "lib" / "modules"
    for ko in mods.rglob("*.ko*"):
        if ko.name.startswith(("kvm", "irqbypass")):
            continue
        link = tmp_path / ko.relative_to(mods)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ko)
    res, out = _real_run(["cases/test_system.py", "-p", "no:cacheprovider"], modules=tmp_path)
    assert (res.code, res.outcome) == (SKIP, "verdict"), res.reason
    assert "/dev/kvm MISSING" in out and "does not exist: cannot test" in res.reason


@real
def test_real_garbage_kernel_is_a_boot_failure(tmp_path):
    bad = tmp_path / "bzImage"
    bad.write_bytes(os.urandom(1 << 20))
    out = io.StringIO()
    res = runner.run(RunConfig(kernel=bad, pytest_args=["cases/test_system.py"], boot_timeout=60.0), out)
    runner.report(res, out)
    assert (res.code, res.outcome) == (SKIP, "boot-failure")
    assert "QEMU stderr:" in out.getvalue() and res.qemu_stderr  # QEMU's own refusal, in the report
    res = runner.run(RunConfig(kernel=bad, pytest_args=["x"], boot_timeout=60.0, boot_failure=BAD), io.StringIO())
    assert (res.code, res.outcome) == (BAD, "boot-failure")


@real
def test_real_panic_at_boot_is_a_boot_failure_with_console_tail():
    # no /init in the initramfs and no root device: the kernel panics, panic=-1 resets, QEMU ends
    res, out = _real_run(["cases/test_system.py"], append="rdinit=/nonexistent")
    assert (res.code, res.outcome) == (SKIP, "boot-failure")
    assert any("Kernel panic" in line for line in res.console_tail)
    assert "last " in out and "console lines:" in out


def test_init_carries_a_project_under_tmp_over_the_guest_tmpfs():
    # CI clones into /tmp; the guest's own tmpfs /tmp would hide the project and its venv
    from harness.qemu.initramfs import GuestSpec, render_init

    under = render_init(GuestSpec(["x"], "/tmp/ci", "/tmp/ci/.venv/bin/python", "n"), [], [], [])
    assert "KEEP=/tmp/ci\n" in under and 'mount -o bind /rw/keep "$R$KEEP"' in under
    assert under.index('mount -o bind "$R$KEEP" /rw/keep') < under.index("mount -t tmpfs tmpfs $R/tmp")
    elsewhere = render_init(GuestSpec(["x"], "/work/main", "/work/main/.venv/bin/python", "n"), [], [], [])
    assert 'KEEP=""\n' in elsewhere


def test_init_passes_module_parameters_from_the_command_line():
    from harness.qemu.initramfs import GuestSpec, render_init

    init = render_init(GuestSpec(["x"], "/work/main", "/py", "n"), ["kvm"], [], [])
    # kvm.tdp_mmu=0 on the command line becomes `insmod kvm.ko tdp_mmu=0`
    assert 'sed -n "s/^$m\\.//p"' in init and "insmod /kh/modules/$m.ko $p" in init


def test_guest_is_told_how_its_cpu_is_provided(monkeypatch, tmp_path):
    # KVM_HARNESS_ACCEL reaches the guest's environment: known emulator artefacts apply only there
    seen = {}
    monkeypatch.setattr(runner, "_boot", lambda cmd, nonce, cfg, out, t0: runner.RunResult(GOOD, "verdict", "ok"))
    monkeypatch.setattr(runner.initramfs, "build", lambda dest, spec, modules, busybox: (
        seen.update(env=spec.env, spec=spec), {"base": [], "amd": [], "intel": []})[1])
    monkeypatch.setattr(runner, "_prepare_kernel", lambda cfg, tmp, out: image.identify(cfg.kernel))
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + b"\0" * 4096)
    cfg = RunConfig(kernel=k, pytest_args=["x"], accel="tcg")
    runner._run_in(cfg, io.StringIO(), None, "/bin/true", 0.0)
    assert seen["env"][runner.ACCEL_ENV] == "tcg"
    assert seen["spec"].pause_khugepaged  # under TCG only (an emulator artefact: initramfs.GuestSpec)
    runner._run_in(replace(cfg, accel="kvm"), io.StringIO(), None, "/bin/true", 0.0)
    assert seen["env"][runner.ACCEL_ENV] == "kvm" and not seen["spec"].pause_khugepaged


def test_init_pauses_khugepaged_only_when_asked():
    from harness.qemu.initramfs import KHUGEPAGED_SLEEP, GuestSpec, render_init

    tcg = render_init(GuestSpec(["x"], "/w", "/py", "n", pause_khugepaged=True), [], [], [])
    line = next(ln for ln in tcg.splitlines() if KHUGEPAGED_SLEEP in ln)
    assert line.startswith(f"if echo 3600000 2>&1 > {KHUGEPAGED_SLEEP}; then")
    assert tcg.index(line) < tcg.index("harness.qemu.guest")  # before the cases start
    assert KHUGEPAGED_SLEEP not in render_init(GuestSpec(["x"], "/w", "/py", "n"), [], [], [])
