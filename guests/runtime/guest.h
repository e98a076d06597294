/*
 * guest.h - the freestanding guest runtime of kvm-harness (x86_64 and i386).
 *
 * The contract with the host is guests/ABI.md. This header is also included from assembly
 * (start*.S, stubs*.S, real-mode payloads): only the constants at the top are visible there.
 *
 * Built with -mgeneral-regs-only: no x87/MMX/SSE anywhere (this machine's KVM cannot run SSE in
 * guests), no libgcc (runtime/divdi3.c provides the i386 64-bit division helpers).
 */
#ifndef KVM_HARNESS_GUEST_H
#define KVM_HARNESS_GUEST_H

/* ---- ABI constants (C and assembly) ------------------------------------------------------- */
#define UCALL_PORT 0x1000

#define UCALL_SYNC 1
#define UCALL_ASSERT 2
#define UCALL_DONE 3
#define UCALL_PRINTF 4
#define UCALL_EXCEPTION 5

#define UCALL_MAX_ARGS 6
#define UCALL_FILE_SIZE 128
#define UCALL_BUF_SIZE 1024

/* struct ucall layout, for assembly (checked against the C struct below) */
#define UCALL_OFF_CMD 0
#define UCALL_OFF_NARGS 8
#define UCALL_OFF_ARGS 16
#define UCALL_OFF_LINE 64
#define UCALL_OFF_FILE 72
#define UCALL_OFF_BUF 200
#define UCALL_SIZE 1224

#define GUEST_LOAD_ADDR 0x200000 /* 32- and 64-bit payloads */
#define REAL_LOAD_ADDR 0x8000    /* real-mode payloads */

#define GUEST_NR_EXCEPTIONS 32 /* the runtime's IDT covers vectors 0..31 */

#define DE_VECTOR 0
#define DB_VECTOR 1
#define NMI_VECTOR 2
#define BP_VECTOR 3
#define OF_VECTOR 4
#define BR_VECTOR 5
#define UD_VECTOR 6
#define NM_VECTOR 7
#define DF_VECTOR 8
#define TS_VECTOR 10
#define NP_VECTOR 11
#define SS_VECTOR 12
#define GP_VECTOR 13
#define PF_VECTOR 14
#define MF_VECTOR 16
#define AC_VECTOR 17
#define MC_VECTOR 18
#define XM_VECTOR 19
#define VE_VECTOR 20
#define CP_VECTOR 21

#ifndef __ASSEMBLER__

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__x86_64__) && !defined(__i386__)
#error "guest runtime: x86_64 or i386 only"
#endif

/* printf formats for the fixed-width types (no <inttypes.h> in a freestanding build) */
#ifdef __x86_64__
#define PRId64 "ld"
#define PRIu64 "lu"
#define PRIx64 "lx"
#define PRIX64 "lX"
#else
#define PRId64 "lld"
#define PRIu64 "llu"
#define PRIx64 "llx"
#define PRIX64 "llX"
#endif

#ifdef __FILE_NAME__
#define __GUEST_FILE __FILE_NAME__ /* basename: gcc >= 12 */
#else
#define __GUEST_FILE __FILE__
#endif

#define __noreturn __attribute__((noreturn))
#define __printf(a, b) __attribute__((format(printf, a, b)))
#define __unused __attribute__((unused))
#define barrier() __asm__ __volatile__("" ::: "memory")

/* ---- ucall ---------------------------------------------------------------------------------- */
struct ucall {
	uint64_t cmd;   /* UCALL_* */
	uint64_t nargs; /* valid entries in args */
	uint64_t args[UCALL_MAX_ARGS];
	uint64_t line;               /* __LINE__ of the call site */
	char file[UCALL_FILE_SIZE];  /* basename of __FILE__, NUL-terminated */
	char buf[UCALL_BUF_SIZE];    /* ASSERT: expression; PRINTF: formatted text; NUL-terminated */
};
_Static_assert(sizeof(struct ucall) == 1224, "struct ucall must be 1224 bytes (guests/ABI.md)");
_Static_assert(sizeof(struct ucall) == UCALL_SIZE, "UCALL_SIZE");
_Static_assert(offsetof(struct ucall, nargs) == UCALL_OFF_NARGS, "ucall.nargs");
_Static_assert(offsetof(struct ucall, args) == UCALL_OFF_ARGS, "ucall.args");
_Static_assert(offsetof(struct ucall, line) == UCALL_OFF_LINE, "ucall.line");
_Static_assert(offsetof(struct ucall, file) == UCALL_OFF_FILE, "ucall.file");
_Static_assert(offsetof(struct ucall, buf) == UCALL_OFF_BUF, "ucall.buf");

