#!/bin/sh
# check_insns.sh ELF [objdump -M/-m options...]
# Fails (exit 1, listing them) if the ELF's code uses x87, MMX, SSE/AVX or mask registers or
# instructions: this machine's KVM cannot run SSE in guests, and the runtime promises none.
set -eu
elf=$1
shift
out=$(objdump -d --no-show-raw-insn "$@" "$elf" | awk '
	BEGIN {
		split("rep repz repe repnz repne lock data16 data32 addr16 addr32 cs ds es fs gs ss bnd notrack xacquire xrelease", p, " ")
		for (i in p) prefix[p[i]] = 1
	}
	/^ *[0-9a-f]+:\t/ {
		line = $0
		insn = line
		sub(/^ *[0-9a-f]+:\t/, "", insn)
		n = split(insn, w, /[ \t]+/)
		i = 1
		while (i <= n && (w[i] in prefix || w[i] ~ /^rex/)) i++
		m = w[i]
		bad = 0
		if (m ~ /^f/ || m ~ /^(emms|wait|ldmxcsr|stmxcsr|xsave|xrstor|fxsave|fxrstor)/ || m ~ /^v/ && m !~ /^(verr|verw|vm)/) bad = 1
		if (insn ~ /%([xyz]mm[0-9]|mm[0-7]|st[ (,]|st$|k[0-7]([^0-9]|$))/) bad = 1
		if (bad) print line
	}')
if [ -n "$out" ]; then
	echo "$elf: x87/MMX/SSE/AVX instructions found (build with -mgeneral-regs-only):" >&2
	echo "$out" >&2
	exit 1
fi
