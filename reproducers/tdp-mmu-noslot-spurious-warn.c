// SPDX-License-Identifier: GPL-2.0
/*
 * tdp-mmu-noslot-spurious-warn: re-adding a memslot while vCPUs touch its GPAs makes KVM's x86 MMU
 * WARN that a shadow-present SPTE maps "another" pfn than the fault resolved:
 *
 *   WARNING: arch/x86/kvm/mmu/tdp_mmu.c:1137 at kvm_tdp_mmu_map+0x5cd/0x7b0 [kvm]   (Debian 7.3.4)
 *     kvm_tdp_page_fault <- kvm_mmu_do_page_fault <- kvm_mmu_page_fault <- npf_interception
 *
 * i.e. WARN_ON_ONCE(fault->pfn != spte_to_pfn(iter->old_spte)) in the spurious-fault path of
 * tdp_mmu_map_handle_target_level() (added upstream by 988da7820206 "KVM: x86/tdp_mmu: WARN if PFN
 * changes for spurious faults", 6.15/6.16; Debian 6.12.117 has no such WARN). The fault that
 * warns is an emulated-MMIO ("no memslot") fault: its fault->pfn is KVM_PFN_NOSLOT, not a pfn.
 * The interleaving, with two vCPUs:
 *
 *   vCPU B: touches GPA g while the slot is deleted; kvm_mmu_do_page_fault() looks g up in the
 *           memslots of that moment (none), kvm_handle_noslot_fault() sets fault->slot = NULL,
 *           fault->pfn = KVM_PFN_NOSLOT and returns RET_PF_CONTINUE (MMIO caching on); B has not
 *           taken mmu_lock yet (preempted, or just slower).
 *   host:   KVM_SET_USER_MEMORY_REGION creates the slot again: kvm_swap_active_memslots()
 *           publishes the new memslots, then waits in synchronize_srcu_expedited() for B.
 *           A CREATE zaps nothing, invalidates no root and does not bump mmu_invalidate_seq.
 *   vCPU A: touches g, finds the new slot, faults the page in: a shadow-present SPTE for g.
 *   vCPU B: takes mmu_lock; is_page_fault_stale() is false (root still valid, and the
 *           mmu_invalidate_seq check is skipped for fault->slot == NULL); kvm_tdp_mmu_map() finds
 *           A's present leaf SPTE, the "access already allowed" spurious path compares
 *           KVM_PFN_NOSLOT with its pfn and WARNs (and returns RET_PF_SPURIOUS: the guest just
 *           retries, so nothing else goes wrong; when A's SPTE is a 2 MiB one, B first splits it
 *           into 4 KiB SPTEs because a no-slot fault's goal level is 4 KiB).
 * With kvm.tdp_mmu=0 the same fault reaches mmu_set_spte(), which, for a 4 KiB SPTE of A's, WARNs on
 * the pfn change (WARN_ON_ONCE(vcpu->arch.mmu->root_role.direct), mmu.c:3135 in 7.3.4), drops A's
 * SPTE and installs an MMIO SPTE (a 2 MiB SPTE is replaced without a WARN: run with -n there).
 * With kvm.mmio_caching=0 a no-slot fault is emulated before it touches the SPTEs: no WARN.
 * One vCPU cannot hit it (A and B must be different vCPUs).
 *
 * What this program does: 2 vCPUs (flat 32-bit protected mode, no paging) sweep a 2 MiB region
 * of private anonymous memory (MADV_HUGEPAGE) at GPA 1 GiB, reading the first word of each 4 KiB
 * page (vCPU 0 also writes one), while the main thread deletes and re-creates the region's memslot
 * (same GPA, same memory), with a short pause (0.1-1 ms) after some of them. Guest accesses
 * while the slot is gone exit to userspace as MMIO (reads answer 0, writes are dropped). The
 * oracle is the kernel log: a WARNING from arch/x86/kvm/mmu/ during the race (read from
 * /dev/kmsg) is the bug. The WARN fires once per boot (WARN_ON_ONCE): if this boot's log already
 * holds it, that is reported (exit 1) without racing.
 *
 * Build: gcc -O2 -pthread -o tdp-mmu-noslot-spurious-warn tdp-mmu-noslot-spurious-warn.c
 * Run:   ./tdp-mmu-noslot-spurious-warn [options]     (as root: /dev/kmsg)
 *   -s SECONDS   race for at most this long (default 20; stops at the first WARN)
 *   -v VCPUS     vCPUs (default 2; 1 never reproduces)
 *   -n           MADV_NOHUGEPAGE on the region instead of MADV_HUGEPAGE
 *   -c           count: clear the kernel's WARN_ONCE state (debugfs clear_warn_once) before the
 *                race and after each WARN, and race for the whole time (a rate, not a verdict;
 *                it makes every once-only WARN of the kernel able to fire again)
 *   -t           trace: enable the kvmmmu trace events with traceoff_on_warning, and print the
 *                faults just before the WARN (kvm_mmu_spte_requested shows the faulting gfn's
 *                pfn: 8000000000000000 is KVM_PFN_NOSLOT)
 *   -f           race even with kvm.mmio_caching=N (where the path cannot be reached: a control)
 * Needs: x86 /dev/kvm, root (for /dev/kmsg; -c and -t also debugfs/tracefs).
 *
 * Seen (Debian kernels, kvm_amd nested under QEMU TCG, one L1 CPU, 2026-12-04; -c, per 30 s):
 * 7.3.4 81-88 WARNs (the first after 0.15-0.23 s), 7.2.6 74, 7.2.12 60, 7.2.13 88, 6.18.5 5,
 * 6.18.15 2, 6.16.3 2; 0 with -v 1 on every kernel; 0 with kvm.mmio_caching=0; 7.3.4 with -n
 * 18 per 60 s. With -t (7.3.4):
 *   repro-130  kvm_mmu_set_spte: gfn 40000 spte dc00ee7 (rwxu) level 2          <- A: the new slot
 *   repro-131  kvm_mmu_spte_requested: gfn 40187 pfn 8000000000000000 level 1    <- B: KVM_PFN_NOSLOT
 *   repro-131  kvm_mmu_split_huge_page: gfn 40000 spte dc00ee7 level 2 errno 0   <- then the WARN
 *
 * Exit codes: 0 = no MMU WARN within the time (not reproduced: it is a race, the rate is in the
 *                 output of the known issue's evidence)
 *             1 = reproduced: prints the WARNING record (or found it earlier in this boot's log)
 *             2 = the reproducer itself failed (prints why)
 *             4 = cannot test here (no /dev/kvm, no /dev/kmsg, kvm.mmio_caching=N; prints why)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#define PAGE 4096ULL
#define HUGE (2ULL << 20)
#define SLOT0_SIZE 0x10000ULL
#define CODE_GPA 0x1000ULL
#define REGION_SLOT 1U
#define REGION_GPA 0x40000000ULL
#define REGION_SIZE HUGE
#define MAX_VCPUS 8
#define TRACEFS "/sys/kernel/tracing"
#define DEBUGFS "/sys/kernel/debug"

struct vcpu {
	int id, fd;
	pthread_t thread;
	struct kvm_run *run;
	unsigned long runs, mmio_reads, mmio_writes;
	char error[160];
};

static int vm_fd, run_size, kmsg_fd = -1, printed_warns;
static struct vcpu vcpus[MAX_VCPUS];
static volatile int stop;
static void *region;

static void skip(const char *why)
{
	printf("SKIP: %s\n", why);
	exit(4);
}

static void die(const char *what)
{
	printf("ERROR: %s: %s\n", what, strerror(errno));
	exit(2);
}

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC), r;

	if (fd < 0)
		return -1;
	r = write(fd, s, strlen(s)) == (ssize_t)strlen(s) ? 0 : -1;
	close(fd);
	return r;
}

static int read_file(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t r;

	if (fd < 0)
		return -1;
	r = read(fd, buf, n - 1);
	close(fd);
	if (r < 0)
		return -1;
	buf[r] = 0;
	return 0;
}

/* ---- the oracle: WARNING records from the x86 MMU in /dev/kmsg ---------------------------------- */

