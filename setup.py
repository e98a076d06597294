# setuptools needs a setup.py to hand cffi_modules to cffi; all metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["harness/kvm/_build.py:ffibuilder", "harness/race/_fast_build.py:ffibuilder"])
