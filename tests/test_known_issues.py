import re

import pytest

from harness import known_issues
from harness.known_issues import KnownIssue, load, release_in_range


def test_release_ranges():
    assert release_in_range("6.18.44-fc-v669", ">=6.18, <6.19")
    assert not release_in_range("6.19.0", ">=6.18, <6.19")
    assert release_in_range("6.1.0-27-amd64", "<6.2")
    assert release_in_range("6.18.44", "==6.18.44")


def test_applies_and_matches():
    ki = KnownIssue("x", ("cases/test_a.py::test_b[*]",), "r", backend="kvm_pvm", kernel=">=6.18",
                    config=("CONFIG_KVM=y",))
    assert ki.matches("cases/test_a.py::test_b[long64-anon]")
    assert not ki.matches("cases/test_a.py::test_c")
    cfg = frozenset({"CONFIG_KVM=y"})
    assert ki.applies("6.18.1", "kvm_pvm", cfg)
    assert not ki.applies("6.18.1", "kvm_intel", cfg)
    assert not ki.applies("6.17.9", "kvm_pvm", cfg)
    assert not ki.applies("6.18.1", "kvm_pvm", frozenset())
    assert "known kernel issue x" in ki.xfail_reason()


def test_load_file(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "a"\ncases = ["cases/*"]\nreason = "because"\nkernel = ">=6.0"\n')
    (ki,) = load(p)
    assert ki.id == "a" and ki.cases == ("cases/*",) and ki.kernel == ">=6.0"


def test_repo_file_parses():
    for ki in load():
        assert ki.cases and ki.reason


def test_kmsg_pattern_is_loaded_and_checked(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "ring"\ncases = ["cases/x.py::t"]\nreason = "r"\n'
                 "kmsg = 'dirty_ring\\.c:\\d+ kvm_dirty_ring_push'\n")
    (ki,) = load(p)
    assert ki.kmsg == r"dirty_ring\.c:\d+ kvm_dirty_ring_push"
    p.write_text('[[issue]]\nid = "bad"\ncases = ["c"]\nreason = "r"\nkmsg = "(unclosed"\n')
    with pytest.raises(re.error):
        load(p)


def test_unknown_key_is_refused(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "a"\ncases = ["c"]\nreason = "r"\nkernal = ">=6.0"\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load(p)


def test_strict_defaults_true_and_can_be_lifted(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "a"\ncases = ["c"]\nreason = "r"\n'
                 '[[issue]]\nid = "b"\ncases = ["c"]\nreason = "r"\nstrict = false\n')
    a, b = load(p)
    assert a.strict and not b.strict
    assert "not strict" in b.xfail_reason() and "not strict" not in a.xfail_reason()


def test_reproducer_must_exist(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "a"\ncases = ["c"]\nreason = "r"\nreproducer = "reproducers/a.c"\n')
    with pytest.raises(ValueError, match=r"reproducers/a\.c"):
        load(p)
    (tmp_path / "reproducers").mkdir()
    (tmp_path / "reproducers" / "a.c").write_text("int main(void) { return 0; }\n")
    (ki,) = load(p)
    assert ki.reproducer == "reproducers/a.c"


def test_repo_reproducers_exist_and_compile(tmp_path):
    """Every reproducer known-issues.toml names is there and builds warning-free on its own."""
    import shutil
    import subprocess

    from harness.known_issues import default_file

    named = {ki.reproducer for ki in load() if ki.reproducer}
    assert named, "known-issues.toml names no reproducer"
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on PATH")
    for rel in sorted(named):
        src = default_file().parent / rel
        assert src.is_file(), f"{rel} is missing"
        r = subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(tmp_path / src.stem), str(src)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"gcc -Wall -Werror {rel}:\n{r.stderr}"


def test_an_emulator_entry_applies_only_under_that_emulator(monkeypatch, tmp_path):
    from harness import known_issues as ki

    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "e"\nenvironment = "tcg"\ncases = ["c::t"]\nreason = "r"\n')
    (entry,) = ki.load(p)
    monkeypatch.delenv("KVM_HARNESS_ACCEL", raising=False)
    assert not entry.applies()  # on the host: no emulator under its KVM
    monkeypatch.setenv("KVM_HARNESS_ACCEL", "tcg")
    assert entry.applies() and entry.xfail_reason().startswith("known tcg emulator artefact e: ")
    assert not entry.applies(environment="kvm")


def test_a_paging_entry_applies_only_with_that_paging(monkeypatch, tmp_path):
    """An artefact of the CPU's own page walk (TDP) is not in force where KVM walks (shadow)."""
    from harness import known_issues as ki

    p = tmp_path / "k.toml"
    p.write_text('[[issue]]\nid = "p"\nenvironment = "tcg"\npaging = "tdp"\ncases = ["c::t"]\nreason = "r"\n')
    (entry,) = ki.load(p)
    monkeypatch.setenv("KVM_HARNESS_ACCEL", "tcg")
    assert entry.applies(paging="tdp")
    assert not entry.applies(paging="shadow")
    assert not entry.applies(environment="kvm", paging="tdp")


def test_kernel_config_from_the_runner(monkeypatch, tmp_path):
    """In the runner's guest there is no /proc/config.gz: the runner names the image's config."""
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_KVM=m\nCONFIG_KVM_SW_PROTECTED_VM=y\n# CONFIG_FOO is not set\n")
    monkeypatch.setenv(known_issues.CONFIG_ENV, str(cfg))
    monkeypatch.setattr(known_issues, "_config_cache", None)
    assert known_issues.kernel_config() == {"CONFIG_KVM=m", "CONFIG_KVM_SW_PROTECTED_VM=y"}
    monkeypatch.setattr(known_issues, "_config_cache", None)  # the next reader sees the machine's own
