/*
 * mmio_matrix: one memory access of a chosen kind per command, for the 64-bit GPA / MMIO matrix
 * (cases/test_mmio64.py). arg = GVA of a struct mm_desc (below). Repeatedly: read the descriptor,
 * run its op, report with GUEST_SYNC, and go back to the descriptor, which the host may rewrite
 * while the vCPU is stopped at the SYNC. op 0 returns (DONE).
 *
 *   MM_LOAD      one `mov` of `width` bytes from gva; GUEST_ASSERT_EQ(loaded, expect); SYNC(loaded)
 *   MM_STORE     one `mov` of `width` bytes of `value` to gva; SYNC(0)
 *   MM_MOVS_FROM `rep movs` (element `width`, `count` elements) from gva to the RAM buffer `buf`;
 *                asserts rcx == 0, rsi/rdi advanced by count*width and buf == expect_buf;
 *                SYNC(first 8 bytes of buf)
 *   MM_MOVS_TO   `rep movs` from the RAM buffer `buf` to gva; asserts the registers; SYNC(0)
 *   MM_STOS      `rep stos` of `value` (element `width`, `count` elements) to gva; SYNC(0)
 *   MM_ADD       `add reg, (gva)` of `width` bytes with reg = value; SYNC(0)
 *   MM_XCHG      `xchg reg, (gva)` of `width` bytes with reg = value; GUEST_ASSERT_EQ(reg, expect)
 *                (the old memory value); SYNC(reg)
 *   MM_PF_LOAD / MM_PF_STORE  a 4-byte load / store at gva with a #PF handler installed that
 *                records the fault and resumes after the access; asserts exactly one #PF;
 *                SYNC(vector, error_code, cr2, faults)
 *   MM_POLL      load `width` bytes at gva until the value equals `expect` (a device poll loop:
 *                used to provoke the host's livelock report); SYNC(value)
 *
 * Width 8 (and rep movsq/stosq, 8-byte add/xchg) exists in the 64-bit build only: i386 has no
 * single 8-byte access without x87/MMX/SSE (guest.h); the 32-bit build fails with an assertion.
 * Direction flag: clear on entry (rflags = 0x2) and never set, so string ops go upwards.
 */
#include "guest.h"

enum {
	MM_DONE = 0,
	MM_LOAD = 1,
	MM_STORE = 2,
	MM_MOVS_FROM = 3,
	MM_MOVS_TO = 4,
	MM_STOS = 5,
	MM_ADD = 6,
	MM_XCHG = 7,
	MM_PF_LOAD = 8,
	MM_PF_STORE = 9,
	MM_POLL = 10,
};

struct mm_desc {
	uint64_t op;
	uint64_t gva;
	uint64_t width;
	uint64_t value;
	uint64_t expect;
	uint64_t count;
	uint64_t buf;
	uint64_t expect_buf;
};

/* ---- faulting probes with a fix-up (like the kernel's exception table) ------------------------ */
uint32_t mm_probe_load(uintptr_t addr);
void mm_probe_store(uintptr_t addr, uint32_t v);
extern char mm_probe_load_insn[], mm_probe_load_resume[], mm_probe_store_insn[], mm_probe_store_resume[];

#ifdef __x86_64__
__asm__(".text\n"
	".globl mm_probe_load, mm_probe_load_insn, mm_probe_load_resume\n"
	"mm_probe_load:\n"
	"	xor %eax, %eax\n"
	"mm_probe_load_insn:\n"
	"	movl (%rdi), %eax\n"
	"mm_probe_load_resume:\n"
	"	ret\n"
	".globl mm_probe_store, mm_probe_store_insn, mm_probe_store_resume\n"
	"mm_probe_store:\n"
	"mm_probe_store_insn:\n"
	"	movl %esi, (%rdi)\n"
	"mm_probe_store_resume:\n"
	"	ret\n");
#else
__asm__(".text\n"
	".globl mm_probe_load, mm_probe_load_insn, mm_probe_load_resume\n"
	"mm_probe_load:\n"
	"	movl 4(%esp), %ecx\n"
	"	xor %eax, %eax\n"
	"mm_probe_load_insn:\n"
	"	movl (%ecx), %eax\n"
	"mm_probe_load_resume:\n"
	"	ret\n"
	".globl mm_probe_store, mm_probe_store_insn, mm_probe_store_resume\n"
	"mm_probe_store:\n"
	"	movl 4(%esp), %ecx\n"
	"	movl 8(%esp), %eax\n"
	"mm_probe_store_insn:\n"
	"	movl %eax, (%ecx)\n"
	"mm_probe_store_resume:\n"
	"	ret\n");
