// Baseline for dirty_log_harvest / dirty_ring_harvest (bench/dirty.py): the dirty_writer guest
// writes one word into every page of a dirty-logged slot per pass; after each pass the host
// harvests the dirty pages and hands them back, as harness/kvm (Vm.get_dirty_pages +
// clear_dirty_pages, DirtyRing.harvest + reset_dirty_rings) does:
//   log:  KVM_GET_DIRTY_LOG into a fresh bitmap, its set bits into an array of page numbers, a
//         fresh bitmap built from that array, KVM_CLEAR_DIRTY_LOG (manual protect)
//   ring: walk the vCPU's dirty ring while entries are DIRTY, collect (slot, offset), mark RESET,
//         then KVM_RESET_DIRTY_RINGS
// Pass 1 is untimed (first touch of fresh memory), then PASSES timed ones. The guest (boot slot
// ranges, registers, descriptor and page list GPAs) comes from IMAGE_DIR (bench/image.py).
// Usage: dirty_harvest IMAGE_DIR log|ring PASSES
// Prints one JSON line: {"pages", "passes", "harvest_seconds", "harvest_pages_per_s",
// "dirty_seconds", "dirty_pages_per_s"}.
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

#define BENCH_PROG "dirty_harvest"
#include "bench_util.h"
#include "guest_image.h"

#ifndef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64
#endif

struct harvested {
	uint32_t slot;
	uint64_t offset;
};

