"""cffi API-mode builder for harness.race._cfast (the race disruptors' inner loops in C); compiled
at install time (setup.py), like harness/kvm/_build.py."""

import os
import sys

from cffi import FFI

# Loaded by cffi from setup.py, before the package is importable: reach _fast_cdefs by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fast_cdefs import CDEF, SRC

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("harness.race._cfast", SRC, extra_compile_args=["-O2", "-Wno-unused-parameter"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
