/* pio_loop: `out %al, $0x80` forever, one PIO exit per iteration (an exit-rate benchmark). */
#include "guest.h"

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	(void)arg;
	for (;;)
		outb(0x80, 0);
}
