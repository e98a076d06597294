// SPDX-License-Identifier: GPL-2.0
/*
 * pfncache-private-gfn-writes-shared: KVM keeps writing a vCPU's kvmclock (pvclock) into the
 * shared side of a gfn whose memory attribute is PRIVATE. The guest reads its private
 * (guest_memfd) page there and sees zeros; the shared page, which the guest no longer reads and
 * which userspace owns, gets every update.
 *
 * Why, in the kernel source: MSR_KVM_SYSTEM_TIME_NEW activates the vCPU's gfn_to_pfn_cache
 * (arch/x86/kvm/msrs.c kvm_write_system_time -> kvm_gpc_activate). virt/kvm/pfncache.c resolves
 * it as gpa -> memslot -> userspace hva (gfn_to_hva_memslot in __kvm_gpc_refresh) -> pfn
 * (hva_to_pfn in hva_to_pfn_retry), and kvm_setup_guest_pvclock (arch/x86/kvm/x86.c) writes
 * through that mapping on each clock update. Nothing on that path looks at the gfn's memory
 * attributes or at the slot's guest_memfd, and KVM_SET_MEMORY_ATTRIBUTES does not invalidate the
 * cache (only mmu_notifier events on the hva do). So a PRIVATE gfn in a KVM_MEM_GUEST_MEMFD slot
 * is written through its userspace_addr, the shared side.
 *
 * Setup: a KVM_X86_SW_PROTECTED_VM (type 1), one vCPU in real mode without an in-kernel irqchip.
 *   slot 0: GPA 0, 64 KiB of anonymous memory, code at 0x1000:
 *             again: mov ax, 0xffff ; mov ds, ax ; mov eax, [0x50] ; out 0x10, eax ; hlt
 *                    jmp again
 *           i.e. read the pvclock version at linear 0x100040 and report it with a port write (the
 *           guest's own view of its page), then halt (KVM_EXIT_HLT to userspace: every KVM_RUN is
 *           one IO exit and one HLT exit; a guest that only reads and halts cannot loop).
 *   slot 1: GPA 1 MiB, 64 KiB, KVM_MEM_GUEST_MEMFD: a guest_memfd made with flags 0 (the host
 *           cannot map it) and anonymous memory as userspace_addr (the shared side).
 *   kvmclock: KVM_SET_MSRS MSR_KVM_SYSTEM_TIME_NEW (0x4b564d01) = 0x100040 | 1, the pvclock at
 *           +0x40 of slot 1's first page (no KVM_SET_CPUID2 needed: KVM checks the
 *           KVM_FEATURE_CLOCKSOURCE2 bit only when userspace enables
 *           KVM_CAP_ENFORCE_PV_FEATURE_CPUID).
 * Steps (KVM writes the pvclock on guest entry: KVM_REQ_CLOCK_UPDATE, which enabling the MSR and
 * KVM_SET_CLOCK request):
 *   1. control, gfn shared: KVM_RUN; the shared page holds an even non-zero version and the guest
 *      reads the same: the setup is sound.
 *   2. KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) on the page; snapshot the shared page; KVM_SET_CLOCK
 *      (+1 s); KVM_RUN. The shared page must not change (the guest no longer reads it): a change
 *      is the bug. The guest's view (its guest_memfd page) is printed.
 *   3. control, shared again: KVM_SET_MEMORY_ATTRIBUTES(0); KVM_SET_CLOCK (+1 s); KVM_RUN; the
 *      shared page gets the update and the guest reads it (so "no write" in step 2 is not just
 *      "no update at all").
 * With -p the page is made PRIVATE before kvmclock is enabled (no step 1; step 2 snapshots the
 * untouched shared page before the first KVM_RUN, then also runs a KVM_SET_CLOCK update).
 *
 * Build: gcc -O2 -Wall -o pfncache-private-gfn-writes-shared pfncache-private-gfn-writes-shared.c
 * Run:   ./pfncache-private-gfn-writes-shared [-p]    (as a user who may open /dev/kvm)
 * Needs: /dev/kvm (x86) with KVM_CAP_VM_TYPES bit 1 (KVM_X86_SW_PROTECTED_VM:
 *        CONFIG_KVM_SW_PROTECTED_VM=y and the TDP MMU), KVM_CAP_USER_MEMORY2, KVM_CAP_GUEST_MEMFD
 *        and KVM_CAP_MEMORY_ATTRIBUTES with PRIVATE for that VM type (Linux 6.8+).
 *
 * Prints one line per step and a verdict line starting with OK, BUG, SKIP or ERROR. On Debian's
 * 7.3.4 with KVM rebuilt with CONFIG_KVM_SW_PROTECTED_VM=y (kvm_amd nested under QEMU TCG,
 * 2026-12-05):
 *   SW-protected VM (type 1); slot 0: GPA 0x0, 64 KiB anonymous (code at 0x1000); slot 1: GPA
 *     0x100000, 64 KiB, guest_memfd (flags 0) + anonymous shared side
 *   kvmclock: MSR_KVM_SYSTEM_TIME_NEW = 0x100041 accepted (reads back 0x100041)
 *   control, gfn 0x100 shared: shared page holds pvclock version=2 system_time=24371318
 *     tsc_timestamp=8809680 mul=0x803d9265 shift=0 flags=0x1; the guest reads version 2
 *   gfn 0x100 -> PRIVATE (KVM_SET_MEMORY_ATTRIBUTES); KVM_SET_CLOCK 1031462547 ns (+1 s), KVM_RUN
 *   shared page after: 3 8-byte words differ, first at +0x40; pvclock version=4
 *     system_time=1031462547 tsc_timestamp=23643480 mul=0x803d9265 shift=0 flags=0x1; the guest
 *     reads version 0
 *   control, gfn 0x100 shared again: KVM_SET_CLOCK 2034888873 ns (+1 s), KVM_RUN: shared page
 *     pvclock version=6 system_time=2034888873 tsc_timestamp=30553520 mul=0x803d9265 shift=0
 *     flags=0x1; the guest reads version 6
 *   BUG: KVM wrote the kvmclock update into the shared page (userspace_addr + 0x40) of gfn 0x100
 *     while the gfn is PRIVATE: version 2 -> 4, system_time 24371318 -> 1031462547 (after
 *     KVM_SET_CLOCK to 1031462547); the guest reads its private page: version 0. The ...
 * With -p there: the guest reads version 0 after the first entry, and the shared page, untouched
 * by the host, goes from zeros to version=4 system_time=<the KVM_SET_CLOCK value> (4 8-byte words
 * differ): both updates, the enable's and KVM_SET_CLOCK's, land in the shared side although the gfn
 * was PRIVATE before kvmclock was enabled. Xen's structures (shared_info, vcpu_info, runstate) go
 * through the same cache and behave the same (kvm-harness: test_xen_struct_after_conversion).
 * On Debian's packaged kernels (no SW-protected VM type) it ends "SKIP: ..." (exit 4). On a kernel
 * that writes the side the guest reads (or nothing), step 2 leaves the shared page as it was and
 * it ends "OK: ...".
 * Exit codes: 0 = the shared page is untouched while the gfn is PRIVATE (bug not reproduced)
 *             1 = bug reproduced (prints the shared page's pvclock before and after)
 *             2 = the reproducer could not complete (an unexpected ioctl error or exit; prints it)
 *             4 = cannot test here (no /dev/kvm, no SW-protected VM type, capability missing;
 *                 prints why)
 * Bounded: alarm(60) sets immediate_exit and interrupts a KVM_RUN that does not come back
 * (ERROR, exit 2); at most 8 exits per KVM_RUN round.
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
#include <unistd.h>
#include <linux/kvm.h>

/* uapi newer than many distributions' headers (Linux 6.8+), defined here when missing */
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_X86_SW_PROTECTED_VM
#define KVM_X86_SW_PROTECTED_VM 1
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif
#ifndef KVM_MEMORY_ATTRIBUTE_PRIVATE
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	uint32_t slot;
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t guest_memfd_offset;
	uint32_t guest_memfd;
	uint32_t pad1;
	uint64_t pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	uint64_t size;
	uint64_t flags;
	uint64_t reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes {
	uint64_t address;
	uint64_t size;
	uint64_t attributes;
	uint64_t flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif
_Static_assert(sizeof(struct kvm_userspace_memory_region2) == 160, "uapi layout");
_Static_assert(sizeof(struct kvm_create_guest_memfd) == 64, "uapi layout");
_Static_assert(sizeof(struct kvm_memory_attributes) == 32, "uapi layout");
_Static_assert(sizeof(struct kvm_clock_data) == 48, "uapi layout");

/* KVM_EXIT_MEMORY_FAULT's member of kvm_run's exit union (not in older headers) */
struct memory_fault_exit {
	uint64_t flags;
	uint64_t gpa;
	uint64_t size;
};

/* arch/x86/include/asm/pvclock-abi.h */
struct pvclock_vcpu_time_info {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t tsc_to_system_mul;
	int8_t tsc_shift;
	uint8_t flags;
	uint8_t pad[2];
} __attribute__((packed));
_Static_assert(sizeof(struct pvclock_vcpu_time_info) == 32, "pvclock ABI");

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define PAGE 4096ULL
#define KiB 1024ULL
#define CODE_GPA 0x1000ULL
#define SLOT0_SIZE (64 * KiB)
#define PRIV_SLOT 1U
#define PRIV_GPA 0x100000ULL	/* 1 MiB: real mode reaches it as 0xffff:0x0050 */
#define PRIV_SIZE (64 * KiB)
#define PV_OFF 0x40ULL		/* the struct sits inside the page, at the offset the guest reads */
#define PV_GPA (PRIV_GPA + PV_OFF)
#define VERSION_PORT 0x10
#define TSS_ADDR 0xfffbd000ULL	/* VMX without unrestricted guest runs real mode through vm86 */
#define ALARM_SECONDS 60
#define MAX_EXITS 8
#define NSEC_PER_SEC 1000000000ULL

/*
 * again:  b8 ff ff     mov ax, 0xffff
 *         8e d8        mov ds, ax
 *         66 a1 50 00  mov eax, [0x0050]      ; linear 0xffff0 + 0x50 = 0x100040 = PV_GPA
 *         66 e7 10     out 0x10, eax
 *         f4           hlt
 *         eb f1        jmp again              ; 15 bytes back, to offset 0
 */
static const uint8_t guest_code[] = {
	0xb8, 0xff, 0xff, 0x8e, 0xd8, 0x66, 0xa1, 0x50, 0x00, 0x66, 0xe7, VERSION_PORT, 0xf4, 0xeb, 0xf1,
};
#define HLT_NEXT_IP (CODE_GPA + 13)	/* rip after the hlt: the jmp */
/* the jmp ends the code: it lands on offset 0 */
_Static_assert(sizeof(guest_code) + (int8_t)0xf1 == 0, "jmp again: back to offset 0");

static int kvm_fd, vm_fd, vcpu_fd;
static struct kvm_run *run;
static uint8_t *shared;		/* slot 1's userspace_addr: the shared side */
static volatile sig_atomic_t timed_out;

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
	if (run)
		run->immediate_exit = 1;
}

