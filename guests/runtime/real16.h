/*
 * real16.h - helpers for real-mode payloads (payloads/real_*.S, `.code16`, linked at 0x8000 by
 * runtime/real.ld). Assembly only. Real mode has no runtime: no IDT, no stack (the host's sp is
 * the low half of 0x200000 - i * 0x8000); ds = es = ss = 0 (guests/ABI.md), so addresses below
 * 0x10000 are used directly. 32-bit registers work in .code16 (GNU as adds the 0x66 prefixes).
 *
 * The ucall struct lives at a fixed address (REAL_UCALL_ADDR): a real-mode payload supports one
 * vCPU.
 */
#ifndef KVM_HARNESS_REAL16_H
#define KVM_HARNESS_REAL16_H

#include "guest.h"

#ifndef __ASSEMBLER__
#error "real16.h is for real-mode assembly payloads"
#endif

#define REAL_UCALL_ADDR 0x6000 /* struct ucall at 0x6000 .. 0x64c8 */

/*
 * REAL_UCALL(cmd, nargs): zero the struct at REAL_UCALL_ADDR; set cmd, nargs, line (__LINE__ of
 * the use) and file (the payload's file name); args[0] = edx:eax when nargs >= 1; then
 * `out %eax, %dx` with eax = REAL_UCALL_ADDR, dx = UCALL_PORT.
 * Uses no stack. Clobbers eax, ebx, ecx, edx, ebp, esi, edi and the flags.
 */
#define REAL_UCALL(cmd, nargs) __REAL_UCALL cmd, nargs, __LINE__, __FILE_NAME__

.macro __REAL_UCALL cmd:req, nargs:req, line:req, file:req
	.pushsection .rodata
.Lreal_ucall_file\@:
	.ascii "\file"
.Lreal_ucall_file_end\@:
	.popsection
	movl %eax, %ebx
	movl %edx, %ebp
	movw $REAL_UCALL_ADDR, %di
	movw $UCALL_SIZE, %cx
	xorb %al, %al
	cld
	rep stosb
	movl $\cmd, REAL_UCALL_ADDR + UCALL_OFF_CMD
	movl $\nargs, REAL_UCALL_ADDR + UCALL_OFF_NARGS
	movl $\line, REAL_UCALL_ADDR + UCALL_OFF_LINE
	.if \nargs >= 1
	movl %ebx, REAL_UCALL_ADDR + UCALL_OFF_ARGS
	movl %ebp, REAL_UCALL_ADDR + UCALL_OFF_ARGS + 4
	.endif
	movw $.Lreal_ucall_file\@, %si
	movw $REAL_UCALL_ADDR + UCALL_OFF_FILE, %di
	movw $(.Lreal_ucall_file_end\@ - .Lreal_ucall_file\@), %cx
	rep movsb /* the struct is zeroed: the name stays NUL-terminated */
	movl $REAL_UCALL_ADDR, %eax
	movw $UCALL_PORT, %dx
	outl %eax, %dx
.endm

#endif