/* Announce a filled struct to the host: `out %eax, %dx`, eax = its address, dx = UCALL_PORT. */
void ucall_send(struct ucall *uc);
/* Fill a struct ucall on this vCPU's stack (several vCPUs may ucall at once) and send it.
 * The variadic arguments are `nargs` uint64_t values. */
void ucall(uint64_t cmd, const char *file, uint64_t line, int nargs, ...);
/* cmd ASSERT with buf = expr; never returns (re-sends the ucall if the host resumes). */
__noreturn void ucall_assert(const char *file, uint64_t line, const char *expr, int nargs, ...);
/* cmd ASSERT with a formatted message; never returns. */
__noreturn __printf(3, 4) void ucall_fail(const char *file, uint64_t line, const char *fmt, ...);
/* cmd PRINTF with buf = formatted text (truncated to 1023 characters). */
__printf(3, 4) void ucall_printf(const char *file, uint64_t line, const char *fmt, ...);
/* cmd DONE; never returns (re-sends DONE if the host resumes). */
__noreturn void ucall_done(const char *file, uint64_t line);

/* Each GUEST_* argument becomes a uint64_t: integers are converted (signed ones sign-extend),
 * pointers zero-extend (i386 too). */
#define __UC_ARG(a) \
	((uint64_t)__builtin_choose_expr(__builtin_classify_type(a) == 5, (uintptr_t)(a), (a)))

#define __UC_NARGS(...) __UC_NARGS_(_, ##__VA_ARGS__, 6, 5, 4, 3, 2, 1, 0)
#define __UC_NARGS_(_, a1, a2, a3, a4, a5, a6, N, ...) N
#define __UC_CAT(a, b) __UC_CAT_(a, b)
#define __UC_CAT_(a, b) a##b
/* ", arg1, arg2, ..." each converted; empty for no arguments */
#define __UC_ARGS_0()
#define __UC_ARGS_1(a) , __UC_ARG(a)
#define __UC_ARGS_2(a, b) , __UC_ARG(a), __UC_ARG(b)
#define __UC_ARGS_3(a, b, c) , __UC_ARG(a), __UC_ARG(b), __UC_ARG(c)
#define __UC_ARGS_4(a, b, c, d) , __UC_ARG(a), __UC_ARG(b), __UC_ARG(c), __UC_ARG(d)
#define __UC_ARGS_5(a, b, c, d, e) \
	, __UC_ARG(a), __UC_ARG(b), __UC_ARG(c), __UC_ARG(d), __UC_ARG(e)
#define __UC_ARGS_6(a, b, c, d, e, f) \
	, __UC_ARG(a), __UC_ARG(b), __UC_ARG(c), __UC_ARG(d), __UC_ARG(e), __UC_ARG(f)

/* GUEST_SYNC(a, ...): 0..6 values to the host, which resumes the vCPU when it is done. */
#define GUEST_SYNC(...)                                                               \
	ucall(UCALL_SYNC, __GUEST_FILE, __LINE__, __UC_NARGS(__VA_ARGS__)             \
	      __UC_CAT(__UC_ARGS_, __UC_NARGS(__VA_ARGS__))(__VA_ARGS__))

#define GUEST_DONE() ucall_done(__GUEST_FILE, __LINE__)

#define GUEST_PRINTF(fmt, ...) ucall_printf(__GUEST_FILE, __LINE__, fmt, ##__VA_ARGS__)

/* GUEST_FAIL(fmt, ...): an assertion failure with a formatted message (nargs 0). */
#define GUEST_FAIL(fmt, ...) ucall_fail(__GUEST_FILE, __LINE__, fmt, ##__VA_ARGS__)