static void skip(const char *why)
{
	printf("SKIP: %s\n", why);
	exit(4);
}

static void die(const char *what)
{
	printf("ERROR: %s: %s (errno %d)\n", what, strerror(errno), errno);
	exit(2);
}

static struct pvclock_vcpu_time_info pv_at(const uint8_t *page)
{
	struct pvclock_vcpu_time_info pv;

	memcpy(&pv, page + PV_OFF, sizeof(pv));
	return pv;
}

static const char *describe(const struct pvclock_vcpu_time_info *pv)
{
	static char buf[4][160];
	static int n;
	char *b = buf[n++ % 4];

	snprintf(b, sizeof(buf[0]), "pvclock version=%u system_time=%llu tsc_timestamp=%llu mul=%#x "
		 "shift=%d flags=%#x", pv->version, (unsigned long long)pv->system_time,
		 (unsigned long long)pv->tsc_timestamp, pv->tsc_to_system_mul, pv->tsc_shift, pv->flags);
	return b;
}

static void set_attributes(uint64_t attrs)
{
	struct kvm_memory_attributes a;

	memset(&a, 0, sizeof(a));
	a.address = PRIV_GPA;
	a.size = PAGE;
	a.attributes = attrs;
	if (ioctl(vm_fd, KVM_SET_MEMORY_ATTRIBUTES, &a) < 0)
		die(attrs ? "KVM_SET_MEMORY_ATTRIBUTES(gpa 0x100000, 4 KiB, PRIVATE)"
			  : "KVM_SET_MEMORY_ATTRIBUTES(gpa 0x100000, 4 KiB, 0 = shared)");
}

