/* The guest IDT (vectors 0..31) and the C side of exception dispatch. */
#include "guest.h"

/* runtime/stubs{64,32}.S: the entry stub of each vector */
extern const uintptr_t guest_exception_stubs[GUEST_NR_EXCEPTIONS];

#ifdef __x86_64__
struct idt_gate { /* 16-byte long-mode gate */
	uint16_t offset0;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset1;
	uint32_t offset2;
	uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 16, "idt_gate (x86_64)");
struct idtr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));
/* the stubs build struct ex_regs in this order */
_Static_assert(offsetof(struct ex_regs, r15) == 14 * 8, "ex_regs.r15");
_Static_assert(offsetof(struct ex_regs, vector) == 15 * 8, "ex_regs.vector");
_Static_assert(offsetof(struct ex_regs, rip) == 17 * 8, "ex_regs.rip");
_Static_assert(offsetof(struct ex_regs, ss) == 21 * 8, "ex_regs.ss");
#else
struct idt_gate { /* 8-byte 32-bit gate */
	uint16_t offset0;
	uint16_t selector;
	uint8_t zero;
	uint8_t type_attr;
	uint16_t offset1;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 8, "idt_gate (i386)");
struct idtr {
	uint16_t limit;
	uint32_t base;
} __attribute__((packed));
_Static_assert(offsetof(struct ex_regs, esp) == 7 * 4, "ex_regs.esp");
_Static_assert(offsetof(struct ex_regs, vector) == 9 * 4, "ex_regs.vector");
_Static_assert(offsetof(struct ex_regs, eip) == 11 * 4, "ex_regs.eip");
_Static_assert(offsetof(struct ex_regs, eflags) == 13 * 4, "ex_regs.eflags");
#endif

#define GATE_INTERRUPT 0x8E /* present, DPL 0, interrupt gate (IF cleared on entry) */

/* In .bss (the host loader zeroes it); global so the host can find it by symbol. */
struct idt_gate guest_idt[GUEST_NR_EXCEPTIONS] __attribute__((aligned(64)));
guest_handler_t guest_handlers[GUEST_NR_EXCEPTIONS];

void guest_idt_init(void)
{
	uint16_t cs = read_cs();
	struct idtr idtr;
	int i;

	/* Every vCPU runs this; they all write the same values. */
	for (i = 0; i < GUEST_NR_EXCEPTIONS; i++) {
		uintptr_t addr = guest_exception_stubs[i];
		struct idt_gate g;

		memset(&g, 0, sizeof(g));
		g.offset0 = addr & 0xffff;
		g.selector = cs;
		g.type_attr = GATE_INTERRUPT;
		g.offset1 = (addr >> 16) & 0xffff;
#ifdef __x86_64__
		g.offset2 = addr >> 32;
#endif
		guest_idt[i] = g;
	}
	idtr.limit = sizeof(guest_idt) - 1;
	idtr.base = (uintptr_t)guest_idt;
	__asm__ __volatile__("lidt %0" ::"m"(idtr) : "memory");
}

void guest_set_handler(int vector, guest_handler_t fn)
{
	if (vector < 0 || vector >= GUEST_NR_EXCEPTIONS)
		GUEST_FAIL("guest_set_handler: vector %d is outside 0..%d", vector, GUEST_NR_EXCEPTIONS - 1);
	WRITE_ONCE(guest_handlers[vector], fn);
	barrier();
}

static __noreturn void report_exception(struct ex_regs *regs, uintptr_t cr2)
{
	struct ucall uc;

	memset(&uc, 0, sizeof(uc));
	uc.cmd = UCALL_EXCEPTION;
	uc.nargs = 5;
	uc.args[0] = regs->vector;
	uc.args[1] = regs->error_code;
	uc.args[2] = regs->rip;
	uc.args[3] = cr2;
	uc.args[4] = regs->rsp;
	guest_snprintf(uc.buf, sizeof(uc.buf),
		       "unexpected exception: vector %u error_code %#lx rip %#lx cr2 %#lx rsp %#lx",
		       (unsigned)regs->vector, (unsigned long)regs->error_code,
		       (unsigned long)regs->rip, (unsigned long)cr2, (unsigned long)regs->rsp);
	for (;;)
		ucall_send(&uc);
}

/* Called by the stubs with the frame they built; returning resumes at regs->rip. */
void guest_exception_dispatch(struct ex_regs *regs);
void guest_exception_dispatch(struct ex_regs *regs)
{
	uintptr_t cr2 = read_cr2(); /* before anything else can fault */
	guest_handler_t fn = NULL;

	if (regs->vector < GUEST_NR_EXCEPTIONS)
		fn = READ_ONCE(guest_handlers[regs->vector]);
	if (fn) {
		fn(regs);
		return;
	}
	report_exception(regs, cr2);
}