static int is_mmu_warn(const char *msg)
{
	return strstr(msg, "WARNING:") && strstr(msg, "arch/x86/kvm/mmu/");
}

/* Read the records logged since the last call; print (with `prefix`) and count the MMU WARNs. */
static int drain_kmsg(const char *prefix)
{
	char buf[8192];
	int found = 0;

	for (;;) {
		ssize_t n = read(kmsg_fd, buf, sizeof(buf) - 1);
		char *msg;

		if (n < 0) {
			if (errno == EPIPE)	/* overwritten before we read it: go on */
				continue;
			break;		/* EAGAIN: nothing more */
		}
		buf[n] = 0;
		msg = strchr(buf, ';');
		if (!msg || !is_mmu_warn(msg + 1))
			continue;
		found++;
		if (printed_warns++ < 3) {
			char *nl = strchr(msg + 1, '\n');

			if (nl)
				*nl = 0;
			printf("%s%s\n", prefix, msg + 1);
		}
	}
	return found;
}

static int clear_warn_once(void)
{
	if (access(DEBUGFS "/clear_warn_once", W_OK) != 0)
		mount("debugfs", DEBUGFS, "debugfs", 0, NULL);
	return write_file(DEBUGFS "/clear_warn_once", "1");
}

/* ---- optional tracing: the faults right before the WARN ----------------------------------------- */

