/*
 * i386 exception entry stubs. The CPU pushes eflags, cs, eip (and an error code for some
 * vectors) but no esp/ss at the same privilege level. Each stub pushes a dummy error code where
 * needed and the vector; the common part reserves esp/ss slots, saves the GPRs so that the stack
 * holds a struct ex_regs (guest.h), fills in esp (the value before the exception) and ss, calls
 * guest_exception_dispatch(regs), restores and returns to regs->eip (with popfl; ret: see below).
 */
#include "guest.h"

#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

	.text
	.p2align 4
	.type exception_common, @function
exception_common:
	/* stack: vector, error_code, eip, cs, eflags */
	sub $8, %esp /* esp, ss */
	push %edi
	push %esi
	push %ebp
	push %ebx
	push %edx
	push %ecx
	push %eax
	/* 0 eax .. 24 edi, 28 esp, 32 ss, 36 vector, 40 error_code, 44 eip, 48 cs, 52 eflags */
	lea 56(%esp), %eax
	mov %eax, 28(%esp)
	xor %eax, %eax
	mov %ss, %ax
	mov %eax, 32(%esp)
	cld
	mov %esp, %eax
	push %eax
	call guest_exception_dispatch
	add $4, %esp
	/*
	 * Return without iret: kvm_pvm (this machine's KVM) cannot run a 32-bit protected-mode iret
	 * (KVM_EXIT_INTERNAL_ERROR, emulation failure; KVM's emulator only does real-mode iret).
	 * At the same privilege level with an unchanged cs, iret is "pop eip, pop cs, pop eflags",
	 * so: move eflags into the cs slot and eip into the eflags slot, restore the GPRs, popfl,
	 * ret. esp ends where iret would leave it (the value before the exception). Unlike iret this
	 * is not atomic (an interrupt could hit between popfl and ret, which is harmless here) and
	 * ignores a changed cs.
	 */
	mov 52(%esp), %eax /* eflags */
	mov 44(%esp), %ecx /* eip, possibly changed by the handler */
	mov %eax, 48(%esp)
	mov %ecx, 52(%esp)
	pop %eax
	pop %ecx
	pop %edx
	pop %ebx
	pop %ebp
	pop %esi
	pop %edi
	add $20, %esp /* esp, ss, vector, error_code, eip: now at the eflags copy */
	popfl
	ret
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
	.p2align 2
	.globl guest_exception_stubs
	.type guest_exception_stubs, @object
guest_exception_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long guest_exception_stub_\vec
.endr
	.size guest_exception_stubs, . - guest_exception_stubs

	.section .note.GNU-stack, "", @progbits