#define GUEST_ASSERT(cond)                                                    \
	do {                                                                  \
		if (__builtin_expect(!(cond), 0))                             \
			ucall_assert(__GUEST_FILE, __LINE__, #cond, 0);       \
	} while (0)

/* a and b are evaluated once, converted to their common type (as `a op b` would be), compared;
 * on failure args = {a, b}, buf = "a op b". */
#define __GUEST_ASSERT_CMP(a, b, op)                                                      \
	do {                                                                              \
		__typeof__(1 ? (a) : (b)) __ga = (a), __gb = (b);                         \
		if (__builtin_expect(!(__ga op __gb), 0))                                 \
			ucall_assert(__GUEST_FILE, __LINE__, #a " " #op " " #b, 2,        \
				     __UC_ARG(__ga), __UC_ARG(__gb));                     \
	} while (0)

#define GUEST_ASSERT_EQ(a, b) __GUEST_ASSERT_CMP(a, b, ==)
#define GUEST_ASSERT_NE(a, b) __GUEST_ASSERT_CMP(a, b, !=)
#define GUEST_ASSERT_LT(a, b) __GUEST_ASSERT_CMP(a, b, <)
#define GUEST_ASSERT_LE(a, b) __GUEST_ASSERT_CMP(a, b, <=)
#define GUEST_ASSERT_GT(a, b) __GUEST_ASSERT_CMP(a, b, >)
#define GUEST_ASSERT_GE(a, b) __GUEST_ASSERT_CMP(a, b, >=)

/* ---- entry ---------------------------------------------------------------------------------- */
/* Defined by each payload. 64-bit: (rdi, rsi) as set by the host; 32-bit: (edi, esi) passed on
 * the stack (cdecl). uintptr_t is 64 bits wide on x86_64 and 32 bits on i386. Returning from it
 * sends DONE. */
void guest_main(uintptr_t vcpu_id, uintptr_t arg);

/* ---- exceptions ----------------------------------------------------------------------------- */
#ifdef __x86_64__
/* The stub's frame, as laid out on the stack (runtime/stubs64.S). A handler may change any field
 * but vector/error_code/cs/ss; rip, rsp and rflags take effect through iretq. */
struct ex_regs {
	uint64_t rax, rcx, rdx, rbx, rbp, rsi, rdi;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
	uint64_t vector, error_code;
	uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};
_Static_assert(sizeof(struct ex_regs) == 22 * 8, "struct ex_regs (x86_64)");
#else
/* i386 (runtime/stubs32.S). Each register has its e-name and, for code shared with x86_64, its
 * r-name (both 32 bits). The CPU pushes no esp/ss for an exception at the same privilege level:
 * esp (the value at the fault) and ss are informational, changing them has no effect. eip, eflags
 * and the GPRs take effect through iret. */
#define __EX_REG(e, r) union { uint32_t e; uint32_t r; }
struct ex_regs {
	__EX_REG(eax, rax);
	__EX_REG(ecx, rcx);
	__EX_REG(edx, rdx);
	__EX_REG(ebx, rbx);
	__EX_REG(ebp, rbp);
	__EX_REG(esi, rsi);
	__EX_REG(edi, rdi);
	__EX_REG(esp, rsp); /* read-only */
	uint32_t ss;        /* read-only */
	uint32_t vector, error_code;
	__EX_REG(eip, rip); /* pushed by the CPU */
	uint32_t cs;
	__EX_REG(eflags, rflags);
};
#undef __EX_REG
_Static_assert(sizeof(struct ex_regs) == 14 * 4, "struct ex_regs (i386)");
#endif

typedef void (*guest_handler_t)(struct ex_regs *regs);

/* Install (fn) or remove (NULL) the handler of one of the vectors 0..31, for all vCPUs. Without a
 * handler an exception is reported as a cmd 5 ucall {vector, error_code, rip, cr2, rsp} and the
 * vCPU stays there. A handler returns to regs->rip (e.g. `regs->rip += 2` skips a ud2). */
void guest_set_handler(int vector, guest_handler_t fn);
/* Called by _start on each vCPU: fills the IDT (vectors 0..31 on the current %cs) and lidt's it. */
void guest_idt_init(void);

/* ---- CPU helpers ------------------------------------------------------------------------------ */
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }
static inline void hlt(void) { __asm__ __volatile__("hlt" ::: "memory"); }