static const char *const trace_events[] = {
	"kvmmmu/kvm_mmu_spte_requested", "kvmmmu/kvm_mmu_set_spte", "kvmmmu/kvm_mmu_split_huge_page",
	"kvmmmu/kvm_tdp_mmu_spte_changed", "kvmmmu/mark_mmio_spte", "kvm/kvm_page_fault",
};
#define NR_TRACE_EVENTS (sizeof(trace_events) / sizeof(trace_events[0]))

static int trace_setup(void)
{
	char p[256];
	unsigned i;

	if (access(TRACEFS "/trace", R_OK) != 0)
		mount("tracefs", TRACEFS, "tracefs", 0, NULL);
	if (write_file(TRACEFS "/tracing_on", "0") || write_file(TRACEFS "/trace", "") ||
	    write_file(TRACEFS "/buffer_size_kb", "8192"))
		return -1;
	for (i = 0; i < NR_TRACE_EVENTS; i++) {
		snprintf(p, sizeof(p), TRACEFS "/events/%s/enable", trace_events[i]);
		if (write_file(p, "1"))
			printf("trace: cannot enable %s\n", trace_events[i]);
	}
	if (write_file("/proc/sys/kernel/traceoff_on_warning", "1"))
		return -1;
	return write_file(TRACEFS "/tracing_on", "1");
}

static void trace_stop(void)
{
	char p[256];
	unsigned i;

	write_file(TRACEFS "/tracing_on", "0");
	for (i = 0; i < NR_TRACE_EVENTS; i++) {
		snprintf(p, sizeof(p), TRACEFS "/events/%s/enable", trace_events[i]);
		write_file(p, "0");
	}
	write_file("/proc/sys/kernel/traceoff_on_warning", "0");
}

