// SPDX-License-Identifier: GPL-2.0
/*
 * pvm-dirty-ring-overflow: a vCPU pushes past the end of its dirty ring before it exits with
 * KVM_EXIT_DIRTY_RING_FULL, overwriting entries userspace has not harvested (dirty pages lost,
 * i.e. lost data in a live migration); KVM's ring indexes then fall out of step with userspace
 * and the vCPU exits KVM_EXIT_DIRTY_RING_FULL forever. Seen on kvm_pvm (the out-of-tree
 * paravirtual KVM) on 6.18.44: its batched instruction emulation (pvm_emulate_insn_scrubbed,
 * pvm_emul_batch=1024) keeps emulating guest writes, each pushing a ring entry, without checking
 * KVM_REQ_DIRTY_RING_SOFT_FULL between instructions. The kernel logs, once per boot,
 *   WARNING: ... at virt/kvm/dirty_ring.c:225 kvm_dirty_ring_push+0xe2/0xf0
 *   ... __kvm_write_guest_page <- kvm_vcpu_write_guest <- write_emulate <- x86_emulate_insn
 *   <- x86_emulate_instruction <- pvm_emulate_insn_scrubbed <- __pvm_handle_exit
 *
 * Setup: KVM_CAP_DIRTY_LOG_RING with 4096 bytes (256 entries, the minimum; KVM keeps 64 in
 * reserve, so it must exit KVM_EXIT_DIRTY_RING_FULL once 192 are in use and never push more than
 * 256 between two KVM_RESET_DIRTY_RINGS). One vCPU in flat 32-bit protected mode without paging
 * runs, from GPA 0x1000 (slot 0, not logged):
 *     again: mov eax, 0x100000
 *     loop:  mov [eax], eax ; add eax, 4096 ; cmp eax, 0x2100000 ; jb loop
 *            out 0x10, al   ; jmp again
 * i.e. writes the 8192 pages of slot 1 (GPA 1 MiB .. 33 MiB, KVM_MEM_LOG_DIRTY_PAGES) in order,
 * then says "pass done" with a port write, again and again. Userspace, like a migration:
 * at each KVM_EXIT_DIRTY_RING_FULL it harvests the entries from its fetch index while they are
 * DIRTY (marking each RESET), calls KVM_RESET_DIRTY_RINGS and resumes; at each pass end it does
 * the same and checks that every page of the pass was harvested.
 *
 * The oracle (the same as kvm-harness's test_dirty_ring_never_overflows): the guest writes each
 * page once per pass, in order, so the entries of a pass must be pages 0, 1, 2, ... of slot 1:
 *  - an entry holding a later page than the next expected one means KVM wrapped around the ring
 *    and overwrote unharvested entries (it pushed more than 256 since the last reset);
 *  - a full exit that finds the entry at the harvest index not DIRTY while others are means the
 *    indexes are out of step; the program then resets and resumes 3 more times to show the vCPU
 *    keeps exiting ring-full with nothing to harvest;
 *  - a page written in a pass and never harvested is a lost dirty page.
 * After the first overwrite it goes on like a migration would, for up to 8 more full exits, to
 * show whether the indexes fall out of step too, then exits 1.
 * Any of these is the bug. On kvm_pvm it shows within ~1 s (about 1 ring fill in 30).
 *
 * Build: gcc -O2 -o pvm-dirty-ring-overflow pvm-dirty-ring-overflow.c
 * Run:   ./pvm-dirty-ring-overflow [passes]    (default 64 passes of 8192 pages, ~2700 ring fills)
 * Needs: /dev/kvm with KVM_CAP_DIRTY_LOG_RING >= 4096 (x86; Linux 5.11+).
 *
 * Prints the setup, the evidence and a verdict line starting with OK, BUG, SKIP or ERROR. On
 * kvm_pvm (6.18.44-fc-v1252), the first ring fill already overflowed (pages 256..258 overwrote the
 * unharvested entries of pages 0..2):
 *   dirty ring: 256 entries (4096 bytes), soft limit 192; guest writes 8192 pages per pass, ...
 *   BUG: ring entry 0 (the harvest index; ring entry 0) holds page 256 where page 0 was expected:
 *        KVM wrapped around the 256-entry ring and overwrote entries nobody had harvested (it
 *        pushed at least 257 entries since the last KVM_RESET_DIRTY_RINGS, more than the ring holds)
 *   ring: harvest index 0 (ring entry 0) has flags 0x1; 256 of 256 entries are DIRTY e.g. entries
 *        0 (page 256), 1 (page 257), 2 (page 258), 3 (page 3), 4 (page 4), 5 (page 5)
 *   ...
 *   BUG: dirty ring overflow reproduced in pass 1, at full exit 1: unharvested entries were ...
 * A kernel that exits in time ends like this (Debian 6.18.15, kvm_amd, nested under QEMU TCG):
 *   entries harvested at the last 64 of 2562 full exits (soft limit 192, ring 256): 192 x64
 *   largest harvest 192; 0 full exits found all 256 entries DIRTY
 *   OK: 61 passes of 8192 pages, 2562 ring-full exits in 20 s: the ring never overflowed, ...
 * Exit codes: 0 = no overflow in the passes run (bug not reproduced)
 *             1 = bug reproduced (prints the ring indexes, the entries harvested at each full
 *                 exit, the first overwritten or lost page)
 *             2 = the reproducer could not complete (unexpected exit, time limit; prints it)
 *             4 = cannot test here (no /dev/kvm, capability missing; prints why)
 * Every KVM_RUN is bounded: SIGALRM after 60 s sets immediate_exit and interrupts it, and the
 * run loop has an iteration bound; passes stop early after 20 s (then the verdict is for the
 * passes run).
 * On the buggy kernel this makes the kernel log the WARN above (once per boot).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#ifndef KVM_CAP_DIRTY_LOG_RING
#define KVM_CAP_DIRTY_LOG_RING 192
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
#ifndef KVM_RESET_DIRTY_RINGS
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
struct kvm_dirty_gfn {
	uint32_t flags;
	uint32_t slot;
	uint64_t offset;
};
#define KVM_DIRTY_GFN_F_DIRTY (1U << 0)
#define KVM_DIRTY_GFN_F_RESET (1U << 1)
#endif
#ifndef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64	/* x86 */
#endif

