/* ucall: the guest -> host transport (guests/ABI.md). */
#include "guest.h"

void ucall_send(struct ucall *uc)
{
	/* The "memory" clobber orders the stores that filled *uc before the exit. The struct lives
	 * below 4 GiB (stack or image, identity-mapped), so its GVA fits eax and equals its GPA. */
	__asm__ __volatile__("outl %%eax, %%dx"
			     :
			     : "a"((uint32_t)(uintptr_t)uc), "d"((uint16_t)UCALL_PORT)
			     : "memory");
}

static void ucall_init(struct ucall *uc, uint64_t cmd, const char *file, uint64_t line)
{
	size_t i;

	memset(uc, 0, sizeof(*uc));
	uc->cmd = cmd;
	uc->line = line;
	for (i = 0; file && file[i] && i < sizeof(uc->file) - 1; i++)
		uc->file[i] = file[i];
}

static void ucall_args(struct ucall *uc, int nargs, va_list ap)
{
	int i;

	if (nargs < 0)
		nargs = 0;
	if (nargs > UCALL_MAX_ARGS)
		nargs = UCALL_MAX_ARGS;
	for (i = 0; i < nargs; i++)
		uc->args[i] = va_arg(ap, uint64_t);
	uc->nargs = nargs;
}

static void ucall_text(struct ucall *uc, const char *s)
{
	size_t i;

	for (i = 0; s && s[i] && i < sizeof(uc->buf) - 1; i++)
		uc->buf[i] = s[i];
}

void ucall(uint64_t cmd, const char *file, uint64_t line, int nargs, ...)
{
	struct ucall uc; /* one per call, on this vCPU's stack */
	va_list ap;

	ucall_init(&uc, cmd, file, line);
	va_start(ap, nargs);
	ucall_args(&uc, nargs, ap);
	va_end(ap);
	ucall_send(&uc);
}

void ucall_assert(const char *file, uint64_t line, const char *expr, int nargs, ...)
{
	struct ucall uc;
	va_list ap;

	ucall_init(&uc, UCALL_ASSERT, file, line);
	va_start(ap, nargs);
	ucall_args(&uc, nargs, ap);
	va_end(ap);
	ucall_text(&uc, expr);
	for (;;)
		ucall_send(&uc);
}

void ucall_fail(const char *file, uint64_t line, const char *fmt, ...)
{
	struct ucall uc;
	va_list ap;

	ucall_init(&uc, UCALL_ASSERT, file, line);
	va_start(ap, fmt);
	guest_vsnprintf(uc.buf, sizeof(uc.buf), fmt, ap);
	va_end(ap);
	for (;;)
		ucall_send(&uc);
}

void ucall_printf(const char *file, uint64_t line, const char *fmt, ...)
{
	struct ucall uc;
	va_list ap;

	ucall_init(&uc, UCALL_PRINTF, file, line);
	va_start(ap, fmt);
	guest_vsnprintf(uc.buf, sizeof(uc.buf), fmt, ap);
	va_end(ap);
	ucall_send(&uc);
}

void ucall_done(const char *file, uint64_t line)
{
	struct ucall uc;

	ucall_init(&uc, UCALL_DONE, file, line);
	for (;;)
		ucall_send(&uc);
}

/* _start lands here when guest_main returns. */
__noreturn void __guest_main_returned(void);
void __guest_main_returned(void)
{
	ucall_done("guest_main", 0);
}
