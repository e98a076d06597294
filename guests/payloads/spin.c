/* spin: loops forever without a single exit (for the watchdog). */
#include "guest.h"

volatile uint64_t spin_count; /* the host may read it by symbol */

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	(void)arg;
	for (;;) {
		spin_count++;
		cpu_relax();
	}
}
