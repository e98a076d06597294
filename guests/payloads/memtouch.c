/*
 * memtouch: arg = GVA of struct memtouch_desc. Repeatedly: flush the TLB, read the descriptor,
 * run one command over the 8-byte words at gva, gva + stride, ... below gva + len, then
 * GUEST_SYNC its result; the host may change the descriptor while the vCPU is stopped there.
 *
 *   cmd 0  return (DONE)
 *   cmd 1  write: word at offset o = memtouch_word(pattern, o)
 *          -> SYNC(count written, 0, ~0, count, 1)
 *   cmd 2  verify: read each word, compare with memtouch_word(pattern, o)
 *          -> SYNC(checksum, mismatches, first mismatching offset or ~0, count, 2)
 *   cmd 3  raw read (zero checks): -> SYNC(checksum, non-zero words, first non-zero offset or ~0,
 *          count, 3)
 *
 * memtouch_word(p, o) = (p ^ o) * 0x9e3779b97f4a7c15 (mod 2^64): a bijection of p ^ o, so a word
 * that moved, went stale or was zeroed does not match by accident. checksum = checksum * 31 + word
 * (mod 2^64) over the words in address order. Offsets are relative to gva. Each word access is one
 * 8-byte mov on x86_64, so an access to an MMIO (unbacked or read-only) GPA exits with len 8.
 */
#include "guest.h"

struct memtouch_desc {
	uint64_t cmd;
	uint64_t gva;
	uint64_t len;
	uint64_t pattern;
	uint64_t stride;
};

#define MEMTOUCH_MIX 0x9e3779b97f4a7c15ULL
#define NONE (~0ULL)

static inline uint64_t memtouch_word(uint64_t pattern, uint64_t off)
{
	return (pattern ^ off) * MEMTOUCH_MIX;
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct memtouch_desc *d = (volatile struct memtouch_desc *)arg;

	(void)vcpu_id;
	for (;;) {
		uint64_t cmd, gva64, len, pattern, stride, off, count = 0;
		uint64_t sum = 0, bad = 0, first = NONE;
		uintptr_t base;

		/* Flush the TLB so host edits of the page tables made while we were stopped show on
		 * hardware paging. Shadow paging may still hold the old translation: map first. */
		write_cr3(read_cr3());
		cmd = d->cmd;
		gva64 = d->gva;
		len = d->len;
		pattern = d->pattern;
		stride = d->stride;
		if (cmd == 0)
			return;
		base = (uintptr_t)gva64;
		if ((uint64_t)base != gva64)
			GUEST_FAIL("memtouch: gva %#" PRIx64 " does not fit this guest's addresses", gva64);
		if (stride < 8 || (stride & 7) || (gva64 & 7))
			GUEST_FAIL("memtouch: gva %#" PRIx64 " / stride %" PRIu64 " not 8-byte aligned",
				   gva64, stride);
		switch (cmd) {
		case 1:
			for (off = 0; off + 8 <= len; off += stride, count++)
				store64(base + off, memtouch_word(pattern, off));
			GUEST_SYNC(count, 0, NONE, count, 1);
			break;
		case 2:
			for (off = 0; off + 8 <= len; off += stride, count++) {
				uint64_t v = load64(base + off);

				sum = sum * 31 + v;
				if (v != memtouch_word(pattern, off)) {
					if (!bad)
						first = off;
					bad++;
				}
			}
			GUEST_SYNC(sum, bad, first, count, 2);
			break;
		case 3:
			for (off = 0; off + 8 <= len; off += stride, count++) {
				uint64_t v = load64(base + off);

				sum = sum * 31 + v;
				if (v) {
					if (!bad)
						first = off;
					bad++;
				}
			}
			GUEST_SYNC(sum, bad, first, count, 3);
			break;
		default:
			GUEST_FAIL("memtouch: unknown cmd %" PRIu64, cmd);
		}
	}
}
