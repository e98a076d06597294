// Baseline for demand_fault (bench/demand.py): the memtouch guest writes one word into every
// 4 KiB page of a fresh anonymous slot; the command is timed from writing it to the guest's
// ucall. The guest (boot slot ranges, registers, descriptor GPA, slot and mapping) comes from
// IMAGE_DIR, dumped by bench/demand.py from a harness VM built like the timed ones.
// Usage: demand_fault IMAGE_DIR
// Prints one JSON line: {"pages", "seconds", "pages_per_s"}.
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

#define BENCH_PROG "demand_fault"
#include "bench_util.h"
#include "guest_image.h"

#define CMD_READ 3

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: demand_fault IMAGE_DIR\n");
		return 2;
	}
	struct image img;
	image_load(argv[1], &img);
	uint64_t desc = image_param(&img, "desc"), gva = image_param(&img, "gva");
	uint64_t slot_gpa = image_param(&img, "slot_gpa"), size = image_param(&img, "slot_size");
	uint64_t pattern = image_param(&img, "pattern"), cmd_write = image_param(&img, "cmd_write");
	uint64_t npages = size / 4096;

	struct guest g;
	guest_create_vm(&g, &img);
	// the fresh slot: anonymous, private, never touched by the host
	uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap test slot");
	add_slot(g.vm, 1, slot_gpa, size, 0, mem);
	guest_add_vcpu(&g, &img);
	volatile uint64_t *d = (volatile uint64_t *)(g.boot + desc);

	// untimed: the vCPU's first entry and the guest's start-up (cmd 3 over 0 bytes)
	d[0] = CMD_READ, d[1] = gva, d[2] = 0, d[3] = 0, d[4] = 8;
	expect_ucall(run_to_ucall(g.vcpu, g.run, g.boot), UCALL_SYNC, "memtouch read 0");

	double t0 = now();
	d[0] = cmd_write, d[1] = gva, d[2] = size, d[3] = pattern, d[4] = 4096;
	struct ucall *uc = run_to_ucall(g.vcpu, g.run, g.boot);
	expect_ucall(uc, UCALL_SYNC, "memtouch write");
	double t = now() - t0;
	if (uc->args[3] != npages || uc->args[4] != cmd_write) {
		fprintf(stderr, "demand_fault: memtouch answered count %lu cmd %lu, expected %lu, %lu\n",
			(unsigned long)uc->args[3], (unsigned long)uc->args[4], (unsigned long)npages,
			(unsigned long)cmd_write);
		return 1;
	}

	memset((void *)d, 0, 40); // cmd 0: DONE
	expect_ucall(run_to_ucall(g.vcpu, g.run, g.boot), UCALL_DONE, "memtouch done");
	guest_close(&g);
	munmap(mem, size);
	printf("{\"pages\": %lu, \"seconds\": %.6f, \"pages_per_s\": %.1f}\n", (unsigned long)npages, t,
	       npages / t);
	return 0;
}
