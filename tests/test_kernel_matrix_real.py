"""Real boots of Debian's packaged kernels: fetch by name, the matrix, and the packaged-version bisect.

Each boots kernels under QEMU (TCG here), about 30-60 s a boot; they skip, saying why, where QEMU,
busybox or apt are missing or the archive cannot be reached.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.qemu import debian, initramfs, runner
from harness.qemu import version_bisect as vb

REPO = Path(__file__).resolve().parents[1]


def _skip_reason() -> str | None:
    if not shutil.which(runner.QEMU):
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    if not initramfs.find_busybox():
        return "busybox missing (apt-get install busybox-static)"
    if not shutil.which("apt-get"):
        return "no apt on this machine: Debian's kernels cannot be fetched"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())), pytest.mark.real_boot]


@pytest.fixture(scope="module")
def archive() -> debian.Archive:
    a = debian.Archive()
    try:
        a.kernels()
    except debian.KernelFetchError as e:
        pytest.skip(f"Debian's archive cannot be read here: {e}")
    return a


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.real_boot(seconds=10)
def test_fetch_by_name_both_package_layouts(archive):
    # 6.x: one package (boot/vmlinuz-VER); 7.x: linux-binary + linux-modules + linux-base
    for name, split in (("debian:6.1", False), ("debian:7.3.4", True)):
        k = archive.resolve(name)
        assert any(p.startswith("linux-binary-") for p in k.parts) == split, k.parts
        r = _cli("kernel", "fetch", name)
        assert r.returncode == 0, r.stderr
        f = archive.fetched(k)
        assert f is not None and f.vmlinuz.is_file() and f.config is not None and f.config.is_file()
        assert "CONFIG_KVM=" in f.config.read_text()
        assert any(f.modules.rglob("kvm-amd.ko*")), f"no kvm-amd module under {f.modules}"
        assert str(f.vmlinuz) in r.stdout
    listing = _cli("kernel", "list")
    assert listing.returncode == 0 and "debian:7.3.4" in listing.stdout and "MiB" in listing.stdout
    assert "kernels offered; cache" in listing.stdout


@pytest.mark.real_boot(seconds=130)
def test_matrix_host_and_a_packaged_kernel(tmp_path, archive):
    out = tmp_path / "m"
    r = _cli("matrix", "--kernels", "host,debian:7.3.4", "--out", str(out), "--host-args", "",
             "--", "cases/test_system.py", "-k", "api_version or vm_types")
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    data = json.loads((out / "matrix.json").read_text())
    rel = {k["kernel"]: k["release"] for k in data["kernels"]}
    assert rel["debian:7.3.4"].startswith("7.3.4") and rel["host"] == os.uname().release
    assert data["cells"] and all(set(v) == {"host", "debian:7.3.4"} for v in data["cells"].values())
    for kernel in ("host", "debian-7.3.4"):
        assert (out / kernel / "junit.xml").is_file() and (out / kernel / "ktap.txt").is_file()
    assert "<table>" in (out / "index.html").read_text()
    assert "matrix: time per kernel: host" in text and "[debian:7.3.4]" in text  # progress while it ran


@pytest.mark.real_boot(seconds=240)
def test_version_bisect_finds_the_first_version_with_a_planted_regression(archive, tmp_path):
    # a "regression" that appeared in 7.3: the case fails on kernels >= 7.3 (the guest sees the repo)
    case = REPO / ".cache" / "kernels" / "selftest" / f"test_planted_{os.getpid()}.py"
    case.parent.mkdir(parents=True, exist_ok=True)
    case.write_text(textwrap.dedent("""
        import platform
        def test_planted_regression(kvm):
            major, minor = (int(x) for x in platform.release().split(".")[:2])
            assert (major, minor) < (7, 3), f"planted regression on {platform.release()}"
    """))
    out = io.StringIO()
    try:
        code = vb.bisect("debian:7.2.12", "debian:7.3.4", [str(case.relative_to(REPO)), "-p", "no:cacheprovider"],
                         lambda k, m: runner.RunConfig(kernel=k, pytest_args=[str(case.relative_to(REPO)),
                                                                              "-p", "no:cacheprovider"],
                                                       modules=m, boot_timeout=120, timeout=400),
                         out=out, archive=archive)
    finally:
        case.unlink()
    text = out.getvalue()
    assert code == vb.FOUND, text[-3000:]
    assert "first bad debian:7.3.4" in text and "last good debian:7.2.13" in text
    assert "git bisect start v7.3.4 v7.2.13" in text


@pytest.mark.real_boot(seconds=45)
def test_module_parameters_on_the_command_line_reach_the_modules(archive):
    # busybox insmod reads nothing from the command line: --append kvm.tdp_mmu=0 once did nothing
    case = REPO / ".cache" / "kernels" / "selftest" / f"test_param_{os.getpid()}.py"
    case.parent.mkdir(parents=True, exist_ok=True)
    case.write_text(textwrap.dedent("""
        def test_tdp_mmu_is_off(kvm):
            with open("/sys/module/kvm/parameters/tdp_mmu") as f:
                assert f.read().strip() == "N"
    """))
    try:
        r = _cli("kernel", "--kernel", "debian:7.3.4", "--append", "kvm.tdp_mmu=0", "--",
                 str(case.relative_to(REPO)), timeout=600)
    finally:
        case.unlink()
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "insmod kvm tdp_mmu=0" in r.stdout
