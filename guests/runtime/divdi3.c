/*
 * i386 only: the libgcc helpers gcc calls for 64-bit division. There is no 32-bit libgcc on this
 * machine (no gcc-multilib) and the guests link without libgcc anyway, so the runtime provides
 * them. Nothing in here may use a 64-bit `/` or `%` itself.
 */
#include "guest.h"

#ifndef __i386__
#error "divdi3.c is for the i386 runtime only"
#endif

uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem);
uint64_t __udivdi3(uint64_t n, uint64_t d);
uint64_t __umoddi3(uint64_t n, uint64_t d);
int64_t __divmoddi4(int64_t n, int64_t d, int64_t *rem);
int64_t __divdi3(int64_t n, int64_t d);
int64_t __moddi3(int64_t n, int64_t d);

/* edx:eax / d -> quotient (must fit 32 bits: hi < d), remainder */
static inline uint32_t divl(uint32_t hi, uint32_t lo, uint32_t d, uint32_t *r)
{
	uint32_t q;

	__asm__ __volatile__("divl %4" : "=a"(q), "=d"(*r) : "a"(lo), "d"(hi), "rm"(d));
	return q;
}

uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem)
{
	uint32_t nh = n >> 32, nl = (uint32_t)n, dh = d >> 32, dl = (uint32_t)d;
	uint64_t q, r;
	int i;

	if (dh == 0) {
		uint32_t qh, ql, r32;

		if (dl == 0) /* divide by zero: raise #DE like the hardware division would */
			dl = divl(0, 1, 0, &r32);
		qh = divl(0, nh, dl, &r32); /* nh / dl, remainder < dl */
		ql = divl(r32, nl, dl, &r32);
		q = ((uint64_t)qh << 32) | ql;
		r = r32;
	} else {
		/* d >= 2^32, so the quotient fits 32 bits: restoring shift-subtract */
		q = 0;
		r = 0;
		for (i = 63; i >= 0; i--) {
			r = (r << 1) | ((n >> i) & 1);
			if (r >= d) {
				r -= d;
				q |= (uint64_t)1 << i;
			}
		}
	}
	if (rem)
		*rem = r;
	return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d)
{
	return __udivmoddi4(n, d, NULL);
}

uint64_t __umoddi3(uint64_t n, uint64_t d)
{
	uint64_t r;

	__udivmoddi4(n, d, &r);
	return r;
}

int64_t __divmoddi4(int64_t n, int64_t d, int64_t *rem)
{
	uint64_t un = n < 0 ? -(uint64_t)n : (uint64_t)n;
	uint64_t ud = d < 0 ? -(uint64_t)d : (uint64_t)d;
	uint64_t ur, uq = __udivmoddi4(un, ud, &ur);

	/* C: the quotient truncates toward zero, the remainder has the dividend's sign */
	if (rem)
		*rem = (int64_t)(n < 0 ? 0 - ur : ur);
	return (int64_t)((n < 0) != (d < 0) ? 0 - uq : uq);
}

int64_t __divdi3(int64_t n, int64_t d)
{
	return __divmoddi4(n, d, NULL);
}

int64_t __moddi3(int64_t n, int64_t d)
{
	int64_t r;

	__divmoddi4(n, d, &r);
	return r;
}