#endif

static volatile uint64_t pf_count, pf_vector, pf_error, pf_cr2;

static void pf_fixup(struct ex_regs *regs)
{
	pf_count++;
	pf_vector = regs->vector;
	pf_error = regs->error_code;
	pf_cr2 = read_cr2();
	if (regs->rip == (uintptr_t)mm_probe_load_insn)
		regs->rip = (uintptr_t)mm_probe_load_resume;
	else if (regs->rip == (uintptr_t)mm_probe_store_insn)
		regs->rip = (uintptr_t)mm_probe_store_resume;
	else
		GUEST_FAIL("#PF at rip %#llx outside the probes (cr2 %#llx, error %#llx)",
			   (unsigned long long)regs->rip, (unsigned long long)pf_cr2,
			   (unsigned long long)regs->error_code);
}

/* ---- exact-width accesses ------------------------------------------------------------------- */
static uint64_t load(uintptr_t gva, uint64_t width)
{
	switch (width) {
	case 1:
		return mmio_read8(gva);
	case 2:
		return mmio_read16(gva);
	case 4:
		return mmio_read32(gva);
#if MMIO_HAVE_64
	case 8:
		return mmio_read64(gva);
#endif
	}
	GUEST_FAIL("mmio_matrix: no %" PRIu64 "-byte load in this build", width);
}

static void store(uintptr_t gva, uint64_t width, uint64_t v)
{
	switch (width) {
	case 1:
		mmio_write8(gva, (uint8_t)v);
		return;
	case 2:
		mmio_write16(gva, (uint16_t)v);
		return;
	case 4:
		mmio_write32(gva, (uint32_t)v);
		return;
#if MMIO_HAVE_64
	case 8:
		mmio_write64(gva, v);
		return;
#endif
	}
	GUEST_FAIL("mmio_matrix: no %" PRIu64 "-byte store in this build", width);
}

/* rep movs of `n` elements of `width` bytes; checks that rcx/rsi/rdi end where they must */
static void rep_movs(uintptr_t dst, uintptr_t src, uintptr_t n, uint64_t width)
{
	uintptr_t d = dst, s = src, c = n;

	switch (width) {
	case 1:
		__asm__ __volatile__("rep movsb" : "+D"(d), "+S"(s), "+c"(c) : : "memory");
		break;
	case 2:
		__asm__ __volatile__("rep movsw" : "+D"(d), "+S"(s), "+c"(c) : : "memory");
		break;
	case 4:
		__asm__ __volatile__("rep movsl" : "+D"(d), "+S"(s), "+c"(c) : : "memory");
		break;
#if MMIO_HAVE_64
	case 8:
		__asm__ __volatile__("rep movsq" : "+D"(d), "+S"(s), "+c"(c) : : "memory");
		break;
#endif
	default:
		GUEST_FAIL("mmio_matrix: no rep movs of %" PRIu64 "-byte elements in this build", width);
	}
	/* addresses wrap at the guest's pointer width, as the CPU's rsi/rdi (esi/edi) do */
	GUEST_ASSERT_EQ(c, 0);
	GUEST_ASSERT_EQ(s, (uintptr_t)(src + n * width));
	GUEST_ASSERT_EQ(d, (uintptr_t)(dst + n * width));
}

static void rep_stos(uintptr_t dst, uint64_t v, uintptr_t n, uint64_t width)
{
	uintptr_t d = dst, c = n;

	switch (width) {
	case 1:
		__asm__ __volatile__("rep stosb" : "+D"(d), "+c"(c) : "a"((uint8_t)v) : "memory");
		break;
	case 2:
		__asm__ __volatile__("rep stosw" : "+D"(d), "+c"(c) : "a"((uint16_t)v) : "memory");
		break;
	case 4:
		__asm__ __volatile__("rep stosl" : "+D"(d), "+c"(c) : "a"((uint32_t)v) : "memory");
		break;
#if MMIO_HAVE_64
	case 8:
		__asm__ __volatile__("rep stosq" : "+D"(d), "+c"(c) : "a"(v) : "memory");
		break;
#endif
	default:
		GUEST_FAIL("mmio_matrix: no rep stos of %" PRIu64 "-byte elements in this build", width);
	}
	GUEST_ASSERT_EQ(c, 0);
	GUEST_ASSERT_EQ(d, (uintptr_t)(dst + n * width));
}