/* Print the last `keep` trace lines (tracing stopped at the WARN: they lead up to it). */
static void trace_print_tail(unsigned keep)
{
	static char *lines[256];
	char line[512];
	unsigned long n = 0, i, first;
	FILE *f = fopen(TRACEFS "/trace", "r");

	if (!f) {
		printf("trace: cannot read " TRACEFS "/trace: %s\n", strerror(errno));
		return;
	}
	if (keep > 256)
		keep = 256;
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '#')
			continue;
		free(lines[n % keep]);
		lines[n % keep] = strdup(line);
		n++;
	}
	fclose(f);
	first = n > keep ? n - keep : 0;
	printf("trace: the last %lu of %lu events before tracing stopped (traceoff_on_warning):\n",
	       n - first, n);
	for (i = first; i < n; i++)
		printf("  %s", lines[i % keep]);
}

/* ---- the VM --------------------------------------------------------------------------------------- */

/*
 * 32-bit flat code at CODE_GPA; esi = first address, edi != 0: also write.
 *   0: mov eax, esi
 *   2: loop: mov ebx, [eax]
 *   4:       test edi, edi
 *   6:       jz skip
 *   8:       mov [eax+8], eax
 *  11: skip: add eax, 0x1000
 *  16:       cmp eax, REGION_GPA + REGION_SIZE
 *  21:       jb loop
 *  23:       mov eax, REGION_GPA
 *  28:       jmp loop
 */
static void put32(unsigned char *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static void write_guest_code(unsigned char *p)
{
	static const unsigned char code[30] = {
		0x89, 0xf0, 0x8b, 0x18, 0x85, 0xff, 0x74, 0x03, 0x89, 0x40, 0x08,
		0x05, 0x00, 0x10, 0x00, 0x00, 0x3d, 0, 0, 0, 0, 0x72, 0xeb,
		0xb8, 0, 0, 0, 0, 0xeb, 0xe4,
	};

	memcpy(p, code, sizeof(code));
	put32(p + 17, (uint32_t)(REGION_GPA + REGION_SIZE));
	put32(p + 24, (uint32_t)REGION_GPA);
}

static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	memset(s, 0, sizeof(*s));
	s->selector = sel;
	s->limit = 0xffffffff;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->db = 1;
	s->g = 1;
}

static void set_region_slot(uint64_t size)
{
	struct kvm_userspace_memory_region mr = {
		.slot = REGION_SLOT,
		.guest_phys_addr = REGION_GPA,
		.memory_size = size,
		.userspace_addr = (uint64_t)(uintptr_t)region,
	};

	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
		die(size ? "KVM_SET_USER_MEMORY_REGION(create the region's slot)"
			 : "KVM_SET_USER_MEMORY_REGION(delete the region's slot)");
}

static void on_kick(int sig)
{
	(void)sig;
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;

	while (!stop) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			snprintf(v->error, sizeof(v->error), "KVM_RUN on vCPU %d: %s", v->id, strerror(errno));
			return NULL;
		}
		v->runs++;
		if (v->run->exit_reason == KVM_EXIT_MMIO) {
			/* the region's slot is gone right now: reads see 0, writes are dropped */
			if (v->run->mmio.is_write) {
				v->mmio_writes++;
			} else {
				memset(v->run->mmio.data, 0, sizeof(v->run->mmio.data));
				v->mmio_reads++;
			}
			continue;
		}
		if (v->run->exit_reason == KVM_EXIT_INTR)
			continue;
		snprintf(v->error, sizeof(v->error), "vCPU %d: unexpected exit reason %u", v->id,
			 v->run->exit_reason);
		return NULL;
	}
	return NULL;
}

