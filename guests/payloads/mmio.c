/*
 * mmio: arg = GVA of struct mmio_desc. Repeatedly: read the descriptor; width 0 ends (DONE);
 * otherwise make ONE access of exactly `width` bytes (1, 2, 4, 8) at `gva`:
 *   read:  SYNC(value read)
 *   write: store `value` (its low `width` bytes), then SYNC(0)
 * and go back to the descriptor, which the host may change while the vCPU is stopped at the SYNC.
 * On i386, width 8 fails with an assertion: there is no single 8-byte access there (guest.h).
 */
#include "guest.h"

struct mmio_desc {
	uint64_t gva;
	uint64_t width;
	uint64_t is_write;
	uint64_t value;
};

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct mmio_desc *d = (volatile struct mmio_desc *)arg;

	(void)vcpu_id;
	for (;;) {
		uint64_t gva64 = d->gva, width = d->width, is_write = d->is_write, value = d->value;
		uintptr_t gva = (uintptr_t)gva64;
		uint64_t v = 0;

		if (width == 0)
			return;
		if ((uint64_t)gva != gva64)
			GUEST_FAIL("mmio: gva %#" PRIx64 " does not fit this guest's addresses", gva64);
		switch (width) {
		case 1:
			if (is_write)
				mmio_write8(gva, (uint8_t)value);
			else
				v = mmio_read8(gva);
			break;
		case 2:
			if (is_write)
				mmio_write16(gva, (uint16_t)value);
			else
				v = mmio_read16(gva);
			break;
		case 4:
			if (is_write)
				mmio_write32(gva, (uint32_t)value);
			else
				v = mmio_read32(gva);
			break;
		case 8:
#if MMIO_HAVE_64
			if (is_write)
				mmio_write64(gva, value);
			else
				v = mmio_read64(gva);
			break;
#else
			GUEST_FAIL("mmio: no single 8-byte access in a 32-bit guest (no SSE/x87; see guest.h)");
#endif
		default:
			GUEST_FAIL("mmio: unsupported width %" PRIu64, width);
		}
		GUEST_SYNC(is_write ? 0 : v);
	}
}
