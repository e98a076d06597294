// Baseline for vm_create_to_ucall (bench/vmcreate.py): N VMs, each from open(/dev/kvm) to the
// checksum guest's first ucall in long mode, then torn down; the same syscalls in the same order
// as the harness's vm_with_vcpus + run_until_ucall (the correspondence is in bench/vmcreate.py).
// The guest comes from IMAGE_DIR (bench/image.py: the boot-slot ranges the harness wrote, regs).
// Usage: vm_create IMAGE_DIR N
// Prints one JSON line: {"vms", "seconds", "vms_per_s", "cycles_per_s"}.
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
#include <unistd.h>

#define BENCH_PROG "vm_create"
#include "bench_util.h"
#include "guest_image.h"

static void one_vm(const struct image *img, uint64_t sum, double *to_ucall, double *total)
{
	double t0 = now();
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	struct kvm_cpuid2 *cpuid = supported_cpuid(kvm);
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *boot = mmap(NULL, BOOT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (boot == MAP_FAILED)
		die("mmap boot slot");
	add_slot(vm, 0, 0, BOOT_SIZE, 0, boot);
	image_apply(img, boot);

	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	xioctl(vcpu, KVM_SET_SREGS, (void *)&img->sregs, "KVM_SET_SREGS");
	// add_vcpu: rip/rsp/rdi, then set_args(vm.arg); the case's set_args(desc)
	for (int i = 0; i < 3; i++) {
		xioctl(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
		xioctl(vcpu, KVM_SET_REGS, (void *)&img->regs, "KVM_SET_REGS");
	}
	struct ucall *uc = run_to_ucall(vcpu, run, boot);
	expect_ucall(uc, UCALL_SYNC, "checksum");
	if (uc->args[0] != sum) {
		fprintf(stderr, "vm_create: checksum %#lx, expected %#lx\n", (unsigned long)uc->args[0],
			(unsigned long)sum);
		exit(1);
	}
	double t1 = now();

	munmap(run, run_size);
	close(vcpu);
	close(vm);
	close(kvm);
	munmap(boot, BOOT_SIZE);
	free(cpuid);
	double t2 = now();
	*to_ucall += t1 - t0;
	*total += t2 - t0;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: vm_create IMAGE_DIR N\n");
		return 2;
	}
	long n = strtol(argv[2], NULL, 0);
	if (n <= 0)
		return 2;
	struct image img;
	image_load(argv[1], &img);
	uint64_t sum = image_param(&img, "sum");

	double to_ucall = 0, total = 0;
	one_vm(&img, sum, &to_ucall, &total); // warm-up, as the harness side
	to_ucall = total = 0;
	for (long i = 0; i < n; i++)
		one_vm(&img, sum, &to_ucall, &total);
	printf("{\"vms\": %ld, \"seconds\": %.6f, \"vms_per_s\": %.1f, \"cycles_per_s\": %.1f}\n", n, to_ucall,
	       n / to_ucall, n / total);
	return 0;
}