/* KVM_SET_CLOCK one second ahead of KVM_GET_CLOCK: an update request for every vCPU */
static uint64_t clock_ahead(void)
{
	struct kvm_clock_data c;

	memset(&c, 0, sizeof(c));
	if (ioctl(vm_fd, KVM_GET_CLOCK, &c) < 0)
		die("KVM_GET_CLOCK");
	c.clock += NSEC_PER_SEC;
	c.flags = 0;
	c.realtime = 0;
	c.host_tsc = 0;
	if (ioctl(vm_fd, KVM_SET_CLOCK, &c) < 0)
		die("KVM_SET_CLOCK");
	return c.clock;
}

/* One round: KVM_RUN until the guest halts; returns the version the guest read (its port write). */
static uint32_t run_round(const char *where)
{
	uint32_t guest_version = 0;
	int exits, got = 0;

	for (exits = 0; exits < MAX_EXITS; exits++) {
		run->exit_reason = KVM_EXIT_UNKNOWN;
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR && timed_out) {
				printf("ERROR: %s: KVM_RUN still running after %d s (exit reason %u)\n", where,
				       ALARM_SECONDS, run->exit_reason);
				exit(2);
			}
			if (errno == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
				struct memory_fault_exit *mf = (void *)&run->hw;

				printf("ERROR: %s: KVM_RUN: EFAULT with KVM_EXIT_MEMORY_FAULT gpa %#llx size %#llx "
				       "flags %#llx (the guest's read of its pvclock could not be served)\n", where,
				       (unsigned long long)mf->gpa, (unsigned long long)mf->size,
				       (unsigned long long)mf->flags);
				exit(2);
			}
			if (errno == EINTR || errno == EAGAIN)
				continue;
			printf("ERROR: %s: KVM_RUN: %s (errno %d)\n", where, strerror(errno), errno);
			exit(2);
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != VERSION_PORT ||
			    run->io.size != 4 || run->io.count != 1) {
				printf("ERROR: %s: unexpected IO exit: port %#x size %u count %u direction %u\n",
				       where, run->io.port, run->io.size, run->io.count, run->io.direction);
				exit(2);
			}
			memcpy(&guest_version, (uint8_t *)run + run->io.data_offset, 4);
			got = 1;
			break;
		case KVM_EXIT_HLT: {
			struct kvm_regs regs;

			if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) < 0)
				die("KVM_GET_REGS");
			if (regs.rip != HLT_NEXT_IP || !got) {
				printf("ERROR: %s: the guest halted at rip %#llx (expected %#llx) %s\n", where,
				       (unsigned long long)regs.rip, HLT_NEXT_IP,
				       got ? "after reporting" : "without reporting what it read");
				exit(2);
			}
			return guest_version;
		}
		default: {
			struct kvm_regs regs;

			memset(&regs, 0, sizeof(regs));
			ioctl(vcpu_fd, KVM_GET_REGS, &regs);
			printf("ERROR: %s: unexpected exit reason %u (rip %#llx)\n", where, run->exit_reason,
			       (unsigned long long)regs.rip);
			exit(2);
		}
		}
	}
	printf("ERROR: %s: %d exits without the guest halting\n", where, MAX_EXITS);
	exit(2);
}

