// SPDX-License-Identifier: GPL-2.0
/*
 * gmem-bind-offset-overflow: KVM_SET_USER_MEMORY_REGION2 accepts a guest_memfd binding whose
 * range lies far beyond the end of the file: guest_memfd_offset 2^63 - 2 MiB with a 2 MiB slot.
 *
 * kvm_gmem_bind() (virt/kvm/guest_memfd.c) checks the range with
 *     if (offset < 0 || !PAGE_ALIGNED(offset) || offset + size > i_size_read(inode))
 * where offset and size are signed loff_t: offset + size = 2^63 overflows (undefined behaviour;
 * in practice it wraps to -2^63), the comparison is false, and a binding of pages 2^51 - 512 ..
 * 2^51 of an 8 MiB file is accepted. Every other out-of-file range is refused with EINVAL, which
 * is what api.rst promises ("guest_memfd_offset ... must be within the guest_memfd's size").
 *
 * Setup (a default VM, as QEMU creates them): an 8 MiB guest_memfd; slot 7, GPA 16 GiB, 2 MiB,
 * guest_memfd_offset 0x7fffffffffe00000. Controls first: offset 4 MiB must bind (then the slot is
 * deleted again), offsets 8 MiB (at the end) and 7 MiB (running past the end) must both be EINVAL:
 * the setup is sound and the range check is there.
 *
 * Build: gcc -O2 -o gmem-bind-offset-overflow gmem-bind-offset-overflow.c
 * Run:   ./gmem-bind-offset-overflow        (as a user who may open /dev/kvm)
 * Needs: /dev/kvm with KVM_CAP_USER_MEMORY2 and KVM_CAP_GUEST_MEMFD for the default VM type
 *        (upstream 6.8+ with CONFIG_KVM_GUEST_MEMFD; default VMs may bind guest_memfd from 6.18).
 *
 * Prints one line per step and a verdict line starting with OK, BUG, SKIP or ERROR. On Debian's
 * 6.18.15 (kvm_amd):
 *   guest_memfd: 8 MiB, flags 0x3; userspace_addr its own mapping
 *   control, slot 7: guest_memfd_offset 0x400000 (inside the file) -> success
 *   control, slot 7: guest_memfd_offset 0x800000 (at the end of the file) -> EINVAL
 *   control, slot 7: guest_memfd_offset 0x700000 (runs past the end) -> EINVAL
 *   slot 7: gpa 0x400000000, size 2 MiB, guest_memfd_offset 0x7fffffffffe00000
 *           (offset + size = 2^63) -> success (0)
 *   BUG: KVM_SET_USER_MEMORY_REGION2(slot=7, ..., guest_memfd_offset=0x7fffffffffe00000) on an
 *        8 MiB guest_memfd: got success (0), expected EINVAL (22): offset + size = 2^63 wraps ...
 * On Debian's 7.3.4 the last request gets EINVAL (22) and it ends "OK: ...".
 * Exit codes: 0 = the kernel refuses the wrapped range with EINVAL (bug not reproduced)
 *             1 = bug reproduced (prints what the kernel answered and what was expected)
 *             2 = the reproducer could not complete (an unexpected failure; prints it)
 *             4 = cannot test here (no /dev/kvm, capability missing; prints why)
 * No KVM_RUN, only ioctls that return at once; alarm(60) ends it (SIGALRM) should one not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
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
_Static_assert(sizeof(struct kvm_userspace_memory_region2) == 160, "uapi layout");
_Static_assert(sizeof(struct kvm_create_guest_memfd) == 64, "uapi layout");

#define MiB (1ULL << 20)
#define GMEM_SIZE (8 * MiB)
#define SLOT_SIZE (2 * MiB)
#define WRAP_OFFSET ((1ULL << 63) - SLOT_SIZE)

static int vm_fd, gmem_fd;
static uint64_t hva;

static void skip(const char *why)
{
	printf("SKIP: %s\n", why);
	exit(4);
}

static int gmem_bind(uint32_t slot, uint64_t gpa, uint64_t offset)
{
	struct kvm_userspace_memory_region2 r;

	memset(&r, 0, sizeof(r));
	r.slot = slot;
	r.flags = KVM_MEM_GUEST_MEMFD;
	r.guest_phys_addr = gpa;
	r.memory_size = SLOT_SIZE;
	r.userspace_addr = hva;
	r.guest_memfd = gmem_fd;
	r.guest_memfd_offset = offset;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION2, &r) < 0)
		return errno;
	return 0;
}

static const char *ename(int e)
{
	switch (e) {
	case 0: return "success";
	case EINVAL: return "EINVAL";
	case EEXIST: return "EEXIST";
	case EBADF: return "EBADF";
	case EFAULT: return "EFAULT";
	case ENOMEM: return "ENOMEM";
	case ENOTTY: return "ENOTTY";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	default: return "another errno";
	}
}

int main(void)
{
	struct kvm_create_guest_memfd g;
	char why[256];
	int kvm, r, flags, e;

	alarm(60);
	setvbuf(stdout, NULL, _IOLBF, 0);
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
	if (ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2) <= 0)
		skip("KVM_CAP_USER_MEMORY2 is 0: no KVM_SET_USER_MEMORY_REGION2 on this kernel");
	if (ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0)
		skip("KVM_CAP_GUEST_MEMFD is 0: no guest_memfd on this kernel (for a default VM)");

	/* Map the file as the slots' userspace_addr where KVM allows (6.18+), else plain anon memory:
	 * the binding check does not look at userspace_addr. */
	r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	flags = r > 0 ? r & (int)(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) : 0;
	memset(&g, 0, sizeof(g));
	g.size = GMEM_SIZE;
	g.flags = flags;
	gmem_fd = ioctl(vm_fd, KVM_CREATE_GUEST_MEMFD, &g);
	if (gmem_fd < 0) {
		snprintf(why, sizeof(why), "KVM_CREATE_GUEST_MEMFD(size=8 MiB, flags=%#x): %s", flags,
			 strerror(errno));
		skip(why);
	}
	void *p = (flags & GUEST_MEMFD_FLAG_MMAP)
		? mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem_fd, 0)
		: mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		printf("ERROR: mmap: %s\n", strerror(errno));
		return 2;
	}
	hva = (uint64_t)(uintptr_t)p;
	printf("guest_memfd: 8 MiB, flags %#x; userspace_addr %s\n", flags,
	       flags & GUEST_MEMFD_FLAG_MMAP ? "its own mapping" : "anonymous memory");

	/* controls: a binding inside the file works, and ranges past its end are refused */
	e = gmem_bind(7, 16ULL << 30, 4 * MiB);
	printf("control, slot 7: guest_memfd_offset 0x400000 (inside the file) -> %s\n", ename(e));
	if (e) {
		snprintf(why, sizeof(why), "a guest_memfd slot cannot be added to a default VM here "
			 "(KVM_SET_USER_MEMORY_REGION2: %s)", strerror(e));
		skip(why);
	}
	{
		struct kvm_userspace_memory_region2 del;

		memset(&del, 0, sizeof(del));
		del.slot = 7;	/* memory_size 0: delete it again */
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION2, &del) < 0) {
			printf("ERROR: deleting slot 7: %s\n", strerror(errno));
			return 2;
		}
	}
	e = gmem_bind(7, 16ULL << 30, 8 * MiB);
	printf("control, slot 7: guest_memfd_offset 0x800000 (at the end of the file) -> %s\n", ename(e));
	if (e != EINVAL) {
		printf("ERROR: expected EINVAL for a range past the end of the file; cannot judge the "
		       "overflow\n");
		return 2;
	}
	e = gmem_bind(7, 16ULL << 30, 7 * MiB);
	printf("control, slot 7: guest_memfd_offset 0x700000 (runs past the end) -> %s\n", ename(e));
	if (e != EINVAL) {
		printf("ERROR: expected EINVAL for a range past the end of the file; cannot judge the "
		       "overflow\n");
		return 2;
	}

	e = gmem_bind(7, 16ULL << 30, WRAP_OFFSET);
	printf("slot 7: gpa 0x400000000, size 2 MiB, guest_memfd_offset %#llx (offset + size = 2^63) "
	       "-> %s (%d)\n", (unsigned long long)WRAP_OFFSET, ename(e), e);
	if (e == EINVAL) {
		printf("OK: a range past the end of the file is refused with EINVAL, also where "
		       "offset + size overflows loff_t\n");
		return 0;
	}
	printf("BUG: KVM_SET_USER_MEMORY_REGION2(slot=7, flags=KVM_MEM_GUEST_MEMFD, "
	       "guest_phys_addr=0x400000000, memory_size=0x200000, guest_memfd_offset=%#llx) on an "
	       "8 MiB guest_memfd: got %s (%d), expected EINVAL (%d)%s\n",
	       (unsigned long long)WRAP_OFFSET, ename(e), e, EINVAL,
	       e == 0 ? ": offset + size = 2^63 wraps to a negative loff_t, so kvm_gmem_bind()'s "
			"`offset + size > i_size_read(inode)` is false and pages 2^51-512..2^51 of the "
			"file are bound" : "");
	return 1;
}
