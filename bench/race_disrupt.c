// Baseline for the race engine's host side (harness/race): one vCPU runs the race_toucher guest
// over a 2 MiB region while this thread mutates the region's backing N times, each op exactly as
// harness/race/disruptors.py does it: per-page seqlock odd in gentab[], note whether the vCPU is in
// KVM_RUN, the syscall(s), note again, the new generation's tag in every page of the range, gentab
// even. The guest (boot slot image, registers) is the one the harness builds, dumped by
// bench/race.py into IMAGE_DIR, so both sides run the same guest code over the same layout.
//
// Usage: race_disrupt IMAGE_DIR punch|remap|slot-readd N [CPU_DISRUPT,CPU_VCPU]
//   (the optional pinning is the same the harness side uses in bench/race.py)
//   punch: fallocate(PUNCH_HOLE|KEEP_SIZE) on a memfd (shmem)
//   remap: munmap + mmap(MAP_FIXED_NOREPLACE) of private anonymous memory
//   slot-readd: KVM_SET_USER_MEMORY_REGION delete + re-add of the region's memslot (same GPA, same
//     private anonymous memory), every op over the whole region, then the seeded pause the harness
//     draws for that op (IMAGE_DIR/gaps.txt: ns per op count, cycled), as SlotReadd.step does
// Prints one JSON line: {"ops", "seconds", "host_ops_per_s", "sweeps", "sweeps_per_s", "overlapped",
// "violations"}.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BENCH_PROG "race_disrupt"
#include "bench_util.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define BOOT_SIZE (16UL << 20)
#define UCALL_PORT 0x1000
#define VIOLATION 0x5aceULL
#define MAGIC 0xa5c3ULL
#define GEN_MASK 0xfffffffULL
#define SCHED 4096

static void read_file(const char *dir, const char *name, void *buf, size_t len)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die(path);
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, (char *)buf + got, len - got);
		if (n <= 0)
			die(path);
		got += n;
	}
	close(fd);
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL) };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static uint64_t tag_base(uint64_t gen) { return (MAGIC << 48) | ((gen & GEN_MASK) << 20); }

// same draw as Disruptor.schedule(): mostly 1-4 pages, sometimes 8 or 16
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static uint8_t *boot;
static struct kvm_run *run;
static int vcpu_fd;
static atomic_int in_run;
static atomic_long violations;
static int vcpu_failed;

static int pin_vcpu = -1;

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

