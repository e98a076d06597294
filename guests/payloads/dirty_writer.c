/*
 * dirty_writer: arg = GVA of struct dirty_desc. The guest writes one 8-byte word into each page of
 * a host-chosen list, in list order, so the host knows exactly which pages it dirtied and in which
 * order (dirty log / dirty ring oracles, harness/kvm/dirty.py).
 *
 *   cmd 0  return (DONE)
 *   cmd 1  one pass: for i < count: page = pages[i]; word at base + page * 4096 + word_offset(page)
 *          = dirty_value(round, page)                      -> SYNC(count, round, 1)
 *   cmd 2  passes with round, round + 1, ... until *stop != 0 (checked between pages); after each
 *          pass `rounds_done` = passes completed            -> SYNC(passes, pages written, 2)
 *
 * dirty_value(r, p) = r << 32 | p (p < 2^32); word_offset(p) = (p * 64) % 4096, so the changed word
 * moves around the page. All stores are single 8-byte movs (x86_64).
 */
#include "guest.h"

struct dirty_desc {
	uint64_t cmd;
	uint64_t base;        /* GVA of page 0 of the test memory */
	uint64_t pages;       /* GVA of the u64 page-index list */
	uint64_t count;       /* entries in the list */
	uint64_t round;       /* cmd 1: the round; cmd 2: the first round */
	uint64_t stop;        /* cmd 2: the host sets it to end the passes */
	uint64_t rounds_done; /* cmd 2: written by the guest after each pass */
	uint64_t written;     /* cmd 2: pages written so far (incl. a partial pass) */
};

static inline uintptr_t page_word(uint64_t base, uint64_t page)
{
	return (uintptr_t)(base + page * 4096 + ((page * 64) & 4095));
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct dirty_desc *d = (volatile struct dirty_desc *)arg;

	(void)vcpu_id;
	for (;;) {
		uint64_t cmd = d->cmd, base = d->base, count = d->count, round = d->round;
		const volatile uint64_t *pages = (const volatile uint64_t *)(uintptr_t)d->pages;
		uint64_t i, r, written = 0;

		write_cr3(read_cr3());
		switch (cmd) {
		case 0:
			return;
		case 1:
			for (i = 0; i < count; i++)
				store64(page_word(base, pages[i]), round << 32 | pages[i]);
			GUEST_SYNC(count, round, 1);
			break;
		case 2:
			for (r = round; !d->stop; r++) {
				for (i = 0; i < count && !d->stop; i++) {
					store64(page_word(base, pages[i]), r << 32 | pages[i]);
					d->written = ++written;
				}
				if (i == count)
					d->rounds_done = r - round + 1;
			}
			GUEST_SYNC(d->rounds_done, written, 2);
			break;
		default:
			GUEST_FAIL("dirty_writer: unknown cmd %" PRIu64, cmd);
		}
	}
}
