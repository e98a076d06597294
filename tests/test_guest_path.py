"""guest_path(): a payload built before a change of one of its sources is refused, also when the
check is cached (within RECHECK_S of the last check it is not repeated; after it, it is)."""

from __future__ import annotations

import os

import pytest

from harness.lib import guest


@pytest.fixture
def tree(tmp_path, monkeypatch):
    src = tmp_path / "guests"
    build = src / "build"
    build.mkdir(parents=True)
    (src / "p.c").write_text("int x;\n")
    elf = build / "p.64.elf"
    elf.write_bytes(b"\x7fELF")
    os.utime(src / "p.c", (1000, 1000))
    os.utime(elf, (2000, 2000))
    (build / "manifest.txt").write_text("build/p.64.elf p.c\n")
    monkeypatch.setattr(guest, "GUESTS_DIR", src)
    monkeypatch.setattr(guest, "BUILD_DIR", build)
    monkeypatch.setattr(guest, "_checked", {})
    return src, elf


def test_stale_payload_is_refused_after_the_recheck_interval(tree, monkeypatch):
    src, elf = tree
    assert guest.guest_path("p", 64) == elf
    os.utime(src / "p.c", (3000, 3000))  # the source changed after the build
    monkeypatch.setattr(guest, "RECHECK_S", 3600.0)
    assert guest.guest_path("p", 64) == elf  # cached: not looked at again yet
    monkeypatch.setattr(guest, "RECHECK_S", 0.0)
    with pytest.raises(guest.GuestBuildError, match=r"p\.64\.elf is stale: p\.c changed after it was built"):
        guest.guest_path("p", 64)


def test_missing_payload_is_never_cached(tree):
    with pytest.raises(guest.GuestBuildError, match="is not built"):
        guest.guest_path("q", 64)
    with pytest.raises(guest.GuestBuildError, match="is not built"):
        guest.guest_path("q", 64)


def test_inside_the_runner_guest_the_check_is_once_per_process():
    """KVM_HARNESS_ACCEL (set by the kernel runner in its QEMU guest): checked once, never again."""
    import subprocess
    import sys

    code = "from harness.lib import guest; print(guest.RECHECK_S)"
    env = {k: v for k, v in os.environ.items() if k != "KVM_HARNESS_ACCEL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2.0"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "KVM_HARNESS_ACCEL": "tcg"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["inf"]