static void *vcpu_main(void *arg)
{
	(void)arg;
	if (pin_vcpu >= 0)
		pin(pin_vcpu);
	for (;;) {
		atomic_store_explicit(&in_run, 1, memory_order_relaxed);
		int rc = ioctl(vcpu_fd, KVM_RUN, 0);
		atomic_store_explicit(&in_run, 0, memory_order_relaxed);
		if (rc < 0) {
			if (errno == EINTR || errno == EFAULT)
				continue;
			perror("race_disrupt: KVM_RUN");
			vcpu_failed = 1;
			return NULL;
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == UCALL_PORT) {
			uint32_t gpa;
			memcpy(&gpa, (uint8_t *)run + run->io.data_offset, 4);
			uint64_t *uc = (uint64_t *)(boot + gpa);
			if (uc[0] == 1 && uc[2] == VIOLATION) {
				atomic_fetch_add(&violations, 1);
				continue;
			}
			if (uc[0] == 3)
				return NULL; // DONE
			if (uc[0] == 4)
				continue; // PRINTF
			fprintf(stderr, "race_disrupt: guest ucall %lu: %s\n", (unsigned long)uc[0],
				(char *)&uc[9 + 16]);
			vcpu_failed = 1;
			return NULL;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			if (!run->mmio.is_write) {
				uint64_t poison = 0x6d6d696fdeadf00dULL;
				memcpy(run->mmio.data, &poison, run->mmio.len);
			}
			continue;
		}
		fprintf(stderr, "race_disrupt: unexpected exit %u\n", run->exit_reason);
		vcpu_failed = 1;
		return NULL;
	}
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fprintf(stderr, "usage: race_disrupt IMAGE_DIR punch|remap|slot-readd N [CPU_DISRUPT,CPU_VCPU]\n");
		return 2;
	}
	int pin_disrupt = -1;
	if (argc == 5 && sscanf(argv[4], "%d,%d", &pin_disrupt, &pin_vcpu) != 2) {
		fprintf(stderr, "race_disrupt: pinning %s (CPU,CPU)\n", argv[4]);
		return 2;
	}
	const char *dir = argv[1];
	int remap = !strcmp(argv[2], "remap");
	int readd = !strcmp(argv[2], "slot-readd");
	if (!remap && !readd && strcmp(argv[2], "punch")) {
		fprintf(stderr, "race_disrupt: mode %s (punch|remap|slot-readd)\n", argv[2]);
		return 2;
	}
	long n = strtol(argv[3], NULL, 0);
	if (n <= 0)
		return 2;

	// params: ctrl_gpa gentab_gpa region stride gpa
	unsigned long ctrl_gpa, gentab_gpa, region, stride, gpa;
	{
		char path[4096];
		snprintf(path, sizeof(path), "%s/params.txt", dir);
		FILE *f = fopen(path, "r");
		if (!f || fscanf(f, "%lu %lu %lu %lu %lu", &ctrl_gpa, &gentab_gpa, &region, &stride, &gpa) != 5)
			die("params.txt");
		fclose(f);
	}
	unsigned long npages = region / stride;
	// slot-readd: the harness's seeded pauses (Disruptor.gaps), ns
	static uint64_t gaps[SCHED];
	if (readd) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/gaps.txt", dir);
		FILE *f = fopen(path, "r");
		for (int i = 0; i < SCHED; i++)
			if (!f || fscanf(f, "%lu", &gaps[i]) != 1)
				die("gaps.txt");
		fclose(f);
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	boot = mmap(NULL, BOOT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (boot == MAP_FAILED)
		die("mmap boot");
	read_file(dir, "boot.bin", boot, BOOT_SIZE);
	struct kvm_userspace_memory_region r0 = { .slot = 0, .guest_phys_addr = 0, .memory_size = BOOT_SIZE,
						  .userspace_addr = (uintptr_t)boot };
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &r0, "slot 0");

	int fd = -1;
	int flags = MAP_PRIVATE | MAP_ANONYMOUS;
	if (!remap && !readd) {
		fd = memfd_create("race_disrupt", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, region) < 0)
			die("memfd");
		flags = MAP_SHARED;
	}
	uint8_t *mem = mmap(NULL, region, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (mem == MAP_FAILED)
		die("mmap region");
	struct kvm_userspace_memory_region r1 = { .slot = 1, .guest_phys_addr = gpa, .memory_size = region,
						  .userspace_addr = (uintptr_t)mem };
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &r1, "slot 1");

	volatile uint64_t *ctrl = (volatile uint64_t *)(boot + ctrl_gpa);
	volatile uint64_t *gentab = (volatile uint64_t *)(boot + gentab_gpa);
	uint64_t gen = 1;
	for (unsigned long p = 0; p < npages; p++) {
		*(volatile uint64_t *)(mem + p * stride) = tag_base(gen) + p;
		gentab[p] = 2 * gen;
	}
	ctrl[0] = 0;
	ctrl[1] = 0;

	vcpu_fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = 256;
	xioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID");
	xioctl(vcpu_fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	read_file(dir, "sregs.bin", &sregs, sizeof(sregs));
	read_file(dir, "regs.bin", &regs, sizeof(regs));
	xioctl(vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	xioctl(vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	// the schedule, drawn up front as the harness does
	static unsigned long sched_off[SCHED], sched_len[SCHED];
	static const unsigned kchoice[] = { 1, 1, 1, 2, 2, 3, 4, 8, 16 };
	for (int i = 0; i < SCHED; i++) {
		unsigned long k = kchoice[rnd() % 9];
		if (k > npages)
			k = npages;
		unsigned long first = rnd() % (npages - k + 1);
		sched_off[i] = first * stride;
		sched_len[i] = k * stride;
	}

	if (pin_disrupt >= 0)
		pin(pin_disrupt);
	pthread_t th;
	if (pthread_create(&th, NULL, vcpu_main, NULL))
		die("pthread_create");
	volatile uint64_t *sweeps = &ctrl[16]; // vcpu[0].sweeps at ctrl + 128
	double wait_end = now() + 10;
	while (*sweeps < 1 && !vcpu_failed) {
		if (now() > wait_end) {
			fprintf(stderr, "race_disrupt: no first sweep in 10 s\n");
			return 1;
		}
		usleep(1000);
	}

	long overlapped = 0;
	uint64_t seq = 0;
	uint64_t s0 = *sweeps;
	double t0 = now();
	for (long i = 0; i < n && !vcpu_failed; i++) {
		unsigned long off = sched_off[i % SCHED], len = sched_len[i % SCHED];
		if (readd) { // whole region, as every memslot op
			off = 0;
			len = region;
		}
		unsigned long p0 = off / stride, p1 = (off + len + stride - 1) / stride;
		ctrl[0] = ++seq;
		for (unsigned long p = p0; p < p1; p++)
			gentab[p] = 2 * gen + 1;
		int was = atomic_load_explicit(&in_run, memory_order_relaxed);
		if (readd) {
			r1.memory_size = 0;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r1))
				die("KVM_SET_USER_MEMORY_REGION delete");
			r1.memory_size = region;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r1))
				die("KVM_SET_USER_MEMORY_REGION re-add");
		} else if (remap) {
			if (munmap(mem + off, len))
				die("munmap");
			if (mmap(mem + off, len, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != mem + off)
				die("mmap MAP_FIXED_NOREPLACE");
		} else if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len)) {
			die("fallocate");
		}
		if (was && atomic_load_explicit(&in_run, memory_order_relaxed))
			overlapped++;
		gen++;
		for (unsigned long p = p0; p < p1; p++)
			*(volatile uint64_t *)(mem + p * stride) = tag_base(gen) + p;
		for (unsigned long p = p0; p < p1; p++)
			gentab[p] = 2 * gen;
		if (readd && gaps[(i + 1) % SCHED])
			sleep_ns(gaps[(i + 1) % SCHED]);
	}
	double t = now() - t0;
	uint64_t s1 = *sweeps;

	ctrl[1] = 1; // stop
	pthread_join(th, NULL);
	if (vcpu_failed)
		return 1;
	printf("{\"ops\": %ld, \"seconds\": %.6f, \"host_ops_per_s\": %.1f, \"sweeps\": %lu, "
	       "\"sweeps_per_s\": %.1f, \"overlapped\": %ld, \"violations\": %ld}\n",
	       n, t, n / t, (unsigned long)(s1 - s0), (s1 - s0) / t, overlapped, atomic_load(&violations));
	return 0;
}