/* add reg, (gva): KVM must read the old value, then write old + reg */
static void rmw_add(uintptr_t gva, uint64_t width, uint64_t v)
{
	switch (width) {
	case 1:
		__asm__ __volatile__("addb %0, (%1)" : : "q"((uint8_t)v), "r"(gva) : "memory", "cc");
		return;
	case 2:
		__asm__ __volatile__("addw %0, (%1)" : : "r"((uint16_t)v), "r"(gva) : "memory", "cc");
		return;
	case 4:
		__asm__ __volatile__("addl %0, (%1)" : : "r"((uint32_t)v), "r"(gva) : "memory", "cc");
		return;
#if MMIO_HAVE_64
	case 8:
		__asm__ __volatile__("addq %0, (%1)" : : "r"(v), "r"(gva) : "memory", "cc");
		return;
#endif
	}
	GUEST_FAIL("mmio_matrix: no %" PRIu64 "-byte add in this build", width);
}

/* xchg reg, (gva): returns the old memory value, which lands in the register */
static uint64_t rmw_xchg(uintptr_t gva, uint64_t width, uint64_t v)
{
	switch (width) {
	case 1: {
		uint8_t r = (uint8_t)v;
		__asm__ __volatile__("xchgb %0, (%1)" : "+q"(r) : "r"(gva) : "memory");
		return r;
	}
	case 2: {
		uint16_t r = (uint16_t)v;
		__asm__ __volatile__("xchgw %0, (%1)" : "+r"(r) : "r"(gva) : "memory");
		return r;
	}
	case 4: {
		uint32_t r = (uint32_t)v;
		__asm__ __volatile__("xchgl %0, (%1)" : "+r"(r) : "r"(gva) : "memory");
		return r;
	}
#if MMIO_HAVE_64
	case 8: {
		uint64_t r = v;
		__asm__ __volatile__("xchgq %0, (%1)" : "+r"(r) : "r"(gva) : "memory");
		return r;
	}
#endif
	}
	GUEST_FAIL("mmio_matrix: no %" PRIu64 "-byte xchg in this build", width);
}

static uintptr_t to_ptr(uint64_t v, const char *what)
{
	if ((uint64_t)(uintptr_t)v != v)
		GUEST_FAIL("mmio_matrix: %s %#" PRIx64 " does not fit this guest's addresses", what, v);
	return (uintptr_t)v;
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct mm_desc *d = (volatile struct mm_desc *)arg;

	(void)vcpu_id;
	for (;;) {
		uint64_t op = d->op, width = d->width, value = d->value, expect = d->expect;
		uintptr_t gva = to_ptr(d->gva, "gva");
		uintptr_t count = to_ptr(d->count, "count");
		uint64_t v;

		switch (op) {
		case MM_DONE:
			return;
		case MM_LOAD:
			v = load(gva, width);
			GUEST_ASSERT_EQ(v, expect);
			GUEST_SYNC(v);
			break;
		case MM_STORE:
			store(gva, width, value);
			GUEST_SYNC(0);
			break;
		case MM_MOVS_FROM: {
			uintptr_t buf = to_ptr(d->buf, "buf");
			uintptr_t want = to_ptr(d->expect_buf, "expect_buf");
			uint64_t first = 0;

			rep_movs(buf, gva, count, width);
			GUEST_ASSERT_EQ(memcmp((const void *)buf, (const void *)want, count * width), 0);
			memcpy(&first, (const void *)buf, count * width < 8 ? count * width : 8);
			GUEST_SYNC(first);
			break;
		}
		case MM_MOVS_TO:
			rep_movs(gva, to_ptr(d->buf, "buf"), count, width);
			GUEST_SYNC(0);
			break;
		case MM_STOS:
			rep_stos(gva, value, count, width);
			GUEST_SYNC(0);
			break;
		case MM_ADD:
			rmw_add(gva, width, value);
			GUEST_SYNC(0);
			break;
		case MM_XCHG:
			v = rmw_xchg(gva, width, value);
			GUEST_ASSERT_EQ(v, expect);
			GUEST_SYNC(v);
			break;
		case MM_PF_LOAD:
		case MM_PF_STORE:
			pf_count = pf_vector = pf_error = pf_cr2 = 0;
			guest_set_handler(PF_VECTOR, pf_fixup);
			if (op == MM_PF_LOAD)
				(void)mm_probe_load(gva);
			else
				mm_probe_store(gva, (uint32_t)value);
			guest_set_handler(PF_VECTOR, NULL);
			GUEST_ASSERT_EQ(pf_count, 1);
			GUEST_SYNC(pf_vector, pf_error, pf_cr2, pf_count);
			break;
		case MM_POLL:
			do
				v = load(gva, width);
			while (v != expect);
			GUEST_SYNC(v);
			break;
		default:
			GUEST_FAIL("mmio_matrix: unknown op %" PRIu64, op);
		}
	}
}