static uint64_t harvest_log(int vm, uint64_t npages, uint64_t *pages)
{
	size_t words = (npages + 63) / 64;
	uint64_t *bm = calloc(words, 8);
	if (!bm)
		die("calloc");
	struct kvm_dirty_log log = { .slot = 1, .dirty_bitmap = bm };
	xioctl(vm, KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG");
	uint64_t n = 0;
	for (size_t w = 0; w < words; w++)
		for (uint64_t word = bm[w]; word; word &= word - 1)
			pages[n++] = w * 64 + __builtin_ctzll(word);
	free(bm);
	uint64_t *cb = calloc(words, 8);
	if (!cb)
		die("calloc");
	for (uint64_t i = 0; i < n; i++)
		cb[pages[i] / 64] |= 1ULL << (pages[i] % 64);
	struct kvm_clear_dirty_log clr = { .slot = 1, .num_pages = npages, .first_page = 0, .dirty_bitmap = cb };
	xioctl(vm, KVM_CLEAR_DIRTY_LOG, &clr, "KVM_CLEAR_DIRTY_LOG");
	free(cb);
	return n;
}

static uint64_t fetch;

static uint64_t harvest_ring(volatile struct kvm_dirty_gfn *gfns, uint64_t entries, struct harvested *out,
			     uint64_t max, int vm, int *reset)
{
	uint64_t n = 0;
	while (n < max) {
		volatile struct kvm_dirty_gfn *e = &gfns[fetch % entries];
		uint32_t flags = e->flags;
		if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
			break;
		if (flags & KVM_DIRTY_GFN_F_RESET) {
			fprintf(stderr, "dirty_harvest: ring entry %lu has flags %#x\n", (unsigned long)fetch, flags);
			exit(1);
		}
		out[n].slot = e->slot;
		out[n].offset = e->offset;
		n++;
		e->flags = KVM_DIRTY_GFN_F_RESET;
		fetch++;
	}
	*reset = ioctl(vm, KVM_RESET_DIRTY_RINGS, 0);
	if (*reset < 0)
		die("KVM_RESET_DIRTY_RINGS");
	return n;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: dirty_harvest IMAGE_DIR log|ring PASSES\n");
		return 2;
	}
	int ring = !strcmp(argv[2], "ring");
	if (!ring && strcmp(argv[2], "log")) {
		fprintf(stderr, "dirty_harvest: method %s (log|ring)\n", argv[2]);
		return 2;
	}
	long passes = strtol(argv[3], NULL, 0);
	if (passes <= 0)
		return 2;
	struct image img;
	image_load(argv[1], &img);
	uint64_t desc = image_param(&img, "desc"), list = image_param(&img, "list");
	uint64_t npages = image_param(&img, "npages"), gva = image_param(&img, "gva");
	uint64_t slot_gpa = image_param(&img, "slot_gpa"), size = image_param(&img, "slot_size");
	uint64_t entries = image_param(&img, "ring_entries");

	struct guest g;
	guest_create_vm(&g, &img);
	struct kvm_enable_cap cap = { 0 };
	if (ring) {
		cap.cap = KVM_CAP_DIRTY_LOG_RING;
		cap.args[0] = entries * sizeof(struct kvm_dirty_gfn);
	} else {
		cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
		cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
	}
	xioctl(g.vm, KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP");
	guest_add_vcpu(&g, &img);
	uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap test slot");
	add_slot(g.vm, 1, slot_gpa, size, KVM_MEM_LOG_DIRTY_PAGES, mem);
	volatile struct kvm_dirty_gfn *gfns = NULL;
	size_t ring_bytes = entries * sizeof(struct kvm_dirty_gfn);
	if (ring) {
		gfns = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, g.vcpu,
			    KVM_DIRTY_LOG_PAGE_OFFSET * getpagesize());
		if (gfns == MAP_FAILED)
			die("mmap dirty ring");
	}
	uint64_t *pages = malloc(npages * sizeof(*pages));
	struct harvested *ents = malloc(entries * sizeof(*ents));
	if (!pages || !ents)
		die("malloc");

	volatile uint64_t *d = (volatile uint64_t *)(g.boot + desc);
	double t_dirty = 0, t_harvest = 0;
	for (long rnd = 1; rnd <= passes + 1; rnd++) {
		double t0 = now();
		d[0] = 1, d[1] = gva, d[2] = list, d[3] = npages, d[4] = rnd, d[5] = 0, d[6] = 0, d[7] = 0;
		struct ucall *uc = run_to_ucall(g.vcpu, g.run, g.boot);
		expect_ucall(uc, UCALL_SYNC, "dirty_writer pass");
		double t1 = now();
		uint64_t got;
		int reset;
		if (ring) {
			got = harvest_ring(gfns, entries, ents, entries, g.vm, &reset);
		} else {
			got = harvest_log(g.vm, npages, pages);
			reset = got;
		}
		double t2 = now();
		if (uc->args[0] != npages || uc->args[1] != (uint64_t)rnd) {
			fprintf(stderr, "dirty_harvest: dirty_writer answered (%lu, %lu) to pass %ld\n",
				(unsigned long)uc->args[0], (unsigned long)uc->args[1], rnd);
			return 1;
		}
		if (got != npages || (uint64_t)reset != npages) {
			fprintf(stderr, "dirty_harvest: %s pass %ld: harvested %lu, reset %d, the guest wrote %lu pages\n",
				argv[2], rnd, (unsigned long)got, reset, (unsigned long)npages);
			return 1;
		}
		if (rnd > 1) {
			t_dirty += t1 - t0;
			t_harvest += t2 - t1;
		}
	}

	memset((void *)d, 0, 64); // cmd 0: DONE
	expect_ucall(run_to_ucall(g.vcpu, g.run, g.boot), UCALL_DONE, "dirty_writer done");
	if (ring)
		munmap((void *)gfns, ring_bytes);
	guest_close(&g);
	munmap(mem, size);
	double total = (double)passes * npages;
	printf("{\"pages\": %lu, \"passes\": %ld, \"harvest_seconds\": %.6f, \"harvest_pages_per_s\": %.1f, "
	       "\"dirty_seconds\": %.6f, \"dirty_pages_per_s\": %.1f}\n",
	       (unsigned long)npages, passes, t_harvest, total / t_harvest, t_dirty, total / t_dirty);
	return 0;
}
