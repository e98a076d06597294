"""pio_exits: KVM_RUN round trips on a real-mode `out %al, $0x80 ; jmp back` loop.

Mirrors bench/pio_exits.c step for step: same slot, guest bytes, real-mode set-up, and the same
per-exit check. Two harness sides: `pio_exits` through the fast path (the OUT absorbed in C by
Vcpu.run_absorbing, the way a case has a device port's exits counted without a Python round trip),
and `pio_exits_python` with every exit decoded into a Python Io object by Vcpu.run() (what a case's
on_exit handler sees).
"""

from __future__ import annotations

import time

from bench.registry import Bench, c_program, register
from harness.kvm.exits import Io
from harness.kvm.system import Kvm

MEM_SIZE = 0x10000
CODE_GPA = 0x1000
PORT = 0x80
CODE = bytes([0xE6, PORT, 0xEB, 0xFC])  # out %al, $0x80 ; jmp .-2


def harness_pio_exits(n: int) -> float:
    """n exits absorbed by the fast path (one Vcpu.run_absorbing(n)); exits/s, timing the run only."""
    return _pio(n, fast=True)


def harness_pio_exits_python(n: int) -> float:
    """n exits each returned by Vcpu.run() as an Io; exits/s, timing the run loop only (as the C does)."""
    return _pio(n, fast=False)


def _pio(n: int, *, fast: bool) -> float:
    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        try:
            vm.add_memslot(0, MEM_SIZE)
            vm.write(CODE_GPA, CODE)
            vcpu = vm.create_vcpu()
            s = vcpu.get_sregs()
            s.cs.base = 0
            s.cs.selector = 0
            vcpu.set_sregs(s)
            r = vcpu.get_regs()
            r.rip = CODE_GPA
            vcpu.set_regs(r)
            # CLOCK_MONOTONIC, the clock the C program uses
            if fast:
                vcpu.absorb_out(PORT)
                t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
                ex = vcpu.run_absorbing(n)
                t = time.clock_gettime(time.CLOCK_MONOTONIC) - t0
                got = vcpu.absorbed_exits()
                # the C loop's per-exit check (IO on PORT) ran in kh_run_fast: anything else left it
                if type(ex) is not Io or ex.port != PORT or got["pio_out"] != n:
                    raise RuntimeError(f"after {got}: {ex!r}, expected {n} IO exits on port {PORT:#x}")
            else:
                t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
                for i in range(n):
                    ex = vcpu.run()
                    if type(ex) is not Io or ex.port != PORT:
                        raise RuntimeError(f"exit {i}: {ex!r}, expected IO on port {PORT:#x}")
                t = time.clock_gettime(time.CLOCK_MONOTONIC) - t0
        finally:
            vm.close()
    finally:
        kvm.close()
    return n / t


PIO_EXITS = register(Bench(
    name="pio_exits",
    label="pio exits",
    c_cmd=c_program("pio_exits"),
    c_rate_key="exits_per_s",
    py=harness_pio_exits,
    count_option="exits",
    default_count=200_000,
    target=0.95,
    unit="exits/s",
))

PIO_EXITS_PYTHON = register(Bench(
    name="pio_exits_python",
    label="pio exits, each decoded in Python",
    c_cmd=c_program("pio_exits"),
    c_rate_key="exits_per_s",
    py=harness_pio_exits_python,
    count_option="exits",
    default_count=200_000,
    target=0.6,
    unit="exits/s",
))
