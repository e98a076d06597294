/*
 * pvpages: the guest side of cases/test_pv_pages.py - the KVM PV MSRs whose areas KVM writes through a
 * gfn_to_hva_cache (steal time, PV EOI, async PF) and the in-kernel LAPIC's vAPIC word
 * (KVM_SET_VAPIC_ADDR). arg = GVA of struct pv_desc. 64-bit only (the i386 build just fails).
 *
 * Repeatedly read the descriptor and run one command, then GUEST_SYNC its result; the host may
 * change the descriptor and guest memory while the vCPU is stopped there.
 *
 *   cmd 0  return (DONE)
 *   cmd 1  wrmsr(a, b), a #GP (KVM refused the value) caught      -> SYNC(1, gp, rdmsr(a) or 0)
 *   cmd 2  read the kvm_steal_time at gva (version protocol, <= 1000 tries)
 *          -> SYNC(version, steal, flags, preempted, tries)
 *   cmd 3  steal-time churn: until `count` iterations or *stop: wrmsr(a, b) (MSR_KVM_STEAL_TIME;
 *          upstream each write asks for a steal-time update on the next entry), then an exit to
 *          the host (outb to KICK_PORT, which it answers by entering again: every KVM_RUN's
 *          vcpu_load asks for an update, on every KVM), then read the struct once (2 tries);
 *          `done` = iterations so far.
 *          A read the host's page swap may have cut into (`seq` odd, or changed, around it) is
 *          not judged: the swap can leave a half-written struct in a unit it maps back later.
 *          -> SYNC(iterations, odd versions, torn reads, max version, preempted != 0 seen,
 *                  reads not judged)
 *   cmd 4  x2APIC on: IA32_APIC_BASE |= EN | EXTD, SVR = 0x1ff (software enable, spurious vector
 *          0xff), an IDT with gates for the vectors 0x20..0xff (this payload's stubs)
 *          -> SYNC(4, gp, IA32_APIC_BASE, SVR)
 *   cmd 5  one interrupt round: read the u64 at gva once (so the handler's read does not fault),
 *          sti, the trigger a (0: x2APIC self-IPI of `vector`; 1: wrmsr MSR_KVM_ASYNC_PF_ACK = 1,
 *          KVM delivers what its async-PF queue holds), spin until the handler ran (<= 1e6
 *          pauses), cli; then read the u64 at gva again and the vector's x2APIC ISR/IRR bits
 *          (rdmsr: an exit, so KVM has synced its PV EOI state first)
 *          -> SYNC(interrupts taken, u64 at gva in the handler, u64 at gva after, ISR bit,
 *                  IRR bit, last vector)
 *          The handler reads the u64 at gva first; then, mode bit 0 (PV EOI): test-and-clear bit
 *          0 of the u32 at gva in one instruction, and no APIC EOI write when it was set;
 *          otherwise (or when it was clear) an x2APIC EOI write. It leaves the rest as it is
 *          (an async-PF token stays in place for the host to see).
 *   cmd 6  read the u32 and u64 at gva                               -> SYNC(u32, u64)
 */
#include "guest.h"

struct pv_desc {
	uint64_t cmd;
	uint64_t a;      /* MSR index / trigger */
	uint64_t b;      /* MSR value */
	uint64_t gva;    /* where the guest reads the struct */
	uint64_t vector; /* cmd 5: the vector to self-IPI */
	uint64_t mode;   /* cmd 5: what the handler does */
	uint64_t stop;   /* cmd 3: host sets it to end the churn */
	uint64_t done;   /* cmd 3: iterations so far (the guest updates it) */
	uint64_t count;  /* cmd 3: iterations (0: until *stop) */
	uint64_t seq;    /* cmd 3: the host's swap sequence count (odd while it replaces the page) */
};

#ifdef __x86_64__

#define MSR_IA32_APICBASE 0x1b
#define APICBASE_EXTD (1ULL << 10)
#define APICBASE_EN (1ULL << 11)
#define X2APIC_EOI 0x80b
#define X2APIC_SVR 0x80f
#define X2APIC_ISR0 0x810
#define X2APIC_IRR0 0x820
#define X2APIC_SELF_IPI 0x83f
#define MSR_KVM_ASYNC_PF_ACK 0x4b564d07
#define SPURIOUS_VECTOR 0xff
#define KICK_PORT 0x1001 /* cmd 3: the host re-enters at once (cases/test_pv_pages.py) */

struct steal_time {
	uint64_t steal;
	uint32_t version;
	uint32_t flags;
	uint8_t preempted;
	uint8_t u8_pad[3];
	uint32_t pad[11];
};
_Static_assert(sizeof(struct steal_time) == 64, "struct kvm_steal_time is 64 bytes");

struct gate {
	uint16_t offset0;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset1;
	uint32_t offset2;
	uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct gate) == 16, "long-mode gate");

static struct gate idt[256] __attribute__((aligned(64)));
static volatile struct pv_desc *desc;
static volatile uint64_t irq_count, irq_seen, irq_vector;
static volatile int gp_caught;