#define PAGE 4096ULL
#define RING_BYTES 4096U
#define RING_ENTRIES ((unsigned)(RING_BYTES / sizeof(struct kvm_dirty_gfn)))	/* 256 */
#define RING_RESERVED 64U	/* KVM_DIRTY_RING_RSVD_ENTRIES + vCPU count, at least 64 */
#define CODE_GPA 0x1000ULL
#define SLOT0_SIZE 0x10000ULL
#define DATA_SLOT 1U
#define DATA_GPA 0x100000ULL
#define NPAGES 8192U
#define DATA_SIZE (NPAGES * PAGE)
#define DONE_PORT 0x10
#define ALARM_SECONDS 60
#define PASS_SECONDS 20
#define MAX_RUNS 2000000L

static struct kvm_run *run;
static volatile sig_atomic_t timed_out;
static int vm_fd, vcpu_fd;
static struct kvm_dirty_gfn *ring;
static uint64_t fetch;		/* free-running index of the next entry to harvest */
static uint32_t next_page;	/* the page the next entry of this pass must hold */
static unsigned char seen[NPAGES];
static unsigned sizes[64];	/* entries harvested at the latest full exits */
static unsigned long nsizes, full_exits, max_harvest, exits_full_ring, overflow_exit;

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
	run->immediate_exit = 1;
}

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

static void print_sizes(void)
{
	unsigned long i, rep, n = nsizes < 64 ? nsizes : 64;

	printf("entries harvested at the last %lu of %lu full exits (soft limit %u, ring %u):", n,
	       full_exits, RING_ENTRIES - RING_RESERVED, RING_ENTRIES);
	for (i = nsizes - n; i < nsizes; i += rep) {	/* runs of one size as "192 x64" */
		for (rep = 1; i + rep < nsizes && sizes[(i + rep) % 64] == sizes[i % 64]; rep++)
			;
		if (rep > 1)
			printf(" %u x%lu", sizes[i % 64], rep);
		else
			printf(" %u", sizes[i % 64]);
	}
	printf("\nlargest harvest %lu; %lu full exits found all %u entries DIRTY\n", max_harvest,
	       exits_full_ring, RING_ENTRIES);
}

