/*
 * checksum: arg = GVA of struct buf_desc; SYNC(sum) with sum = sum * 31 + byte over the buffer
 * (64-bit, wrapping), then DONE.
 */
#include "guest.h"

struct buf_desc {
	uint64_t addr; /* GVA of the data */
	uint64_t len;
};

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	const struct buf_desc *d = (const struct buf_desc *)arg;
	const uint8_t *p = (const uint8_t *)(uintptr_t)d->addr;
	uint64_t len = d->len, sum = 0, i;

	(void)vcpu_id;
	for (i = 0; i < len; i++)
		sum = sum * 31 + p[i];
	GUEST_SYNC(sum);
}
