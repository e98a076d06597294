"""Two processes fetching the same Debian kernel at once: one downloads and unpacks, the other waits
and finds it fetched (CI once had two xdist workers wipe each other's half-unpacked directory).
The download itself is replaced; the lock, the re-check under it and the cache layout are real."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from harness.qemu import debian

K = debian.Kernel("9.9.9+test-amd64", "linux-image-9.9.9+test-amd64", "9.9.9-1", "9.9.9",
                  ("linux-image-9.9.9+test-amd64",))


def test_one_fetch_per_version_at_a_time(tmp_path: Path, monkeypatch) -> None:
    arch = debian.Archive(tmp_path)
    calls: list[str] = []
    inside = threading.Event()

    def fake_fetch_locked(self, k, log=print):
        calls.append(threading.current_thread().name)
        inside.set()
        time.sleep(0.5)  # the other fetch arrives while this one is unpacking
        mods = self.kernel_dir(k) / "root" / "usr" / "lib" / "modules" / k.abi
        mods.mkdir(parents=True)
        (mods / "vmlinuz").write_bytes(b"MZ")
        f = debian._locate(k, self.kernel_dir(k) / "root")
        (self.kernel_dir(k) / "fetched.json").write_text(json.dumps(f.to_json()))
        return f

    monkeypatch.setattr(debian.Archive, "_fetch_locked", fake_fetch_locked)
    results: dict[str, debian.Fetched] = {}
    logs: dict[str, list[str]] = {"a": [], "b": []}

    def fetch(name: str) -> None:
        results[name] = arch.fetch(K, log=logs[name].append)

    a = threading.Thread(target=fetch, args=("a",), name="a")
    a.start()
    assert inside.wait(5)
    b = threading.Thread(target=fetch, args=("b",), name="b")
    b.start()
    a.join(10)
    b.join(10)
    assert calls == ["a"], f"the kernel was fetched by {calls}"
    assert results["a"].vmlinuz == results["b"].vmlinuz and results["b"].vmlinuz.is_file()
    assert any("fetched by another process meanwhile" in m for m in logs["b"]), logs
    # a third fetch finds the cache without taking the lock path
    assert arch.fetch(K, log=logs["a"].append).vmlinuz == results["a"].vmlinuz and calls == ["a"]
