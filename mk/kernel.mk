# Run the suite on another kernel under QEMU (harness/qemu, docs/kernel-runner.md).
#   make kernel-test KERNEL=path/to/bzImage [MODULES=dir] [CASES="pytest args"] [KERNEL_ARGS="--cpus 2 ..."]
#   make kernel-test                  # no KERNEL: Debian's packaged kernel, fetched into the cache
#   make kernel-fetch                 # apt-get download + dpkg-deb -x of that kernel into $(KERNEL_CACHE)
#   make kernel-smoke                 # fetch, then the runner's real-boot tests (tests/test_kernel_runner.py)
# Under `git bisect run` call `python -m harness kernel` itself: make turns every failing recipe into
# exit 2, which would lose the 125 (cannot test) answer.

KERNEL_CACHE ?= .cache/kernels
DEBIAN_KERNEL_META ?= linux-image-amd64
# the smoke subset: fds and capabilities, a guest in every x86 mode, guest_memfd (skips on 6.1)
KERNEL_SMOKE_CASES ?= cases/test_system.py cases/test_guest_modes.py::test_checksum_in_every_mode \
	cases/test_backings.py::test_guest_memfd_source
CASES ?= $(KERNEL_SMOKE_CASES)
KERNEL_ARGS ?=
DEBIAN_KERNEL_DIR := $(KERNEL_CACHE)/debian/current

.PHONY: kernel-fetch kernel-test kernel-smoke

# Resolves the metapackage to today's linux-image-X.Y.Z-N-amd64, downloads it with apt-get (as the
# package manager's own client) and unpacks it; `current` points at it. No apt: say so, succeed, and
# let the smoke tests skip with that reason.
kernel-fetch:
	@if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
		echo "kernel-fetch: no apt-get/dpkg-deb on this machine: Debian's kernel cannot be fetched (QEMU smoke tests skip)"; \
		exit 0; fi; \
	pkg=$$(apt-cache depends $(DEBIAN_KERNEL_META) 2>/dev/null | awk '/Depends: linux-image-/ {print $$2; exit}'); \
	if [ -z "$$pkg" ]; then echo "kernel-fetch: apt knows no $(DEBIAN_KERNEL_META) (apt-get update?)"; exit 1; fi; \
	dir=$(KERNEL_CACHE)/debian/$$pkg; \
	if [ ! -f $$dir/.extracted ]; then \
		rm -rf $$dir && mkdir -p $$dir/deb && \
		(cd $$dir/deb && apt-get download -q -o APT::Sandbox::User=root $$pkg) && \
		dpkg-deb -x $$dir/deb/$${pkg}_*.deb $$dir/root && rm -rf $$dir/deb && touch $$dir/.extracted; \
	fi; \
	ln -sfn $$pkg/root $(DEBIAN_KERNEL_DIR); \
	echo "kernel-fetch: $$(ls $(DEBIAN_KERNEL_DIR)/boot/vmlinuz-*) (modules in $(DEBIAN_KERNEL_DIR)/lib/modules)"

ifeq ($(KERNEL),)
kernel-test: setup kernel-fetch
	$(PY) -m harness kernel --kernel "$$(ls $(DEBIAN_KERNEL_DIR)/boot/vmlinuz-* | head -1)" $(KERNEL_ARGS) -- $(CASES)
else
kernel-test: setup
	$(PY) -m harness kernel --kernel $(KERNEL) $(if $(MODULES),--modules $(MODULES)) $(KERNEL_ARGS) -- $(CASES)
endif

kernel-smoke: setup kernel-fetch
	$(PYTEST) tests/test_kernel_runner.py -v $(PYTEST_ARGS)
