// Baseline for the harness's KVM_RUN path: N port-I/O exits driven by plain ioctls.
// The guest is the real-mode loop `out %al, $0x80 ; jmp back`; only the run loop is timed.
// Usage: pio_exits [N]   (default 200000). Prints one JSON line: {"exits", "seconds", "exits_per_s"}.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BENCH_PROG "pio_exits"
#include "bench_util.h"

#define MEM_SIZE 0x10000UL
#define CODE_GPA 0x1000UL
#define PORT 0x80

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 200000;
	if (n <= 0) {
		fprintf(stderr, "pio_exits: N must be > 0\n");
		return 2;
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");

	// One 64 KiB anonymous slot at GPA 0, as Vm.add_memslot does.
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	static const uint8_t code[] = { 0xE6, 0x80, 0xEB, 0xFC }; // out %al,$0x80 ; jmp .-2
	memcpy(mem + CODE_GPA, code, sizeof(code));
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	// Real mode from reset state, but with CS at 0 so rip is the GPA.
	struct kvm_sregs sregs;
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	struct kvm_regs regs;
	xioctl(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
	regs.rip = CODE_GPA;
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	double t0 = now();
	for (long i = 0; i < n; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		// The same check the Python side makes on every exit.
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != PORT) {
			fprintf(stderr, "pio_exits: exit %ld: reason %u port %#x, expected IO on %#x\n",
				i, run->exit_reason, run->io.port, PORT);
			return 1;
		}
	}
	double t = now() - t0;

	printf("{\"exits\": %ld, \"seconds\": %.6f, \"exits_per_s\": %.1f}\n", n, t, n / t);
	munmap(run, mmap_size);
	close(vcpu);
	close(vm);
	munmap(mem, MEM_SIZE);
	close(kvm);
	return 0;
}