/* ---- interrupt entry: one stub per vector 0x20..0xff, saving the caller-saved registers ------ */
void pv_irq(uint64_t vector);
__asm__(
	"	.text\n"
	"	.p2align 4\n"
	"pv_irq_common:\n" /* stack: vector, rip, cs, rflags, rsp, ss */
	"	push %rax\n push %rcx\n push %rdx\n push %rsi\n push %rdi\n"
	"	push %r8\n push %r9\n push %r10\n push %r11\n"
	"	mov 72(%rsp), %rdi\n"
	"	sub $8, %rsp\n" /* 6 + 9 words: align the call to 16 bytes */
	"	cld\n"
	"	call pv_irq\n"
	"	add $8, %rsp\n"
	"	pop %r11\n pop %r10\n pop %r9\n pop %r8\n"
	"	pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n pop %rax\n"
	"	add $8, %rsp\n"
	"	iretq\n"
	"	.altmacro\n"
	"	.macro PV_STUB v\n"
	"	.p2align 4\n"
	"	.byte 0x68\n .long \\v\n" /* push $imm32, the same length for every vector */
	"	jmp pv_irq_common\n"
	"	.endm\n"
	"	.p2align 4\n"
	"	.globl pv_irq_stubs\n"
	"pv_irq_stubs:\n"
	"	.set v, 0x20\n"
	"	.rept 0xe0\n"
	"	PV_STUB %v\n"
	"	.set v, v + 1\n"
	"	.endr\n"
	"	.noaltmacro\n");
extern const char pv_irq_stubs[];
#define PV_STUB_SIZE 16 /* push imm32 (5) + jmp (<= 5), 16-byte aligned; checked in idt_init */

static uintptr_t stub_addr(int v)
{
	return (uintptr_t)pv_irq_stubs + (uintptr_t)(v - 0x20) * PV_STUB_SIZE;
}

void pv_irq(uint64_t vector)
{
	volatile uint32_t *w = (volatile uint32_t *)(uintptr_t)desc->gva;
	uint64_t mode = desc->mode;
	uint8_t was_set = 0;

	irq_vector = vector;
	if (vector == SPURIOUS_VECTOR)
		return; /* no EOI for the spurious vector */
	irq_seen = *(volatile uint64_t *)w;
	if (mode & 1) {
		/* PV EOI: test and clear bit 0 in one instruction (msr.rst) */
		__asm__ __volatile__("btrl $0, %0\n\tsetc %1" : "+m"(*w), "=q"(was_set) : : "memory", "cc");
	}
	if (!was_set)
		wrmsr(X2APIC_EOI, 0);
	irq_count = irq_count + 1;
}

static void skip_gp(struct ex_regs *regs)
{
	gp_caught = 1;
	regs->rip += 2; /* wrmsr / rdmsr are 0f 30 / 0f 32 */
}

static int wrmsr_safe(uint32_t msr, uint64_t v)
{
	gp_caught = 0;
	guest_set_handler(GP_VECTOR, skip_gp);
	wrmsr(msr, v);
	guest_set_handler(GP_VECTOR, NULL);
	return gp_caught;
}

static uint64_t rdmsr_safe(uint32_t msr, int *gp)
{
	uint64_t v;

	gp_caught = 0;
	guest_set_handler(GP_VECTOR, skip_gp);
	v = rdmsr(msr);
	guest_set_handler(GP_VECTOR, NULL);
	*gp = gp_caught;
	return gp_caught ? 0 : v;
}

static void idt_init(void)
{
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) r;
	uint16_t cs = read_cs();
	int v;

	/* the stubs must be PV_STUB_SIZE apart */
	GUEST_ASSERT_EQ(*(const uint8_t *)stub_addr(0x21), 0x68); /* push imm32 */
	GUEST_ASSERT_EQ(*(const uint32_t *)(stub_addr(0x21) + 1), 0x21);
	__asm__ __volatile__("sidt %0" : "=m"(r));
	memcpy(idt, (const void *)(uintptr_t)r.base, r.limit + 1); /* the runtime's vectors 0..31 */
	for (v = 0x20; v < 256; v++) {
		uintptr_t a = stub_addr(v);
		struct gate g;

		memset(&g, 0, sizeof(g));
		g.offset0 = a & 0xffff;
		g.selector = cs;
		g.type_attr = 0x8e; /* present, DPL 0, interrupt gate */
		g.offset1 = (a >> 16) & 0xffff;
		g.offset2 = a >> 32;
		idt[v] = g;
	}
	r.limit = sizeof(idt) - 1;
	r.base = (uintptr_t)idt;
	__asm__ __volatile__("lidt %0" ::"m"(r) : "memory");
}

/* One consistent snapshot of the steal-time struct: version even and equal before and after.
 * Returns the tries it took (1 = first read), or 0 when none came within `max` tries. */