/* 8-byte words of the page that differ: how many, and the first one's offset (-1: none) */
static int page_diff(const uint8_t *a, const uint8_t *b, long *first)
{
	int n = 0;
	long i;

	*first = -1;
	for (i = 0; i < (long)PAGE; i += 8) {
		if (memcmp(a + i, b + i, 8)) {
			if (*first < 0)
				*first = i;
			n++;
		}
	}
	return n;
}

static void add_slot(uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *hva,
		     int gmem)
{
	struct kvm_userspace_memory_region2 r;
	char what[128];

	memset(&r, 0, sizeof(r));
	r.slot = slot;
	r.flags = flags;
	r.guest_phys_addr = gpa;
	r.memory_size = size;
	r.userspace_addr = (uint64_t)(uintptr_t)hva;
	if (flags & KVM_MEM_GUEST_MEMFD) {
		r.guest_memfd = gmem;
		r.guest_memfd_offset = 0;
	}
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION2, &r) < 0) {
		snprintf(what, sizeof(what), "KVM_SET_USER_MEMORY_REGION2(slot %u, gpa %#llx%s)", slot,
			 (unsigned long long)gpa, flags & KVM_MEM_GUEST_MEMFD ? ", KVM_MEM_GUEST_MEMFD" : "");
		die(what);
	}
}

