/*
 * kvmclock: arg = GVA of struct kvmclock_desc. Repeatedly read the descriptor and run one command,
 * then GUEST_SYNC its result; the host may change the descriptor while the vCPU is stopped there.
 *
 *   cmd 0  return (DONE)
 *   cmd 1  enable:  wrmsr(msr, gpa | 1)              -> SYNC(1)
 *   cmd 2  read the pvclock at gva (version protocol, <= 1000 tries)
 *          -> SYNC(version, system_time, tsc_timestamp, mul | shift << 32 | flags << 40, now, tries)
 *             now = system_time + scaled(rdtsc - tsc_timestamp), the guest's kvmclock time
 *   cmd 3  churn: until `count` iterations or *stop != 0: wrmsr(msr, gpa | 1) (each write asks KVM
 *          for a clock update, written through its pfncache on the next entry), then read the
 *          pvclock once with the version protocol; `done` = iterations so far
 *          -> SYNC(iterations, odd versions seen after the update, torn reads, max version, 3)
 *   cmd 4  disable: wrmsr(msr, 0)                    -> SYNC(4)
 *
 * The pvclock struct (Documentation/virt/kvm/x86/msr.rst, 32 bytes): u32 version, u32 pad0,
 * u64 tsc_timestamp, u64 system_time, u32 tsc_to_system_mul, s8 tsc_shift, u8 flags, u8 pad[2].
 */
#include "guest.h"

struct kvmclock_desc {
	uint64_t cmd;
	uint64_t msr;   /* MSR_KVM_SYSTEM_TIME_NEW (0x4b564d01) or MSR_KVM_SYSTEM_TIME (0x12) */
	uint64_t gpa;   /* where KVM writes the pvclock */
	uint64_t gva;   /* where the guest reads it */
	uint64_t count; /* cmd 3: iterations (0: until *stop) */
	uint64_t stop;  /* cmd 3: host sets it to end the churn */
	uint64_t done;  /* cmd 3: iterations so far (the guest updates it) */
};

struct pvclock {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t mul;
	int8_t shift;
	uint8_t flags;
	uint8_t pad[2];
};
_Static_assert(sizeof(struct pvclock) == 32, "pvclock_vcpu_time_info is 32 bytes");

/* (delta << shift or >> -shift) * mul >> 32, in 64-bit pieces (no __int128 on i386) */
static uint64_t scale(uint64_t delta, uint32_t mul, int8_t shift)
{
	if (shift >= 0)
		delta <<= shift;
	else
		delta >>= -shift;
	return (delta >> 32) * mul + (((delta & 0xffffffffULL) * mul) >> 32);
}

/* One consistent snapshot: version even and equal before and after. Returns the tries it took
 * (1 = first read), or 0 when no consistent read came within `max` tries. */
static uint32_t read_pvclock(volatile struct pvclock *p, struct pvclock *out, uint32_t max)
{
	uint32_t t;

	for (t = 1; t <= max; t++) {
		uint32_t v1 = p->version, v2;

		barrier();
		out->tsc_timestamp = p->tsc_timestamp;
		out->system_time = p->system_time;
		out->mul = p->mul;
		out->shift = p->shift;
		out->flags = p->flags;
		barrier();
		v2 = p->version;
		out->version = v1;
		if (v1 == v2 && !(v1 & 1))
			return t;
		cpu_relax();
	}
	return 0;
}

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct kvmclock_desc *d = (volatile struct kvmclock_desc *)arg;

	(void)vcpu_id;
	for (;;) {
		uint64_t cmd = d->cmd, msr = d->msr, gpa = d->gpa, gva = d->gva;
		volatile struct pvclock *p = (volatile struct pvclock *)(uintptr_t)gva;
		struct pvclock c;
		uint32_t tries;

		/* the host may have edited the page tables while we were stopped */
		write_cr3(read_cr3());
		switch (cmd) {
		case 0:
			return;
		case 1:
			wrmsr((uint32_t)msr, gpa | 1);
			GUEST_SYNC(1);
			break;
		case 2: {
			uint64_t now;

			tries = read_pvclock(p, &c, 1000);
			now = c.system_time + scale(rdtsc() - c.tsc_timestamp, c.mul, c.shift);
			GUEST_SYNC(c.version, c.system_time, c.tsc_timestamp,
				   (uint64_t)c.mul | (uint64_t)(uint8_t)c.shift << 32 | (uint64_t)c.flags << 40,
				   now, tries);
			break;
		}
		case 3: {
			uint64_t n = d->count, i, odd = 0, torn = 0, maxv = 0;

			for (i = 0; n == 0 || i < n; i++) {
				if (d->stop)
					break;
				wrmsr((uint32_t)msr, gpa | 1);
				/* the update completed before this vCPU re-entered: one read must do,
				 * unless the host swapped the page in between (then the retry reads the
				 * fresh one) */
				tries = read_pvclock(p, &c, 2);
				if (!tries) {
					if (c.version & 1)
						odd++;
					else
						torn++;
				}
				if (c.version > maxv)
					maxv = c.version;
				d->done = i + 1;
			}
			GUEST_SYNC(i, odd, torn, maxv, 3);
			break;
		}
		case 4:
			wrmsr((uint32_t)msr, 0);
			GUEST_SYNC(4);
			break;
		default:
			GUEST_FAIL("kvmclock: unknown cmd %" PRIu64, cmd);
		}
	}
}
