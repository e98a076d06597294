/*
 * x86_64 exception entry stubs. Each stub makes the stack look the same (a dummy error code
 * where the CPU pushes none, then the vector), the common part saves the GPRs so that the stack
 * holds a struct ex_regs (guest.h), calls guest_exception_dispatch(regs), restores and iretq's.
 * No IST, no stack switch: the runtime is built with -mno-red-zone.
 */
#include "guest.h"

/* vectors for which the CPU pushes an error code */
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

	.text
	.p2align 4
	.type exception_common, @function
exception_common:
	/* stack: vector, error_code, rip, cs, rflags, rsp, ss */
	push %r15
	push %r14
	push %r13
	push %r12
	push %r11
	push %r10
	push %r9
	push %r8
	push %rdi
	push %rsi
	push %rbp
	push %rbx
	push %rdx
	push %rcx
	push %rax
	/* 22 * 8 = 176 bytes on a 16-byte aligned boundary (the CPU aligns rsp before pushing):
	 * rsp is 16-byte aligned at the call, as the ABI wants. */
	cld
	mov %rsp, %rdi
	call guest_exception_dispatch
	pop %rax
	pop %rcx
	pop %rdx
	pop %rbx
	pop %rbp
	pop %rsi
	pop %rdi
	pop %r8
	pop %r9
	pop %r10
	pop %r11
	pop %r12
	pop %r13
	pop %r14
	pop %r15
	add $16, %rsp /* vector, error_code */
	iretq
	.size exception_common, . - exception_common

.macro STUB vec
	.p2align 4
	.globl guest_exception_stub_\vec
	.type guest_exception_stub_\vec, @function
guest_exception_stub_\vec:
	.if !HAS_ERROR_CODE(\vec)
	push $0
	.endif
	push $\vec
	jmp exception_common
	.size guest_exception_stub_\vec, . - guest_exception_stub_\vec
.endm

.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	STUB \vec
.endr

	.section .rodata
	.p2align 3
	.globl guest_exception_stubs
	.type guest_exception_stubs, @object
guest_exception_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad guest_exception_stub_\vec
.endr
	.size guest_exception_stubs, . - guest_exception_stubs

	.section .note.GNU-stack, "", @progbits
