/* assert_fail: a GUEST_ASSERT_EQ that fails with 42 vs 43 (the host checks file:line and values). */
#include "guest.h"

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile int six = 6;
	int x = six * 7;

	(void)vcpu_id;
	(void)arg;
	GUEST_ASSERT_EQ(x, 43);
}
