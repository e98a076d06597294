# Run the suite on another kernel under QEMU (harness/qemu, docs/kernel-runner.md).
#   make kernel-test KERNEL=path/to/bzImage [MODULES=dir] [CASES="pytest args"] [KERNEL_ARGS="--mem 4G ..."]
#   make kernel-test                  # no KERNEL: Debian's packaged kernel, fetched into the cache
#   make kernel-fetch                 # Debian's $(DEBIAN_KERNEL) (default debian:6.1) into $(KERNEL_CACHE)
#   make kernel-smoke                 # fetch, then the runner's real-boot tests (tests/test_kernel_runner.py)
#   make kvm-build [KVM_BUILD=debian:7.3.4+KVM_SW_PROTECTED_VM=y]   # KVM rebuilt with options, cached
# Under `git bisect run` call `python -m harness kernel` itself: make turns every failing recipe into
# exit 2, which would lose the 125 (cannot test) answer.

KERNEL_CACHE ?= .cache/kernels
DEBIAN_KERNEL ?= debian:6.1
# the smoke subset: fds and capabilities, a guest in every x86 mode, guest_memfd (skips on 6.1)
KERNEL_SMOKE_CASES ?= cases/test_system.py cases/test_guest_modes.py::test_checksum_in_every_mode \
	cases/test_backings.py::test_guest_memfd_source
CASES ?= $(KERNEL_SMOKE_CASES)
KERNEL_ARGS ?=
DEBIAN_KERNEL_DIR := $(KERNEL_CACHE)/debian/current

.PHONY: kernel-fetch kernel-test kernel-smoke

# Debian's kernel by name (harness/qemu/debian.py: a private apt configuration under .cache/kernels/apt,
# never the machine's own), unpacked into .cache/kernels/debian/<abi>/; `current` points at it. No apt:
# say so, succeed, and let the smoke tests skip with that reason.
kernel-fetch: venv
	@if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
		echo "kernel-fetch: no apt-get/dpkg-deb on this machine: Debian's kernel cannot be fetched (QEMU smoke tests skip)"; \
		exit 0; fi; \
	$(PY) -m harness kernel fetch $(DEBIAN_KERNEL) --link current

ifeq ($(KERNEL),)
kernel-test: setup kernel-fetch
	$(PY) -m harness kernel --kernel $(DEBIAN_KERNEL) $(KERNEL_ARGS) -- $(CASES)
else
kernel-test: setup
	$(PY) -m harness kernel --kernel $(KERNEL) $(if $(MODULES),--modules $(MODULES)) $(KERNEL_ARGS) -- $(CASES)
endif

kernel-smoke: setup kernel-fetch
	$(PYTEST) tests/test_kernel_runner.py -v $(PYTEST_ARGS)

# The selection on several kernels, one table (harness/matrix, docs/matrix.md):
#   make matrix [MATRIX_KERNELS=host,debian:6.1,...] [CASES="pytest args"] [MATRIX_SHARDS=N]
# Each kernel's guests run side by side (--shards auto: one TCG guest per host core, as memory
# allows): the full suite on debian:7.3.4 took 28.8 min in one guest, 10.1 min in two here.
MATRIX_KERNELS ?= host,debian:6.1,debian:6.12,debian:7.2,debian:7.3
MATRIX_SHARDS ?= auto
.PHONY: matrix
matrix: setup
	$(PY) -m harness matrix --kernels $(MATRIX_KERNELS) --shards $(MATRIX_SHARDS) --check-known-issues -- $(CASES)

# A packaged kernel with kvm.ko, kvm-amd.ko, kvm-intel.ko rebuilt from Debian's sources with KVM options
# (harness/qemu/kvmbuild.py, docs/kernel-runner.md): debootstrap + make in a chroot under .cache/chroots/,
# the result in .cache/kvm-builds/; about 5 min the first time, a cache hit after. Then
#   make kernel-test KERNEL=$(KVM_BUILD)   or   --kernel $(KVM_BUILD) / --kernels ...,$(KVM_BUILD)
KVM_BUILD ?= debian:7.3.4+KVM_SW_PROTECTED_VM=y
KVM_BUILD_ARGS ?=
.PHONY: kvm-build
kvm-build: venv
	$(PY) -m harness kernel build-kvm $(KVM_BUILD) $(KVM_BUILD_ARGS)
