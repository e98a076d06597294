"""Unit tests of the DAX backings' pure parts (harness/memory/dax.py) and the runner's pmem devices
(harness/qemu/runner.py): QEMU command lines, the pmem choice, namespace discovery and reconfiguration
over fake /sys/bus/nd and /sys/bus/dax trees, the parsers, the device-range locks, the skip reasons."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from harness import memory
from harness.memory import PAGE_2M, PAGE_4K, BackingUnavailable, Feature, dax, hostmem
from harness.qemu import image, initramfs, runner

CFG_NFIT = {"CONFIG_LIBNVDIMM": "m", "CONFIG_ACPI_NFIT": "m", "CONFIG_VIRTIO_PMEM": "m", "CONFIG_VIRTIO_MMIO": "m"}


# ---- the runner: command lines ------------------------------------------------------------------------
def _opt(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def _cmd(pmem: runner.Pmem | None, machine: str = "q35", mem: str = "2G") -> list[str]:
    return runner.qemu_command(qemu="qemu-system-x86_64", accel="tcg", machine=machine, kernel=Path("/k/vmlinux"),
                               initrd=Path("/t/initramfs.cpio"), cpus=1, mem=mem, cmdline="console=ttyS0",
                               phys_bits=48, pmem=pmem)


def test_qemu_command_with_nvdimms():
    pm = runner.Pmem("nvdimm", "256M", (Path("/t/pmem0.img"), Path("/t/pmem1.img")))
    cmd = _cmd(pm)
    assert _opt(cmd, "-M") == ["q35,nvdimm=on"]
    assert _opt(cmd, "-m") == ["2G,slots=2,maxmem=2560M"]  # RAM + both devices
    assert _opt(cmd, "-object") == [
        "memory-backend-file,id=pmem0,share=on,mem-path=/t/pmem0.img,size=256M",
        "memory-backend-file,id=pmem1,share=on,mem-path=/t/pmem1.img,size=256M"]
    devs = _opt(cmd, "-device")
    assert devs[0] == "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"  # q35: virtio-pci
    assert devs[1:] == ["nvdimm,memdev=pmem0,id=nv0", "nvdimm,memdev=pmem1,id=nv1"]


def test_qemu_command_with_virtio_pmem_and_without_pmem():
    pm = runner.Pmem("virtio-pmem", "64M", (Path("/t/p0"),))
    cmd = _cmd(pm, mem="1536M")
    assert _opt(cmd, "-M") == ["q35"] and _opt(cmd, "-m") == ["1536M,slots=1,maxmem=1600M"]
    assert _opt(cmd, "-device")[-1] == "virtio-pmem-pci,memdev=pmem0,id=nv0"
    plain = _cmd(None, machine="microvm")  # no pmem: the command is what it always was
    assert _opt(plain, "-M") == ["microvm"] and _opt(plain, "-m") == ["2G"] and not _opt(plain, "-object")
    assert not any("nvdimm" in a or "pmem" in a for a in plain)


def test_qemu_command_refuses_pmem_on_microvm():
    with pytest.raises(ValueError, match="microvm"):
        _cmd(runner.Pmem("nvdimm", "256M", (Path("/t/p0"),)), machine="microvm")


def test_choose_pmem():
    assert runner.choose_pmem("auto", CFG_NFIT)[0] == "nvdimm"
    assert runner.choose_pmem("auto", {"CONFIG_LIBNVDIMM": "y", "CONFIG_VIRTIO_PMEM": "m"})[0] == "virtio-pmem"
    kind, why = runner.choose_pmem("auto", {"CONFIG_LIBNVDIMM": "n", "CONFIG_ACPI_NFIT": "m"})
    assert kind is None and "LIBNVDIMM" in why
    assert runner.choose_pmem("auto", {})[0] is None  # unknown config: nothing unasked
    assert runner.choose_pmem("512M", {})[0] == "nvdimm"  # asked for: assumed
    assert runner.choose_pmem("off", CFG_NFIT) == (None, "--pmem off")
    kind, why = runner.choose_pmem("auto", CFG_NFIT, machine="microvm")
    assert kind is None and "microvm" in why
    for bad, cfg, machine in (("256M", CFG_NFIT, "microvm"), ("15M", CFG_NFIT, "auto"), ("3M", CFG_NFIT, "auto"),
                              ("lots", CFG_NFIT, "auto"), ("256M", {"CONFIG_LIBNVDIMM": "n"}, "auto")):
        with pytest.raises(ValueError):
            runner.choose_pmem(bad, cfg, machine)


def test_choose_machine_with_pmem():
    pm = runner.Pmem("nvdimm", "256M", ())
    assert runner.choose_machine("auto", CFG_NFIT) == "microvm"
    assert runner.choose_machine("auto", CFG_NFIT, pm) == "q35"
    assert runner.choose_machine("q35", CFG_NFIT, pm) == "q35"


def test_guest_env_and_names_agree():
    assert runner.PMEM_ENV == dax.PMEM_ENV


def _fake_run(tmp_path: Path, monkeypatch, pmem: str, config: dict[str, str]) -> dict:
    """_run_in up to the QEMU command: what it would boot, the guest's env, the backing files then."""
    seen: dict = {}

    def boot(cmd, nonce, cfg, out, t0):
        seen["cmd"] = cmd
        seen["files"] = {p: os.stat(p) for p in _opt(cmd, "-object")
                         for p in [p.split("mem-path=")[1].split(",")[0]]}
        return runner.RunResult(runner.GOOD, "verdict", "ok")

    monkeypatch.setattr(runner, "_boot", boot)
    monkeypatch.setattr(runner.initramfs, "build", lambda dest, spec, modules, busybox: (
        seen.setdefault("env", spec.env), {"base": [], "amd": [], "intel": []})[1])
    monkeypatch.setattr(runner, "_prepare_kernel", lambda cfg, tmp, out: image.identify(cfg.kernel))
    monkeypatch.setenv(runner.PMEM_ENV, "from-the-host")  # never leaks into a guest without pmem
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + b"\0" * 4096)
    (tmp_path / "config").write_text("".join(f"{a}={b}\n" for a, b in config.items()))
    out = io.StringIO()
    res = runner._run_in(runner.RunConfig(kernel=k, pytest_args=["x"], accel="tcg", pmem=pmem), out, None,
                         "/bin/true", 0.0)
    seen["res"], seen["out"] = res, out.getvalue()
    return seen