static uint32_t read_st(volatile struct steal_time *p, struct steal_time *out, uint32_t max)
{
	uint32_t t;

	for (t = 1; t <= max; t++) {
		uint32_t v1 = p->version, v2;

		barrier();
		out->steal = p->steal;
		out->flags = p->flags;
		out->preempted = p->preempted;
		barrier();
		v2 = p->version;
		out->version = v1;
		if (v1 == v2 && !(v1 & 1))
			return t;
		cpu_relax();
	}
	return 0;
}

static void irq_round(void)
{
	volatile uint32_t *w = (volatile uint32_t *)(uintptr_t)desc->gva;
	uint32_t vec = (uint32_t)desc->vector;
	uint64_t before = irq_count, isr, irr;
	uint32_t spins;
	int gp = 0;

	irq_seen = 0xdeadbeef;
	irq_vector = 0;
	/* touch the area first: a fault on the handler's read would be an exit between the injection and
	 * the read, and at every exit KVM takes a PV EOI byte the guest left set back to 0 */
	(void)*(volatile uint64_t *)w;
	__asm__ __volatile__("sti" ::: "memory");
	if (desc->a == 0)
		wrmsr(X2APIC_SELF_IPI, vec);
	else
		wrmsr(MSR_KVM_ASYNC_PF_ACK, 1);
	for (spins = 0; spins < 1000000 && irq_count == before; spins++)
		cpu_relax();
	__asm__ __volatile__("cli" ::: "memory");
	isr = rdmsr_safe(X2APIC_ISR0 + vec / 32, &gp);
	irr = rdmsr_safe(X2APIC_IRR0 + vec / 32, &gp);
	GUEST_SYNC(irq_count - before, irq_seen, *(volatile uint64_t *)w, (isr >> (vec % 32)) & 1, (irr >> (vec % 32)) & 1,
		   irq_vector);
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	desc = (volatile struct pv_desc *)arg;
	for (;;) {
		uint64_t cmd = desc->cmd;
		struct steal_time st;

		/* the host may have edited the page tables while we were stopped */
		write_cr3(read_cr3());
		switch (cmd) {
		case 0:
			return;
		case 1: {
			int gp = wrmsr_safe((uint32_t)desc->a, desc->b), gp2 = 0;
			uint64_t now = gp ? 0 : rdmsr_safe((uint32_t)desc->a, &gp2);

			GUEST_SYNC(1, gp, now);
			break;
		}
		case 2: {
			uint32_t tries = read_st((volatile struct steal_time *)(uintptr_t)desc->gva, &st, 1000);

			GUEST_SYNC(st.version, st.steal, st.flags, st.preempted, tries);
			break;
		}
		case 3: {
			volatile struct steal_time *p = (volatile struct steal_time *)(uintptr_t)desc->gva;
			uint32_t msr = (uint32_t)desc->a;
			uint64_t val = desc->b, n = desc->count, i, odd = 0, torn = 0, maxv = 0, pre = 0;
			uint64_t skipped = 0;

			for (i = 0; n == 0 || i < n; i++) {
				uint64_t s1, s2;
				uint32_t tries;

				if (desc->stop)
					break;
				s1 = desc->seq;
				barrier();
				wrmsr(msr, val);
				outb(KICK_PORT, 0);
				/* the update completed before this vCPU re-entered: one read must do */
				tries = read_st(p, &st, 2);
				barrier();
				s2 = desc->seq;
				if ((s1 & 1) || s1 != s2) {
					skipped++;
				} else {
					if (!tries) {
						if (st.version & 1)
							odd++;
						else
							torn++;
					}
					if (st.preempted)
						pre++;
				}
				if (st.version > maxv)
					maxv = st.version;
				desc->done = i + 1;
			}
			GUEST_SYNC(i, odd, torn, maxv, pre, skipped);
			break;
		}
		case 4: {
			int gp = 0;
			uint64_t base;

			idt_init();
			base = rdmsr_safe(MSR_IA32_APICBASE, &gp);
			if (!gp)
				gp = wrmsr_safe(MSR_IA32_APICBASE, base | APICBASE_EN | APICBASE_EXTD);
			if (!gp)
				gp = wrmsr_safe(X2APIC_SVR, 0x100 | SPURIOUS_VECTOR);
			GUEST_SYNC(4, gp, rdmsr_safe(MSR_IA32_APICBASE, &gp), gp ? 0 : rdmsr_safe(X2APIC_SVR, &gp));
			break;
		}
		case 5:
			irq_round();
			break;
		case 6: {
			volatile uint32_t *w = (volatile uint32_t *)(uintptr_t)desc->gva;

			GUEST_SYNC(*w, *(volatile uint64_t *)w);
			break;
		}
		default:
			GUEST_FAIL("pvpages: unknown cmd %" PRIu64, cmd);
		}
	}
}

#else /* i386 */

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	(void)vcpu_id;
	(void)arg;
	GUEST_FAIL("pvpages: 64-bit only (x2APIC interrupt stubs and 64-bit gates)");
}

#endif