static void create_vcpu(struct vcpu *v, int id, int nvcpus)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	v->id = id;
	v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, id);
	if (v->fd < 0)
		die("KVM_CREATE_VCPU");
	v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap(kvm_run)");
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	set_seg(&sregs.cs, 0x18, 0xb);	/* code: execute/read, accessed */
	set_seg(&sregs.ds, 0x10, 0x3);	/* data: read/write, accessed */
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.selector = 0x20;
	sregs.tr.base = 0x3000;
	sregs.tr.limit = 0x67;
	sregs.tr.type = 0xb;
	sregs.tr.present = 1;
	memset(&sregs.ldt, 0, sizeof(sregs.ldt));
	sregs.ldt.type = 0x2;
	sregs.ldt.unusable = 1;
	sregs.cr0 = 0x31;		/* PE | ET | NE, no paging */
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	regs.rsi = REGION_GPA + (REGION_SIZE / nvcpus) * id;	/* vCPUs start apart */
	regs.rdi = id == 0;					/* vCPU 0 also writes */
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region mr;
	struct sigaction sa;
	double seconds = 20, t0, t_end, t_check;
	int nvcpus = 2, nohuge = 0, count = 0, trace = 0, force = 0, opt, kvm, i, warns = 0, traced = 0;
	unsigned long ops = 0, runs = 0, mreads = 0, mwrites = 0;
	static const unsigned pause_us[8] = { 0, 0, 0, 0, 0, 100, 300, 1000 };
	char why[256], param[16];
	unsigned char *mem0;
	void *raw;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "s:v:nctf")) != -1) {
		switch (opt) {
		case 's': seconds = atof(optarg); break;
		case 'v': nvcpus = atoi(optarg); break;
		case 'n': nohuge = 1; break;
		case 'c': count = 1; break;
		case 't': trace = 1; break;
		case 'f': force = 1; break;
		default:
			printf("usage: %s [-s seconds] [-v vcpus] [-n] [-c] [-t] [-f]\n", argv[0]);
			return 2;
		}
	}
	if (nvcpus < 1 || nvcpus > MAX_VCPUS || seconds <= 0) {
		printf("ERROR: -v takes 1..%d, -s a positive number\n", MAX_VCPUS);
		return 2;
	}

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		snprintf(why, sizeof(why), "cannot open /dev/kvm: %s", strerror(errno));
		skip(why);
	}
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		skip("KVM_GET_API_VERSION is not 12");
	if (read_file("/sys/module/kvm/parameters/mmio_caching", param, sizeof(param)) == 0 &&
	    param[0] == 'N' && !force)
		skip("kvm.mmio_caching=N: a fault on a GPA without a memslot is emulated before it "
		     "reaches the SPTEs, so the racing path does not exist here");
	kmsg_fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (kmsg_fd < 0) {
		snprintf(why, sizeof(why), "cannot read /dev/kmsg (the oracle is the kernel log): %s",
			 strerror(errno));
		skip(why);
	}
	if (count && clear_warn_once())
		printf("note: cannot write " DEBUGFS "/clear_warn_once (%s): a WARN that already fired "
		       "in this boot stays silent\n", strerror(errno));
	/* the whole log of this boot: a WARN_ON_ONCE that already fired cannot fire again */
	if (drain_kmsg("earlier in this boot: ") && !count) {
		printf("BUG: this boot's kernel log already holds the x86 MMU WARNING above; it is a "
		       "WARN_ON_ONCE, so it cannot fire again until reboot (or run with -c to clear it)\n");
		return 1;
	}
	printed_warns = 0;
	if (read_file("/sys/module/kvm/parameters/tdp_mmu", param, sizeof(param)) == 0)
		printf("kvm.tdp_mmu=%c ", param[0]);
	if (read_file("/sys/module/kvm/parameters/mmio_caching", param, sizeof(param)) == 0)
		printf("kvm.mmio_caching=%c ", param[0]);
	if (read_file("/sys/kernel/mm/transparent_hugepage/enabled", why, sizeof(why)) == 0)
		printf("transparent_hugepage/enabled: %s", why);
	else
		printf("\n");

	vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm_fd < 0) {
		snprintf(why, sizeof(why), "KVM_CREATE_VM: %s", strerror(errno));
		skip(why);
	}
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	mem0 = mmap(NULL, SLOT0_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* a 2 MiB aligned region: the host can back it with a THP, KVM then maps it 2 MiB */
	raw = mmap(NULL, REGION_SIZE + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem0 == MAP_FAILED || raw == MAP_FAILED)
		die("mmap");
	region = (void *)(((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
	madvise(region, REGION_SIZE, nohuge ? MADV_NOHUGEPAGE : MADV_HUGEPAGE);
	memset(region, 0x5a, REGION_SIZE);	/* populated: every fault resolves a real page */
	write_guest_code(mem0 + CODE_GPA);
	memset(&mr, 0, sizeof(mr));
	mr.slot = 0;
	mr.memory_size = SLOT0_SIZE;
	mr.userspace_addr = (uint64_t)(uintptr_t)mem0;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
		die("KVM_SET_USER_MEMORY_REGION(slot 0)");
	set_region_slot(REGION_SIZE);
	for (i = 0; i < nvcpus; i++)
		create_vcpu(&vcpus[i], i, nvcpus);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_kick;	/* no SA_RESTART: a kick makes KVM_RUN return EINTR */
	sigaction(SIGUSR1, &sa, NULL);
	if (trace) {
		if (trace_setup())
			printf("trace: cannot set up tracing in " TRACEFS " (%s): going on without\n",
			       strerror(errno));
		else
			traced = 1;
	}
	printf("%d vCPU(s) sweep a 2 MiB region (%s) at GPA %#llx while its memslot is deleted and "
	       "re-created, up to %.0f s%s\n", nvcpus, nohuge ? "MADV_NOHUGEPAGE" : "MADV_HUGEPAGE",
	       (unsigned long long)REGION_GPA, seconds, count ? ", counting WARNs" : "");
	for (i = 0; i < nvcpus; i++)
		if (pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i]))
			die("pthread_create");

	t0 = now();
	t_end = t0 + seconds;
	t_check = t0 + 0.05;
	while (now() < t_end) {
		unsigned us = pause_us[(ops * 2654435761u >> 7) % 8];

		set_region_slot(0);
		set_region_slot(REGION_SIZE);
		ops++;
		if (us)
			usleep(us);
		if (now() >= t_check) {
			int n = drain_kmsg("kernel: ");

			t_check = now() + 0.05;
			for (i = 0; i < nvcpus; i++)
				if (vcpus[i].error[0])
					t_end = 0;
			if (n) {
				if (!warns)
					printf("MMU WARN after %.2f s, %lu slot re-creations\n", now() - t0, ops);
				warns += n;
				if (traced && warns == n)
					trace_print_tail(40);
				if (!count)
					break;
				clear_warn_once();
			}
		}
	}
	stop = 1;
	for (i = 0; i < nvcpus; i++) {
		while (pthread_tryjoin_np(vcpus[i].thread, NULL) == EBUSY) {
			vcpus[i].run->immediate_exit = 1;
			pthread_kill(vcpus[i].thread, SIGUSR1);
			usleep(1000);
		}
	}
	warns += drain_kmsg("kernel: ");
	if (traced)
		trace_stop();
	for (i = 0; i < nvcpus; i++) {
		if (vcpus[i].error[0]) {
			printf("ERROR: %s\n", vcpus[i].error);
			return 2;
		}
		runs += vcpus[i].runs;
		mreads += vcpus[i].mmio_reads;
		mwrites += vcpus[i].mmio_writes;
	}
	printf("%lu slot delete + re-create in %.1f s; %lu KVM_RUN exits, %lu MMIO reads and %lu MMIO "
	       "writes while the slot was gone\n", ops, now() - t0, runs, mreads, mwrites);
	if (printed_warns > 3)
		printf("(%d more WARNING records not shown)\n", printed_warns - 3);
	if (warns) {
		printf("BUG: the x86 MMU WARNed %d time(s) while a memslot was re-created under running "
		       "vCPUs (a no-memslot fault finding the new slot's present SPTE)\n", warns);
		return 1;
	}
	printf("OK: no x86 MMU WARN in %.0f s of memslot re-creation with %d vCPU(s) (a race: a pass "
	       "does not prove the kernel fixed)\n", seconds, nvcpus);
	return 0;
}