def test_run_gives_the_guest_pmem_and_removes_the_files(tmp_path, monkeypatch):
    seen = _fake_run(tmp_path, monkeypatch, "auto", CFG_NFIT)
    assert seen["res"].code == runner.GOOD
    assert _opt(seen["cmd"], "-M") == ["q35,nvdimm=on"]
    files = seen["files"]
    assert len(files) == runner.PMEM_DEVICES
    for path, st in files.items():
        assert st.st_size == 256 << 20 and st.st_blocks == 0, (path, st)  # sparse
        assert not os.path.exists(path), f"{path} outlived the run"
    assert seen["env"][runner.PMEM_ENV] == "scratch"
    assert "pmem 2 x 256M nvdimm" in seen["out"]


def test_run_without_pmem_is_as_before(tmp_path, monkeypatch):
    seen = _fake_run(tmp_path, monkeypatch, "off", CFG_NFIT)
    assert _opt(seen["cmd"], "-M") == ["microvm"] and not seen["files"]
    assert runner.PMEM_ENV not in seen["env"] and "pmem none (--pmem off)" in seen["out"]
    seen = _fake_run(tmp_path, monkeypatch, "auto", {"CONFIG_VIRTIO_MMIO": "m", "CONFIG_LIBNVDIMM": "n"})
    assert _opt(seen["cmd"], "-M") == ["microvm"] and not seen["files"]


def test_initramfs_loads_the_dax_modules(monkeypatch, tmp_path):
    wanted: list[list[str]] = []

    class Tree:
        def load_order(self, names):
            wanted.append(list(names))
            return []

    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF")
    spec = initramfs.GuestSpec(["x"], "/work", "/usr/bin/python3", "n0nce")
    initramfs.build(tmp_path / "i.cpio", spec, Tree(), str(bb))  # type: ignore[arg-type]
    for m in ("libnvdimm", "nfit", "virtio_pmem", "nd_pmem", "dax_pmem", "device_dax", "ext4"):
        assert m in initramfs.DAX_MODULES and m in wanted[0], m


