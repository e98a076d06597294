"""cffi API-mode (out-of-line) builder for the KVM binding: compiled at install time (setup.py).

API mode makes a KVM_RUN a direct C call from Python, which is what lets the harness keep up with a
C program driving the same exits (see bench/).
"""

import os
import sys

from cffi import FFI

# Loaded by cffi from setup.py, before the package is importable: reach _cdefs by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cdefs import FAST_DECL, FAST_SRC, HELPERS_DECL, HELPERS_SRC, UAPI

ffibuilder = FFI()
ffibuilder.cdef(UAPI + HELPERS_DECL + FAST_DECL)
ffibuilder.set_source(
    "harness.kvm._cffi",
    HELPERS_SRC + "\n" + UAPI + "\n" + FAST_DECL + FAST_SRC,
    extra_compile_args=["-O2", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
