/*
 * x86_64 entry (guests/ABI.md): the host set rsp (16-byte aligned), rdi = vCPU index,
 * rsi = the case's argument. Install the IDT, call guest_main(vcpu_id, arg), then report DONE
 * (again and again if the host resumes the vCPU).
 */
#include "guest.h"

	.section .text.start, "ax"
	.globl _start
	.type _start, @function
_start:
	xor %ebp, %ebp /* end of the frame-pointer chain */
	mov %rdi, %r12 /* callee-saved across guest_idt_init */
	mov %rsi, %r13
	call guest_idt_init
	mov %r12, %rdi
	mov %r13, %rsi
	call guest_main
	call __guest_main_returned /* does not return */
1:	hlt
	jmp 1b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