static inline uintptr_t read_cr0(void)
{
	uintptr_t v;
	__asm__ __volatile__("mov %%cr0, %0" : "=r"(v));
	return v;
}
static inline uintptr_t read_cr2(void)
{
	uintptr_t v;
	__asm__ __volatile__("mov %%cr2, %0" : "=r"(v));
	return v;
}
static inline uintptr_t read_cr3(void)
{
	uintptr_t v;
	__asm__ __volatile__("mov %%cr3, %0" : "=r"(v));
	return v;
}
static inline uintptr_t read_cr4(void)
{
	uintptr_t v;
	__asm__ __volatile__("mov %%cr4, %0" : "=r"(v));
	return v;
}
static inline void write_cr3(uintptr_t v) { __asm__ __volatile__("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void invlpg(uintptr_t gva) { __asm__ __volatile__("invlpg (%0)" ::"r"(gva) : "memory"); }
static inline uint16_t read_cs(void)
{
	uint16_t v;
	__asm__ __volatile__("mov %%cs, %0" : "=r"(v));
	return v;
}

static inline void outb(uint16_t port, uint8_t v) { __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ __volatile__("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ __volatile__("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
	return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ __volatile__("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* One volatile access of x's own width (uint8/16/32/64 lvalues). On i386 a 64-bit READ_ONCE is two
 * 4-byte loads (not atomic); use the mmio_* helpers where the access width matters. */
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- exact-width memory accesses (MMIO) ------------------------------------------------------
 * Each helper is exactly one `mov` of that width at that address (register-indirect), so the
 * host sees one access of that size. */
static inline uint8_t mmio_read8(uintptr_t a)
{
	uint8_t v;
	__asm__ __volatile__("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
	return v;
}
static inline uint16_t mmio_read16(uintptr_t a)
{
	uint16_t v;
	__asm__ __volatile__("movw (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline uint32_t mmio_read32(uintptr_t a)
{
	uint32_t v;
	__asm__ __volatile__("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline void mmio_write8(uintptr_t a, uint8_t v) { __asm__ __volatile__("movb %0, (%1)" ::"q"(v), "r"(a) : "memory"); }
static inline void mmio_write16(uintptr_t a, uint16_t v) { __asm__ __volatile__("movw %0, (%1)" ::"r"(v), "r"(a) : "memory"); }
static inline void mmio_write32(uintptr_t a, uint32_t v) { __asm__ __volatile__("movl %0, (%1)" ::"r"(v), "r"(a) : "memory"); }

#ifdef __x86_64__
#define MMIO_HAVE_64 1
static inline uint64_t mmio_read64(uintptr_t a)
{
	uint64_t v;
	__asm__ __volatile__("movq (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline void mmio_write64(uintptr_t a, uint64_t v) { __asm__ __volatile__("movq %0, (%1)" ::"r"(v), "r"(a) : "memory"); }
#else
/*
 * i386 has no single 8-byte access without x87/MMX/SSE (all forbidden here: -mgeneral-regs-only,
 * and this machine's KVM fails SSE in guests). cmpxchg8b is not a substitute: it is a locked
 * read-modify-write, which KVM's emulator turns into an 8-byte MMIO read *followed by an 8-byte
 * MMIO write*. So there is no mmio_read64/mmio_write64 on i386: a call that survives optimisation
 * is a compile error. Test for MMIO_HAVE_64, or make two explicit 4-byte accesses.
 */
#define MMIO_HAVE_64 0
uint64_t mmio_read64(uintptr_t a)
	__attribute__((error("mmio_read64: no single 8-byte access on i386 (see guest.h); use two mmio_read32")));
void mmio_write64(uintptr_t a, uint64_t v)
	__attribute__((error("mmio_write64: no single 8-byte access on i386 (see guest.h); use two mmio_write32")));
#endif

/* An 8-byte word of test memory: one 8-byte mov on x86_64 (so an MMIO exit has len 8), two 4-byte
 * movs on i386 (low half first). */
static inline uint64_t load64(uintptr_t a)
{
#if MMIO_HAVE_64
	return mmio_read64(a);
#else
	return (uint64_t)mmio_read32(a) | ((uint64_t)mmio_read32(a + 4) << 32);
#endif
}

static inline void store64(uintptr_t a, uint64_t v)
{
#if MMIO_HAVE_64
	mmio_write64(a, v);
#else
	mmio_write32(a, (uint32_t)v);
	mmio_write32(a + 4, (uint32_t)(v >> 32));
#endif
}

/* ---- strings and formatting ------------------------------------------------------------------ */
/* The symbols gcc may call on its own (a freestanding program must provide them). */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

static inline void *guest_memcpy(void *dst, const void *src, size_t n) { return memcpy(dst, src, n); }
static inline void *guest_memmove(void *dst, const void *src, size_t n) { return memmove(dst, src, n); }
static inline void *guest_memset(void *dst, int c, size_t n) { return memset(dst, c, n); }
static inline int guest_memcmp(const void *a, const void *b, size_t n) { return memcmp(a, b, n); }
size_t guest_strlen(const char *s);
size_t guest_strnlen(const char *s, size_t max);
int guest_strcmp(const char *a, const char *b);

/* printf subset: %d %i %u %x %X %o %s %c %p %%; flags - 0 + space #; width and precision (also
 * `*`); lengths hh h l ll z j t (64-bit values work on i386 too). Returns the length the output
 * would have had; always NUL-terminates when size > 0. */
int guest_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
__printf(3, 4) int guest_snprintf(char *buf, size_t size, const char *fmt, ...);

#endif /* !__ASSEMBLER__ */
#endif /* KVM_HARNESS_GUEST_H */
