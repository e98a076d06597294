# kvm-harness. `make check`: the KVM suite; `make test`: the harness's own tests and the suite.
# Each target does its own set-up: a venv with the package installed (cffi module compiled) and
# the guest payloads built. Nothing is installed by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: all setup venv guests check test unit unit-fast bench lint clean

all: setup

$(VENV)/.installed: pyproject.toml setup.py harness/kvm/_cdefs.py harness/kvm/_build.py \
		harness/race/_fast_cdefs.py harness/race/_fast_build.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

guests:
	$(MAKE) -C guests

setup: venv guests

# The KVM suite against the real /dev/kvm: `make ci` (mk/ci.mk) runs it in parallel, writes
# results/ktap.txt + junit.xml, and checks the KTAP with the strict parser in tests/.
check: ci

# The harness's own tests (pure logic), then the suite. --dist worksteal with tests/conftest.py's order:
# the real QEMU boots (@pytest.mark.real_boot, minutes each under TCG) start first, one per worker, and
# the short tests fill in around them. `make unit-fast` leaves the real boots out.
unit: setup
	$(PYTEST) tests/ -n $(JOBS) --dist worksteal $(PYTEST_ARGS)

unit-fast: setup
	$(PYTEST) tests/ -n $(JOBS) --dist worksteal -m "not real_boot" $(PYTEST_ARGS)

test: unit check

# Harness vs C pairs (docs/bench.md); the record goes to results/bench/<date>-<commit>.json.
BENCH_ARGS ?=
bench: setup
	$(MAKE) -C bench
	$(PY) -m bench --record-dir results/bench $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	$(MAKE) -C guests clean
	-$(MAKE) -C bench clean
	rm -rf $(VENV) harness/kvm/_cffi*.so build *.egg-info

# Targets of one area each (ci, kernel-test, ...) live in mk/*.mk.
-include mk/*.mk