static void print_dirty_entries(void)
{
	unsigned i, n = 0, shown = 0;

	for (i = 0; i < RING_ENTRIES; i++)
		n += !!(ring[i].flags & KVM_DIRTY_GFN_F_DIRTY);
	printf("ring: harvest index %llu (ring entry %llu) has flags %#x; %u of %u entries are DIRTY",
	       (unsigned long long)fetch, (unsigned long long)(fetch % RING_ENTRIES),
	       ring[fetch % RING_ENTRIES].flags, n, RING_ENTRIES);
	for (i = 0; i < RING_ENTRIES && shown < 6; i++) {
		if (ring[i].flags & KVM_DIRTY_GFN_F_DIRTY) {
			printf("%s%u (page %llu)", shown ? ", " : " e.g. entries ", i,
			       (unsigned long long)ring[i].offset);
			shown++;
		}
	}
	printf("\n");
}

/* Harvest from the fetch index while DIRTY; check each entry is the next page of the pass. */
static unsigned harvest(int *overwritten)
{
	unsigned n = 0;

	for (;;) {
		struct kvm_dirty_gfn *e = &ring[fetch % RING_ENTRIES];
		uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);

		if (!(flags & KVM_DIRTY_GFN_F_DIRTY) || n == RING_ENTRIES)
			break;
		if (e->slot != DATA_SLOT || e->offset >= NPAGES) {
			printf("BUG: ring entry %llu holds slot %u offset %llu: not a page the guest wrote\n",
			       (unsigned long long)fetch, e->slot, (unsigned long long)e->offset);
			*overwritten = 1;
		} else if (!*overwritten && e->offset >= next_page + RING_ENTRIES) {
			printf("BUG: ring entry %llu (the harvest index; ring entry %llu) holds page %llu where "
			       "page %u was expected: KVM wrapped around the %u-entry ring and overwrote "
			       "entries nobody had harvested (it pushed at least %llu entries since the last "
			       "KVM_RESET_DIRTY_RINGS, more than the ring holds)\n",
			       (unsigned long long)fetch, (unsigned long long)(fetch % RING_ENTRIES),
			       (unsigned long long)e->offset, next_page, RING_ENTRIES,
			       (unsigned long long)(e->offset - next_page + 1));
			print_dirty_entries();
			*overwritten = 1;
		} else if (!*overwritten && e->offset != next_page && !seen[e->offset]) {
			printf("BUG: ring entry %llu holds page %llu where page %u was expected: the ring's "
			       "entries are out of the order the guest wrote the pages in\n",
			       (unsigned long long)fetch, (unsigned long long)e->offset, next_page);
			*overwritten = 1;
		}
		if (e->slot == DATA_SLOT && e->offset < NPAGES) {
			seen[e->offset] = 1;
			if (e->offset == next_page)
				while (next_page < NPAGES && seen[next_page])
					next_page++;
		}
		__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
		fetch++;
		n++;
	}
	return n;
}

static void reset_rings(void)
{
	if (ioctl(vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0)
		die("KVM_RESET_DIRTY_RINGS");
}

static int kvm_run_once(void)
{
	if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
		if (errno == EINTR && timed_out) {
			printf("ERROR: KVM_RUN still running after %d s (the vCPU did not come back; "
			       "exit reason %u)\n", ALARM_SECONDS, run->exit_reason);
			exit(2);
		}
		if (errno == EINTR || errno == EAGAIN)
			return -1;
		die("KVM_RUN");
	}
	return 0;
}

static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	memset(s, 0, sizeof(*s));
	s->selector = sel;
	s->base = 0;
	s->limit = 0xffffffff;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->db = 1;
	s->g = 1;
}

