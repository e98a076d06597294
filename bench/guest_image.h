/* The harness's guest for a C baseline: load what bench/image.py dumped (image.bin, sregs.bin,
 * regs.bin, params.txt), copy it into a boot slot, and run a vCPU to the guest's next ucall as
 * harness/lib/run.py does (guests/ABI.md: `out %eax, $0x1000`, eax = the struct ucall's GPA).
 * Include after bench_util.h. */
#ifndef GUEST_IMAGE_H
#define GUEST_IMAGE_H

#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define BOOT_SIZE (16UL << 20) /* harness/lib/guestvm.py BOOT_SLOT_SIZE */
#define UCALL_PORT 0x1000
#define UCALL_SYNC 1
#define UCALL_ASSERT 2
#define UCALL_DONE 3
#define UCALL_PRINTF 4
#define UCALL_EXCEPTION 5

struct ucall {
	uint64_t cmd, nargs, args[6], line;
	char file[128];
	char buf[1024];
};

struct extent {
	uint64_t gpa, len;
	uint8_t *data;
};

struct image {
	size_t n;
	struct extent *ext;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	char dir[4000];
};

static inline void read_all(const char *dir, const char *name, void **buf, size_t *len)
{
	char path[4200];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die(path);
	off_t size = lseek(fd, 0, SEEK_END);
	if (size < 0 || lseek(fd, 0, SEEK_SET) < 0)
		die(path);
	*buf = malloc(size + 1);
	if (!*buf)
		die("malloc");
	size_t got = 0;
	while (got < (size_t)size) {
		ssize_t r = read(fd, (char *)*buf + got, size - got);
		if (r <= 0)
			die(path);
		got += r;
	}
	((char *)*buf)[size] = 0;
	*len = size;
	close(fd);
}

static inline void read_exact(const char *dir, const char *name, void *dst, size_t want)
{
	void *buf;
	size_t len;
	read_all(dir, name, &buf, &len);
	if (len != want) {
		fprintf(stderr, "%s: %s/%s has %zu bytes, expected %zu\n", BENCH_PROG, dir, name, len, want);
		exit(1);
	}
	memcpy(dst, buf, want);
	free(buf);
}

static inline void image_load(const char *dir, struct image *img)
{
	void *raw;
	size_t len, off = 0;
	snprintf(img->dir, sizeof(img->dir), "%s", dir);
	read_all(dir, "image.bin", &raw, &len);
	img->n = 0;
	img->ext = NULL;
	while (off + 16 <= len) {
		uint64_t hdr[2];
		memcpy(hdr, (uint8_t *)raw + off, 16);
		off += 16;
		if (hdr[1] > len - off || hdr[0] + hdr[1] > BOOT_SIZE) {
			fprintf(stderr, "%s: %s/image.bin: bad range %#lx+%#lx\n", BENCH_PROG, dir,
				(unsigned long)hdr[0], (unsigned long)hdr[1]);
			exit(1);
		}
		img->ext = realloc(img->ext, (img->n + 1) * sizeof(*img->ext));
		if (!img->ext)
			die("realloc");
		img->ext[img->n++] = (struct extent){ hdr[0], hdr[1], (uint8_t *)raw + off };
		off += hdr[1];
	}
	read_exact(dir, "sregs.bin", &img->sregs, sizeof(img->sregs));
	read_exact(dir, "regs.bin", &img->regs, sizeof(img->regs));
}

/* params.txt: `key value` lines */
static inline uint64_t image_param(const struct image *img, const char *key)
{
	void *raw;
	size_t len;
	read_all(img->dir, "params.txt", &raw, &len);
	char *save = NULL;
	for (char *line = strtok_r(raw, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char k[64];
		unsigned long long v;
		if (sscanf(line, "%63s %llu", k, &v) == 2 && !strcmp(k, key)) {
			free(raw);
			return v;
		}
	}
	fprintf(stderr, "%s: %s/params.txt has no %s\n", BENCH_PROG, img->dir, key);
	exit(1);
}

/* The harness's Vm.write of each range, in GPA order. */
static inline void image_apply(const struct image *img, uint8_t *boot)
{
	for (size_t i = 0; i < img->n; i++)
		memcpy(boot + img->ext[i].gpa, img->ext[i].data, img->ext[i].len);
}

/* KVM_GET_SUPPORTED_CPUID as Kvm._get_cpuid asks: 64 entries, doubled on E2BIG. */
static inline struct kvm_cpuid2 *supported_cpuid(int kvm)
{
	for (int n = 64;; n *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));
		if (!c)
			die("calloc");
		c->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) == 0)
			return c;
		free(c);
		if (errno != E2BIG || n >= 4096)
			die("KVM_GET_SUPPORTED_CPUID");
	}
}

