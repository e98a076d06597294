/* printf: one GUEST_PRINTF ("hello 42 kvm 0xdeadbeefcafe"), then DONE. */
#include "guest.h"

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	(void)arg;
	/* %llx with an unsigned long long is right on both targets (PRIx64 is for uint64_t) */
	GUEST_PRINTF("hello %d %s 0x%llx", 42, "kvm", 0xdeadbeefcafeULL);
}