# ---- discovery over a fake sysfs -------------------------------------------------------------------------
def _w(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


def _region(nd: Path, r: int, *, mode: str = "raw", holder: str = "", bound: bool = True, size: int = 256 << 20,
            block: str | None = None) -> None:
    ns = nd / f"namespace{r}.0"
    _w(ns / "mode", mode)
    _w(ns / "size", str(size))
    _w(ns / "resource", hex((4 << 30) + r * size))
    _w(ns / "holder", holder)
    _w(nd / f"region{r}" / "pfn_seed", f"pfn{r}.0")
    _w(nd / f"region{r}" / "dax_seed", f"dax{r}.0")
    for seed in (f"pfn{r}.0", f"dax{r}.0", f"btt{r}.0"):
        (nd / seed).mkdir(parents=True, exist_ok=True)
    owner = nd / holder if holder else ns
    if bound:
        (owner / "driver").mkdir(parents=True, exist_ok=True)
    if block:
        (owner / "block" / block).mkdir(parents=True)
    if holder.startswith("dax"):
        (owner / holder).mkdir()  # the dax bus device under the nd dax device


def test_scan_and_plan_two_raw_namespaces(tmp_path):
    nd = tmp_path / "nd" / "devices"
    _region(nd, 0, block="pmem0")
    _region(nd, 1, block="pmem1")
    _w(nd / "namespace1.1" / "size", "0")  # a labelled region's empty seed: not a namespace yet
    nss = dax.scan_namespaces(nd)
    assert [n.name for n in nss] == ["namespace0.0", "namespace1.0"]
    n0 = nss[0]
    assert (n0.region, n0.mode, n0.size, n0.resource, n0.block, n0.enabled) == \
        ("region0", "raw", 256 << 20, 4 << 30, "pmem0", True)
    p = dax.plan(nss)
    assert p.fsdax is nss[0] and p.devdax is nss[1] and not p.why_not
    assert [(n.name, m) for n, m in p.convert] == [("namespace0.0", "fsdax"), ("namespace1.0", "devdax")]


def test_plan_after_conversion_converts_nothing(tmp_path):
    nd = tmp_path / "nd" / "devices"
    _region(nd, 0, mode="memory", holder="pfn0.0", block="pmem0")
    _region(nd, 1, mode="dax", holder="dax1.0")
    nss = dax.scan_namespaces(nd)
    assert [(n.mode, n.block, n.dax, n.enabled) for n in nss] == [("fsdax", "pmem0", "", True),
                                                                   ("devdax", "", "dax1.0", True)]
    p = dax.plan(nss)
    assert p.convert == () and p.fsdax.block == "pmem0" and p.devdax.dax == "dax1.0"


def test_plan_one_namespace_stays_fsdax_and_says_why(tmp_path):
    nd = tmp_path / "nd" / "devices"
    _region(nd, 0, block="pmem0")
    p = dax.plan(dax.scan_namespaces(nd))
    assert p.fsdax is not None and p.devdax is None
    assert "the only one stays fsdax" in p.why_not["devdax"] and "namespace0.0" in p.why_not["devdax"]
    p = dax.plan([])
    assert "no pmem namespace" in p.why_not["fsdax"] and "no pmem namespace" in p.why_not["devdax"]
    nd2 = tmp_path / "sector" / "devices"
    _region(nd2, 0, mode="safe", holder="btt0.0", block="pmem0s")
    p = dax.plan(dax.scan_namespaces(nd2))
    assert p.fsdax is None and "none raw or fsdax" in p.why_not["fsdax"]


def test_scan_dax(tmp_path):
    bus = tmp_path / "dax"
    _w(bus / "dax1.0" / "size", "262144000")
    _w(bus / "dax1.0" / "align", "2097152")
    _w(bus / "dax0.0" / "size", str(1 << 30))  # an older kernel without align: 2 MiB assumed
    assert dax.scan_dax(bus) == [dax.DaxDevice("dax0.0", 1 << 30, PAGE_2M), dax.DaxDevice("dax1.0", 262144000, PAGE_2M)]
    assert dax.scan_dax(tmp_path / "none") == []
    with pytest.raises(BackingUnavailable, match="align 0x1000"):
        dax._check_align(dax.DaxDevice("dax2.0", 1 << 30, PAGE_4K))


def test_convert_steps_are_ndctl_without_ndctl(tmp_path):
    ns = dax.Namespace("namespace1.0", "region1", "raw", 256 << 20, None, "", "pmem1", "", True)
    steps = dax.convert_steps(ns, "devdax", "dax1.0")
    assert [p for p, _ in steps] == ["nd/drivers/nd_pmem/unbind", "nd/devices/dax1.0/uuid", "nd/devices/dax1.0/mode",
                                     "nd/devices/dax1.0/align", "nd/devices/dax1.0/namespace",
                                     "nd/drivers/dax_pmem/bind"]
    vals = dict(steps)
    assert vals["nd/devices/dax1.0/mode"] == "pmem" and vals["nd/devices/dax1.0/align"] == str(PAGE_2M)
    assert vals["nd/devices/dax1.0/namespace"] == "namespace1.0" and vals["nd/drivers/dax_pmem/bind"] == "dax1.0"
    unbound = dax.Namespace("namespace0.0", "region0", "raw", 1 << 28, None, "", "", "", False)
    steps = dax.convert_steps(unbound, "fsdax", "pfn0.0")
    assert steps[0][0] == "nd/devices/pfn0.0/uuid" and steps[-1] == ("nd/drivers/nd_pmem/bind", "pfn0.0")


def test_convert_writes_sysfs_and_says_what_failed(tmp_path, monkeypatch):
    bus = tmp_path
    nd = bus / "nd" / "devices"
    _region(nd, 1, block="pmem1")
    for drv in ("nd_pmem/unbind", "dax_pmem/bind"):
        _w(bus / "nd" / "drivers" / drv, "")
    for attr in ("uuid", "mode", "align", "namespace"):
        _w(nd / "dax1.0" / attr, "")
    monkeypatch.setattr(dax, "DEV", tmp_path / "dev")
    ns = dax.scan_namespaces(nd)[0]
    with pytest.raises(BackingUnavailable, match="no device node after"):
        dax.convert(ns, "devdax", bus, timeout=0.1)  # a fake tree never brings /dev/dax1.0 up
    assert (bus / "nd/drivers/nd_pmem/unbind").read_text() == "namespace1.0"
    assert (nd / "dax1.0/namespace").read_text() == "namespace1.0"
    assert (bus / "nd/drivers/dax_pmem/bind").read_text() == "dax1.0"
    (nd / "region1" / "pfn_seed").unlink()
    with pytest.raises(BackingUnavailable, match="no pfn_seed"):
        dax.convert(ns, "fsdax", bus)
    _w(nd / "region1" / "pfn_seed", "pfn9.9")  # a seed whose attributes are missing: the write says so
    with pytest.raises(BackingUnavailable, match=r"echo .* > .*pfn9\.9/uuid"):
        dax.convert(ns, "fsdax", bus)


# ---- parsers ------------------------------------------------------------------------------------------
def test_ext4_label():
    sb = bytearray(1024)
    assert dax.ext4_label(bytes(sb)) is None
    sb[0x38:0x3A] = (0xEF53).to_bytes(2, "little")
    sb[0x78:0x78 + len(dax.LABEL)] = dax.LABEL.encode()
    assert dax.ext4_label(bytes(sb)) == dax.LABEL
    assert dax.ext4_label(b"short") is None


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 259:0 / /mnt/pm rw,relatime shared:9 - ext4 /dev/pmem0 rw,dax=always
41 22 259:1 / /mnt/p\\040m rw - xfs /dev/pmem1 rw,dax
42 22 0:5 / /tmp rw - tmpfs tmpfs rw
"""


def test_mount_options_and_dax_mounts():
    mp, fs, opts = dax.mount_options(MOUNTINFO, "/mnt/pm/sub/file")
    assert (mp, fs) == ("/mnt/pm", "ext4") and dax.is_dax_mount(opts)
    mp, fs, opts = dax.mount_options(MOUNTINFO, "/mnt/p m")
    assert (mp, fs) == ("/mnt/p m", "xfs") and dax.is_dax_mount(opts)
    mp, _, opts = dax.mount_options(MOUNTINFO, "/mnt/pmx")
    assert mp == "/" and not dax.is_dax_mount(opts)
    assert not dax.is_dax_mount("rw,dax=never") and not dax.is_dax_mount("rw,relatime")


SMAPS = """\
7fe81e200000-7fe81e600000 rw-s 00000000 00:09 119                        /dev/dax1.0
Size:               4096 kB
KernelPageSize:     2048 kB
Rss:                4096 kB
VmFlags: rd wr sh mr mw me ms sd hg
7fe81e600000-7fe81e601000 rw-p 00000000 00:00 0
Size:                  4 kB
KernelPageSize:        4 kB
"""

IOMEM = """\
00001000-0009fbff : System RAM
00100000-7ffdefff : System RAM
  01000000-01ffffff : Kernel code
100000000-10fffffff : Persistent Memory
  100000000-10fffffff : namespace0.0
"""


def test_smaps_and_iomem():
    e = dax.smaps_entry(SMAPS, 0x7FE81E200000)
    assert e["path"] == "/dev/dax1.0" and dax.kb(e["KernelPageSize"]) == PAGE_2M and dax.kb(e["Rss"]) == 4 << 20
    assert dax.smaps_entry(SMAPS, 0x7FE81E600000)["path"] == "" and dax.smaps_entry(SMAPS, 0x1000) == {}
    assert dax.iomem_ranges(IOMEM, "System RAM") == [(0x1000, 0x9FBFF), (0x100000, 0x7FFDEFFF)]
    assert dax.iomem_ranges(IOMEM, "Persistent Memory") == [(0x100000000, 0x10FFFFFFF)]
    assert dax.iomem_ranges(IOMEM, "namespace0.0") == []  # nested entries are not top level


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in /proc/self/pagemap are shown to root only")
def test_pagemap_pfns_of_our_own_memory():
    with hostmem.Mapping(3 * PAGE_4K) as m:
        m.buf[0] = b"x"
        m.buf[2 * PAGE_4K] = b"y"
        pfns = dax.pagemap_pfns(m.addr, 3 * PAGE_4K)
    assert pfns[1] is None and pfns[0] and pfns[2] and pfns[0] != pfns[2], pfns


# ---- skips and locks -----------------------------------------------------------------------------------
def test_no_pmem_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(dax, "DEV", tmp_path / "dev")
    monkeypatch.setattr(dax, "ND", tmp_path / "nd")
    (tmp_path / "dev").mkdir()
    monkeypatch.setattr(dax, "scan_namespaces", lambda nd=tmp_path / "nd": [])
    for var in (dax.PMEM_ENV, dax.DEVDAX_ENV, dax.FSDAX_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    for kind in ("devdax", "fsdax"):
        with pytest.raises(BackingUnavailable, match=r"^no /dev/pmem\* or /dev/dax\*: "):
            memory.create(kind, PAGE_2M)
    (tmp_path / "dev" / "pmem0").write_text("")  # someone's pmem: never taken unasked
    with pytest.raises(BackingUnavailable, match=f"found .*pmem0.*{dax.FSDAX_DIR_ENV}"):
        memory.create("fsdax", PAGE_2M)
    with pytest.raises(BackingUnavailable, match=f"{dax.DEVDAX_ENV}=/dev/daxX.Y.*{dax.PMEM_ENV}=scratch"):
        memory.create("devdax", PAGE_2M)
    monkeypatch.setenv(dax.DEVDAX_ENV, "/dev/dax7.7")
    with pytest.raises(BackingUnavailable, match="no such device-dax device"):
        memory.create("devdax", PAGE_2M)
    monkeypatch.setenv(dax.FSDAX_DIR_ENV, str(tmp_path))
    with pytest.raises(BackingUnavailable, match="not a directory on a filesystem mounted with dax"):
        memory.create("fsdax", PAGE_2M)


def test_device_ranges_are_locked_per_backing(tmp_path):
    """The devdax allocator's open-file-description locks: a range one fd holds is refused to every
    other fd (same process included), other ranges are free, and closing the fd frees its range."""
    f = tmp_path / "dev"
    f.write_bytes(b"")
    a, b = os.open(f, os.O_RDWR), os.open(f, os.O_RDWR)
    try:
        assert dax._ofd_lock(a, 0, 4 << 20)
        assert not dax._ofd_lock(b, 2 << 20, 2 << 20)
        assert dax._ofd_lock(b, 4 << 20, 2 << 20)
        os.close(a)
        a = -1
        assert dax._ofd_lock(b, 0, 2 << 20)
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)


def test_registry_has_the_dax_kinds():
    dd, fs = memory.kind("devdax"), memory.kind("fsdax")
    assert dd.page_size == PAGE_2M and fs.page_size == PAGE_4K
    assert {Feature.DAX, Feature.DEVICE, Feature.HUGE, Feature.FD, Feature.SHARED} <= set(dd.features)
    assert Feature.HUGETLB not in dd.features and dd.hugepages(8 << 20) is None and dd.min_size(4096) == PAGE_2M
    assert {Feature.DAX, Feature.FILE, Feature.FD} <= set(fs.features) and Feature.DEVICE not in fs.features
    assert memory.names(require=Feature.DAX) == ["devdax", "fsdax"]
    assert "devdax" not in memory.names(exclude=Feature.DEVICE) and "fsdax" in memory.names(exclude=Feature.DEVICE)