/* Run to the guest's next ucall; PRINTF is passed over, ASSERT and EXCEPTION fail the program,
 * any other exit too. Returns the ucall in the boot slot. */
static inline struct ucall *run_to_ucall(int vcpu, struct kvm_run *run, uint8_t *boot)
{
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != UCALL_PORT) {
			fprintf(stderr, "%s: unexpected exit %u\n", BENCH_PROG, run->exit_reason);
			exit(1);
		}
		uint32_t gpa;
		memcpy(&gpa, (uint8_t *)run + run->io.data_offset, 4);
		if (gpa + sizeof(struct ucall) > BOOT_SIZE) {
			fprintf(stderr, "%s: ucall at %#x is outside the boot slot\n", BENCH_PROG, gpa);
			exit(1);
		}
		struct ucall *uc = (struct ucall *)(boot + gpa);
		if (uc->cmd == UCALL_PRINTF)
			continue;
		if (uc->cmd == UCALL_ASSERT || uc->cmd == UCALL_EXCEPTION) {
			fprintf(stderr, "%s: guest %s at %s:%lu: %s\n", BENCH_PROG,
				uc->cmd == UCALL_ASSERT ? "assert" : "exception", uc->file,
				(unsigned long)uc->line, uc->buf);
			exit(1);
		}
		return uc;
	}
}

static inline void expect_ucall(const struct ucall *uc, uint64_t cmd, const char *what)
{
	if (uc->cmd != cmd) {
		fprintf(stderr, "%s: %s: guest ucall %lu, expected %lu\n", BENCH_PROG, what,
			(unsigned long)uc->cmd, (unsigned long)cmd);
		exit(1);
	}
}

/* A VM with the harness's boot slot and vCPU 0 set up from the image (untimed set-up of the
 * baselines that time only a guest command; vm_create.c spells its sequence out instead). */
struct guest {
	int kvm, vm, vcpu, run_size;
	uint8_t *boot;
	struct kvm_run *run;
};

static inline void guest_create_vm(struct guest *g, const struct image *img)
{
	g->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (g->kvm < 0)
		die("open /dev/kvm");
	g->vm = ioctl(g->kvm, KVM_CREATE_VM, 0);
	if (g->vm < 0)
		die("KVM_CREATE_VM");
	g->boot = mmap(NULL, BOOT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g->boot == MAP_FAILED)
		die("mmap boot slot");
	struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = BOOT_SIZE,
						 .userspace_addr = (uintptr_t)g->boot };
	xioctl(g->vm, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION slot 0");
	image_apply(img, g->boot);
}

static inline void guest_add_vcpu(struct guest *g, const struct image *img)
{
	g->run_size = ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (g->run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	g->vcpu = ioctl(g->vm, KVM_CREATE_VCPU, 0);
	if (g->vcpu < 0)
		die("KVM_CREATE_VCPU");
	g->run = mmap(NULL, g->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu, 0);
	if (g->run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_cpuid2 *cpuid = supported_cpuid(g->kvm);
	xioctl(g->vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	free(cpuid);
	xioctl(g->vcpu, KVM_SET_SREGS, (void *)&img->sregs, "KVM_SET_SREGS");
	xioctl(g->vcpu, KVM_SET_REGS, (void *)&img->regs, "KVM_SET_REGS");
}

static inline void add_slot(int vm, uint32_t slot, uint64_t gpa, uint64_t size, uint32_t flags, void *hva)
{
	struct kvm_userspace_memory_region r = { .slot = slot, .flags = flags, .guest_phys_addr = gpa,
						 .memory_size = size, .userspace_addr = (uintptr_t)hva };
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
}

static inline void guest_close(struct guest *g)
{
	munmap(g->run, g->run_size);
	close(g->vcpu);
	close(g->vm);
	close(g->kvm);
	munmap(g->boot, BOOT_SIZE);
}

#endif
