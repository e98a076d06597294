/*
 * real_checksum: the checksum payload in 16-bit real mode.
 * In:  the host puts len (uint16, at most 0xff0) at 0x7000 and the data at 0x7010.
 * Out: SYNC(sum) with sum = sum * 31 + byte over the bytes (64-bit, wrapping), then DONE, then
 *      hlt forever.
 * The 64-bit sum lives in edx:eax; sum * 31 = (sum << 5) - sum.
 */
#include "real16.h"

#define LEN_ADDR 0x7000
#define DATA_ADDR 0x7010

	.code16
	.section .text.start, "ax"
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	movzwl LEN_ADDR, %ecx
	movw $DATA_ADDR, %si
	xorl %eax, %eax
	xorl %edx, %edx
	testl %ecx, %ecx
	jz 2f
1:	/* edi:ebx = sum << 5 */
	movl %eax, %ebx
	movl %edx, %edi
	shldl $5, %ebx, %edi
	shll $5, %ebx
	/* edi:ebx -= sum */
	subl %eax, %ebx
	sbbl %edx, %edi
	/* edi:ebx += byte */
	movzbl (%si), %eax
	addl %eax, %ebx
	adcl $0, %edi
	movl %ebx, %eax
	movl %edi, %edx
	incw %si
	decl %ecx
	jnz 1b
2:
	REAL_UCALL(UCALL_SYNC, 1)
	REAL_UCALL(UCALL_DONE, 0)
3:	hlt
	jmp 3b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
