/*
 * exceptions: arg selects what goes wrong.
 *   0: ud2 (#UD, reported by the runtime)
 *   1: read an unmapped GVA (#PF with cr2 = that address; 0x7fff00000000 on 64-bit, 0xfff00000 on
 *      32-bit, where it is a #PF only with paging; without paging it is an MMIO read)
 *   2: a #UD handler skips the 2-byte ud2, then SYNC(0x600d) proves it ran and returned
 *   3: divide by zero (#DE) with volatile operands
 */
#include "guest.h"

#ifdef __x86_64__
#define UNMAPPED_GVA 0x7fff00000000ull
#else
#define UNMAPPED_GVA 0xfff00000u
#endif

static volatile int ud_handled;

static void skip_ud2(struct ex_regs *regs)
{
	GUEST_ASSERT_EQ(regs->vector, UD_VECTOR);
	regs->rip += 2; /* ud2 is 0f 0b */
	ud_handled++;
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	switch (arg) {
	case 0:
		__asm__ __volatile__("ud2");
		break;
	case 1:
		GUEST_SYNC(mmio_read8(UNMAPPED_GVA));
		break;
	case 2:
		guest_set_handler(UD_VECTOR, skip_ud2);
		__asm__ __volatile__("ud2" ::: "memory");
		GUEST_ASSERT_EQ(ud_handled, 1);
		guest_set_handler(UD_VECTOR, NULL);
		GUEST_SYNC(0x600d);
		break;
	case 3: {
		volatile unsigned int a = 1, b = 0;

		GUEST_SYNC(a / b);
		break;
	}
	default:
		GUEST_FAIL("exceptions: unknown arg %lu", (unsigned long)arg);
	}
}