static const unsigned char guest_code[] = {
	0xb8, 0x00, 0x00, 0x10, 0x00,	/* 0:  again: mov eax, 0x100000 */
	0x89, 0x00,			/* 5:  loop:  mov [eax], eax */
	0x05, 0x00, 0x10, 0x00, 0x00,	/* 7:         add eax, 0x1000 */
	0x3d, 0x00, 0x00, 0x10, 0x02,	/* 12:        cmp eax, 0x2100000 */
	0x72, 0xf2,			/* 17:        jb loop */
	0xe6, DONE_PORT,		/* 19:        out 0x10, al */
	0xeb, 0xe9,			/* 21:        jmp again */
};

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region mr;
	struct kvm_enable_cap cap;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct sigaction sa;
	struct timespec t0, t;
	unsigned long passes = argc > 1 ? strtoul(argv[1], NULL, 0) : 64, pass = 0, i;
	long runs;
	int kvm, r, run_size, overwritten = 0;
	char why[256];
	void *mem0, *data;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!passes)
		passes = 1;
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		snprintf(why, sizeof(why), "cannot open /dev/kvm: %s", strerror(errno));
		skip(why);
	}
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		skip("KVM_GET_API_VERSION is not 12");
	vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm_fd < 0) {
		snprintf(why, sizeof(why), "KVM_CREATE_VM: %s", strerror(errno));
		skip(why);
	}
	r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
	if (r < (int)RING_BYTES) {
		snprintf(why, sizeof(why), "KVM_CAP_DIRTY_LOG_RING is %d: no dirty ring of %u bytes here",
			 r, RING_BYTES);
		skip(why);
	}
	memset(&cap, 0, sizeof(cap));	/* before any vCPU exists */
	cap.cap = KVM_CAP_DIRTY_LOG_RING;
	cap.args[0] = RING_BYTES;
	if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
		snprintf(why, sizeof(why), "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, 4096): %s%s",
			 strerror(errno), errno == EINVAL ? " (a 256-entry ring is smaller than KVM's "
			 "reserve here: with Intel PML the reserve is 64 + 512 entries)" : "");
		skip(why);
	}

	mem0 = mmap(NULL, SLOT0_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	data = mmap(NULL, DATA_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem0 == MAP_FAILED || data == MAP_FAILED)
		die("mmap");
	memcpy((char *)mem0 + CODE_GPA, guest_code, sizeof(guest_code));
	memset(&mr, 0, sizeof(mr));
	mr.slot = 0;
	mr.guest_phys_addr = 0;
	mr.memory_size = SLOT0_SIZE;
	mr.userspace_addr = (uint64_t)(uintptr_t)mem0;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
		die("KVM_SET_USER_MEMORY_REGION(slot 0)");
	mr.slot = DATA_SLOT;
	mr.flags = KVM_MEM_LOG_DIRTY_PAGES;
	mr.guest_phys_addr = DATA_GPA;
	mr.memory_size = DATA_SIZE;
	mr.userspace_addr = (uint64_t)(uintptr_t)data;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
		die("KVM_SET_USER_MEMORY_REGION(slot 1, KVM_MEM_LOG_DIRTY_PAGES)");

	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		die("KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		die("mmap(kvm_run)");
	ring = mmap(NULL, RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
		    KVM_DIRTY_LOG_PAGE_OFFSET * sysconf(_SC_PAGESIZE));
	if (ring == MAP_FAILED)
		die("mmap(dirty ring)");

	/* flat 32-bit protected mode, no paging */
	if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	set_seg(&sregs.cs, 0x18, 0xb);	/* code: execute/read, accessed */
	set_seg(&sregs.ds, 0x10, 0x3);	/* data: read/write, accessed */
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.selector = 0x20;
	sregs.tr.base = 0x3000;
	sregs.tr.limit = 0x67;
	sregs.tr.type = 0xb;		/* busy 32-bit TSS */
	sregs.tr.present = 1;
	memset(&sregs.ldt, 0, sizeof(sregs.ldt));
	sregs.ldt.type = 0x2;
	sregs.ldt.unusable = 1;
	sregs.cr0 = 0x31;		/* PE | ET | NE */
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART: KVM_RUN returns EINTR */
	sigaction(SIGALRM, &sa, NULL);
	alarm(ALARM_SECONDS);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	printf("dirty ring: %u entries (%u bytes), soft limit %u; guest writes %u pages per pass, "
	       "up to %lu passes\n", RING_ENTRIES, RING_BYTES, RING_ENTRIES - RING_RESERVED, NPAGES,
	       passes);

	for (runs = 0; runs < MAX_RUNS; runs++) {
		if (kvm_run_once() < 0)
			continue;
		switch (run->exit_reason) {
		case KVM_EXIT_DIRTY_RING_FULL: {
			unsigned n = harvest(&overwritten);

			full_exits++;
			if (n > max_harvest)
				max_harvest = n;
			exits_full_ring += n == RING_ENTRIES;
			if (n == 0) {
				int k, again = 0;

				printf("BUG: KVM_EXIT_DIRTY_RING_FULL, but the entry at the harvest index is "
				       "not DIRTY while others are: KVM pushed past the end of the %u-entry "
				       "ring and its indexes are out of step with userspace\n", RING_ENTRIES);
				print_dirty_entries();
				print_sizes();
				for (k = 0; k < 3; k++) {
					reset_rings();
					if (kvm_run_once() == 0 &&
					    run->exit_reason == KVM_EXIT_DIRTY_RING_FULL && harvest(&overwritten) == 0)
						again++;
				}
				printf("after KVM_RESET_DIRTY_RINGS the vCPU exited KVM_EXIT_DIRTY_RING_FULL "
				       "with nothing to harvest %d of 3 times%s\n", again,
				       again == 3 ? ": it can only exit ring-full from now on" : "");
				if (overflow_exit)
					printf("(the overwrite was seen at full exit %lu)\n", overflow_exit);
				printf("BUG: dirty ring overflow reproduced in pass %lu (expect the kernel's "
				       "WARN in kvm_dirty_ring_push, virt/kvm/dirty_ring.c, once per boot)\n",
				       pass + 1);
				return 1;
			}
			sizes[nsizes++ % 64] = n;
			reset_rings();
			if (overwritten && !overflow_exit) {
				/* go on like a migration would, to show what follows */
				overflow_exit = full_exits;
				printf("harvested %u entries at that full exit; KVM_RESET_DIRTY_RINGS and resume "
				       "(up to 8 more full exits) to see whether the indexes stay in step\n", n);
			} else if (overwritten && full_exits - overflow_exit >= 8) {
				/* 8 more full exits, none of them out of step: stop with what was seen */
				print_sizes();
				printf("BUG: dirty ring overflow reproduced in pass %lu, at full exit %lu: "
				       "unharvested entries were overwritten (expect the kernel's WARN in "
				       "kvm_dirty_ring_push, virt/kvm/dirty_ring.c, once per boot)\n", pass + 1,
				       overflow_exit);
				return 1;
			}
			break;
		}
		case KVM_EXIT_IO:
			if (run->io.port != DONE_PORT || run->io.direction != KVM_EXIT_IO_OUT) {
				printf("ERROR: unexpected port I/O: port %#x, direction %u\n", run->io.port,
				       run->io.direction);
				return 2;
			}
			harvest(&overwritten);
			for (i = 0; i < NPAGES && seen[i]; i++)
				;
			if (overwritten || i < NPAGES) {
				if (i < NPAGES)
					printf("BUG: page %lu (GPA %#llx) was written in pass %lu but never "
					       "harvested from the dirty ring: a lost dirty page\n", i,
					       (unsigned long long)(DATA_GPA + i * PAGE), pass + 1);
				print_sizes();
				printf("BUG: %s in pass %lu\n", overwritten ? "dirty ring overflow reproduced"
				       : "dirty pages lost", pass + 1);
				return 1;
			}
			reset_rings();
			memset(seen, 0, sizeof(seen));
			next_page = 0;
			pass++;
			clock_gettime(CLOCK_MONOTONIC, &t);
			if (pass == passes || t.tv_sec - t0.tv_sec >= PASS_SECONDS) {
				print_sizes();
				printf("OK: %lu passes of %u pages, %lu ring-full exits in %ld s: the ring never "
				       "overflowed, every page was harvested in order\n", pass, NPAGES,
				       full_exits, (long)(t.tv_sec - t0.tv_sec));
				return 0;
			}
			break;
		default:
			printf("ERROR: unexpected exit reason %u at pass %lu (rip %#llx)\n",
			       run->exit_reason, pass + 1,
			       ioctl(vcpu_fd, KVM_GET_REGS, &regs) == 0 ? (unsigned long long)regs.rip : 0ULL);
			return 2;
		}
	}
	printf("ERROR: %ld KVM_RUN calls without finishing %lu passes\n", MAX_RUNS, passes);
	return 2;
}
