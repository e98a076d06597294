"""Host and kernel health around every case.

kmsg         /dev/kmsg reader, splat matcher, taint
oracle       per-case kernel-log windows (splats and taint changes), known-issue splats
case         the one verdict per case (autouse check, mid-body check, race engine all use it)
exclusive    machine-wide lock: cases expected to splat run alone, so their records are theirs
leaks        per-case fd / thread / mapping / RSS / hugepage / mount comparison
diagnostics  what a hung vCPU thread (and every other thread) was doing, for the watchdog
ptrace_helper  the separate process that ptraces stuck threads (python -m harness.health.ptrace_helper)
"""