int main(int argc, char **argv)
{
	struct { uint32_t nmsrs, pad; struct kvm_msr_entry e[1]; } msrs;
	struct pvclock_vcpu_time_info before, after, ctl;
	struct kvm_create_guest_memfd g;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct sigaction sa;
	uint8_t snap[PAGE];
	uint64_t set_to, set_to2;
	uint32_t gv_before = 0, gv_after, gv_ctl;
	int r, gmem_fd, run_size, private_first = 0, nwords;
	long first;
	char why[320];
	void *code;

	if (argc == 2 && !strcmp(argv[1], "-p"))
		private_first = 1;
	else if (argc != 1) {
		fprintf(stderr, "usage: %s [-p]   (-p: the page is PRIVATE before kvmclock is enabled)\n",
			argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART: a KVM_RUN still running returns EINTR */
	sigaction(SIGALRM, &sa, NULL);
	alarm(ALARM_SECONDS);

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0) {
		snprintf(why, sizeof(why), "cannot open /dev/kvm: %s", strerror(errno));
		skip(why);
	}
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		skip("KVM_GET_API_VERSION is not 12");
	r = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
	if (r < 0 || !(r & (1 << KVM_X86_SW_PROTECTED_VM))) {
		snprintf(why, sizeof(why), "KVM_CAP_VM_TYPES = %#x has no KVM_X86_SW_PROTECTED_VM (bit 1): "
			 "only a kernel built with CONFIG_KVM_SW_PROTECTED_VM=y (and the TDP MMU) offers "
			 "VMs with private memory", r < 0 ? 0 : r);
		skip(why);
	}
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM);
	if (vm_fd < 0)
		die("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)");
	if (ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2) <= 0)
		skip("KVM_CAP_USER_MEMORY2 is 0: no KVM_SET_USER_MEMORY_REGION2");
	if (ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0)
		skip("KVM_CAP_GUEST_MEMFD is 0 for the SW-protected VM: no guest_memfd");
	r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES);
	if (r < 0 || !(r & KVM_MEMORY_ATTRIBUTE_PRIVATE)) {
		snprintf(why, sizeof(why), "KVM_CAP_MEMORY_ATTRIBUTES = %#x for the SW-protected VM: no "
			 "PRIVATE attribute (%#llx)", r < 0 ? 0 : r, KVM_MEMORY_ATTRIBUTE_PRIVATE);
		skip(why);
	}
	if (ioctl(vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
		die("KVM_SET_TSS_ADDR");

	/* slot 0: the code */
	code = mmap(NULL, SLOT0_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (code == MAP_FAILED)
		die("mmap(slot 0)");
	memcpy((uint8_t *)code + CODE_GPA, guest_code, sizeof(guest_code));
	add_slot(0, 0, 0, SLOT0_SIZE, code, -1);

	/* slot 1: guest_memfd (private side) + anonymous memory (shared side) */
	memset(&g, 0, sizeof(g));
	g.size = PRIV_SIZE;
	g.flags = 0;
	gmem_fd = ioctl(vm_fd, KVM_CREATE_GUEST_MEMFD, &g);
	if (gmem_fd < 0)
		die("KVM_CREATE_GUEST_MEMFD(size 64 KiB, flags 0)");
	shared = mmap(NULL, PRIV_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		die("mmap(slot 1's shared side)");
	add_slot(PRIV_SLOT, KVM_MEM_GUEST_MEMFD, PRIV_GPA, PRIV_SIZE, shared, gmem_fd);
	printf("SW-protected VM (type %d); slot 0: GPA 0x0, 64 KiB anonymous (code at %#llx); slot 1: "
	       "GPA %#llx, 64 KiB, guest_memfd (flags 0) + anonymous shared side\n",
	       KVM_X86_SW_PROTECTED_VM, CODE_GPA, PRIV_GPA);

	/* the vCPU: real mode, cs = 0, ip = the code */
	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		die("KVM_CREATE_VCPU");
	run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		die("mmap(kvm_run)");
	if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	if (private_first) {
		set_attributes(KVM_MEMORY_ATTRIBUTE_PRIVATE);
		printf("gfn %#llx -> PRIVATE (KVM_SET_MEMORY_ATTRIBUTES) before kvmclock is enabled\n",
		       PRIV_GPA / PAGE);
	}

	/* kvmclock on the page's +0x40 */
	memset(&msrs, 0, sizeof(msrs));
	msrs.nmsrs = 1;
	msrs.e[0].index = MSR_KVM_SYSTEM_TIME_NEW;
	msrs.e[0].data = PV_GPA | 1;
	r = ioctl(vcpu_fd, KVM_SET_MSRS, &msrs);
	if (r < 0)
		die("KVM_SET_MSRS(MSR_KVM_SYSTEM_TIME_NEW)");
	if (r != 1) {
		printf("ERROR: KVM_SET_MSRS(MSR_KVM_SYSTEM_TIME_NEW = %#llx) set %d of 1 MSRs: KVM refused "
		       "the kvmclock MSR\n", PV_GPA | 1, r);
		return 2;
	}
	msrs.e[0].data = 0;
	r = ioctl(vcpu_fd, KVM_GET_MSRS, &msrs);
	if (r != 1)
		die("KVM_GET_MSRS(MSR_KVM_SYSTEM_TIME_NEW)");
	printf("kvmclock: MSR_KVM_SYSTEM_TIME_NEW = %#llx accepted (reads back %#llx)\n", PV_GPA | 1,
	       (unsigned long long)msrs.e[0].data);
	if (msrs.e[0].data != (PV_GPA | 1)) {
		printf("ERROR: MSR_KVM_SYSTEM_TIME_NEW reads back %#llx, not %#llx\n",
		       (unsigned long long)msrs.e[0].data, PV_GPA | 1);
		return 2;
	}

	if (!private_first) {
		/* control: while the gfn is shared the update lands in the shared page, the guest reads it */
		gv_before = run_round("control, gfn shared");
		before = pv_at(shared);
		printf("control, gfn %#llx shared: shared page holds %s; the guest reads version %u\n",
		       PRIV_GPA / PAGE, describe(&before), gv_before);
		if (before.version == 0 || (before.version & 1) || gv_before != before.version) {
			printf("ERROR: control failed: with the gfn shared KVM should write an even non-zero "
			       "version into the shared page and the guest read the same (shared page %s, "
			       "guest %u): the setup does not work here\n", describe(&before), gv_before);
			return 2;
		}
		set_attributes(KVM_MEMORY_ATTRIBUTE_PRIVATE);
		memcpy(snap, shared, PAGE);
		set_to = clock_ahead();
		printf("gfn %#llx -> PRIVATE (KVM_SET_MEMORY_ATTRIBUTES); KVM_SET_CLOCK %llu ns (+1 s), "
		       "KVM_RUN\n", PRIV_GPA / PAGE, (unsigned long long)set_to);
		gv_after = run_round("gfn private");
	} else {
		memcpy(snap, shared, PAGE);
		before = pv_at(snap);
		gv_before = run_round("gfn private, first entry after enabling");
		set_to = clock_ahead();
		printf("KVM_RUN (first entry: the enable's update); the guest reads version %u; "
		       "KVM_SET_CLOCK %llu ns (+1 s), KVM_RUN\n", gv_before, (unsigned long long)set_to);
		gv_after = run_round("gfn private");
	}
	after = pv_at(shared);
	nwords = page_diff(snap, shared, &first);
	if (nwords)
		printf("shared page after: %d 8-byte words differ, first at +%#lx; %s; the guest reads "
		       "version %u\n", nwords, first, describe(&after), gv_after);
	else
		printf("shared page after: unchanged (%s); the guest reads version %u\n", describe(&after),
		       gv_after);

	/* control: shared again, an update reaches the shared page (and the guest) */
	set_attributes(0);
	set_to2 = clock_ahead();
	gv_ctl = run_round("control, gfn shared again");
	ctl = pv_at(shared);
	printf("control, gfn %#llx shared again: KVM_SET_CLOCK %llu ns (+1 s), KVM_RUN: shared page %s; "
	       "the guest reads version %u\n", PRIV_GPA / PAGE, (unsigned long long)set_to2,
	       describe(&ctl), gv_ctl);
	if (ctl.version == 0 || (ctl.version & 1) || ctl.version == after.version ||
	    gv_ctl != ctl.version || ctl.system_time < set_to2) {
		printf("ERROR: control failed: with the gfn shared again KVM should write a new even "
		       "version (system_time >= %llu) into the shared page and the guest read it: cannot "
		       "tell \"no write while private\" from \"no update at all\"\n",
		       (unsigned long long)set_to2);
		return 2;
	}

	if (nwords) {
		printf("BUG: KVM wrote the kvmclock update into the shared page (userspace_addr + %#llx) of "
		       "gfn %#llx while the gfn is PRIVATE%s: version %u -> %u, system_time %llu -> %llu "
		       "(after KVM_SET_CLOCK to %llu); the guest reads its private page: version %u. The "
		       "gfn_to_pfn_cache (virt/kvm/pfncache.c) maps gpa -> memslot -> userspace_addr -> pfn "
		       "without looking at the memory attributes, so kvm_setup_guest_pvclock() writes the "
		       "side the guest no longer reads\n", PV_OFF, PRIV_GPA / PAGE,
		       private_first ? " (private before kvmclock was enabled)" : "", before.version,
		       after.version, (unsigned long long)before.system_time,
		       (unsigned long long)after.system_time, (unsigned long long)set_to, gv_after);
		return 1;
	}
	printf("OK: the shared page is untouched while gfn %#llx is PRIVATE (the guest reads version %u "
	       "there), and the update reaches it again once the gfn is shared\n", PRIV_GPA / PAGE,
	       gv_after);
	return 0;
}
