/*
 * i386 entry (guests/ABI.md): the host set esp (16-byte aligned), edi = vCPU index,
 * esi = the case's argument (low half). Install the IDT, call guest_main(vcpu_id, arg) with the
 * arguments on the stack (cdecl), then report DONE (again and again if the host resumes).
 */
#include "guest.h"

	.section .text.start, "ax"
	.globl _start
	.type _start, @function
_start:
	xor %ebp, %ebp
	call guest_idt_init /* edi, esi are callee-saved in cdecl */
	sub $8, %esp        /* keep esp 16-byte aligned at the call */
	push %esi           /* arg */
	push %edi           /* vcpu_id */
	call guest_main
	add $16, %esp
	call __guest_main_returned /* does not return */
1:	hlt
	jmp 1b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
