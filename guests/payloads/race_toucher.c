/*
 * race_toucher: arg = GVA (== GPA, boot slot) of struct race_ctrl. The guest side of harness/race.
 *
 * Each vCPU sweeps the region's pages (tag word at offset 0 of every `stride` bytes) forever, each
 * sweep starting at a different page, until the host sets ctrl->stop (checked between sweeps);
 * then it returns (DONE). Per page p:
 *
 *   g1 = gentab[p]; loc = ctrl->loc; v = *(base[loc] + p * stride);
 *   [writer vCPUs: *(base[loc] + p * stride + 8 * (1 + id)) = token(id, sweep)]
 *   g2 = gentab[p];
 *
 * gentab[] is a per-page seqlock the host keeps: gentab[p] is odd while the host changes page p
 * (disrupts it, then writes the new generation's tag), and becomes 2 * gen only once
 * RACE_TAG(gen, p) is in place: a generation is published only after its data is. x86 keeps loads
 * in order, so a read with g1 == g2, g1 even, started after the guest had seen generation g1 / 2
 * and must return exactly RACE_TAG(g1 / 2, p); anything else (an older generation: a stale
 * translation; zero: a freed page; foreign bytes: a reused page) is reported with
 * GUEST_SYNC(RACE_VIOLATION, p | loc << 32, seen, g1, gva, ctrl->seq) and the sweep goes on.
 * Reads of a page in flux (g1 odd or g1 != g2) are counted as `influx`: the guest's own measure of
 * the overlap. Pages the host is not touching stay judged while it works elsewhere.
 *
 * Counters (struct race_vcpu) are published after each sweep, `sweeps` last, without exits: the
 * host watches `sweeps` for progress. Only violations and the final DONE exit to the host.
 */
#include "guest.h"

#define RACE_MAGIC 0xa5c3ULL
#define RACE_GEN_MASK 0xfffffffULL /* 28 bits of generation */
#define RACE_PAGE_MASK 0xfffffULL  /* 20 bits of page index */
#define RACE_TAG(gen, page) \
	((RACE_MAGIC << 48) | (((gen) & RACE_GEN_MASK) << 20) | ((page) & RACE_PAGE_MASK))
#define RACE_VIOLATION 0x5aceULL
#define RACE_MAX_VCPUS 16

struct race_vcpu {             /* 64 bytes, at ctrl + 128 + 64 * id */
	uint64_t sweeps;       /* completed sweeps (published last) */
	uint64_t judged;       /* reads checked against a stable generation */
	uint64_t influx;       /* reads that overlapped a host change (not judged) */
	uint64_t writes;       /* words written (writer vCPUs) */
	uint64_t violations;   /* reads that returned the wrong tag */
	uint64_t last_seq;     /* ctrl->seq at the end of the last sweep */
	uint64_t pages;        /* page reads started */
	uint64_t reserved;
};

struct race_ctrl {             /* one page in the boot slot */
	uint64_t seq;          /*   0: host operations started (diagnostics only) */
	uint64_t stop;         /*   8: non-zero: return after the current sweep */
	uint64_t loc;          /*  16: which base the region is at now (memslot move) */
	uint64_t base[2];      /*  24: GVAs of the region at its two GPAs */
	uint64_t npages;       /*  40: tags in the region */
	uint64_t stride;       /*  48: bytes between tags (multiple of 8, >= 8 * (1 + vCPUs)) */
	uint64_t wmask;        /*  56: bit i: vCPU i also writes its own word of each page */
	uint64_t nvcpus;       /*  64 */
	uint64_t gentab;       /*  72: GVA of uint64_t gentab[npages]: 2 * gen, odd in flux */
	uint64_t reserved[6];  /*  80 */
	struct race_vcpu vcpu[RACE_MAX_VCPUS]; /* 128 */
};

_Static_assert(sizeof(struct race_vcpu) == 64, "race_vcpu layout");
_Static_assert(__builtin_offsetof(struct race_ctrl, vcpu) == 128, "race_ctrl layout");

void guest_main(uintptr_t vcpu_id, uintptr_t arg)
{
	volatile struct race_ctrl *c = (volatile struct race_ctrl *)arg;
	volatile struct race_vcpu *me;
	volatile uint64_t *gentab;
	uint64_t npages, stride, nv, sweep = 0;
	uint64_t judged = 0, influx = 0, writes = 0, viol = 0, pages = 0;
	int writer;

	if (vcpu_id >= RACE_MAX_VCPUS)
		GUEST_FAIL("race_toucher: vcpu %u >= %u", (unsigned)vcpu_id, RACE_MAX_VCPUS);
	me = &c->vcpu[vcpu_id];
	npages = c->npages;
	stride = c->stride;
	nv = c->nvcpus ? c->nvcpus : 1;
	writer = (c->wmask >> vcpu_id) & 1;
	gentab = (volatile uint64_t *)(uintptr_t)c->gentab;
	if (!npages || stride < 8 * (2 + vcpu_id) || (stride & 7))
		GUEST_FAIL("race_toucher: bad geometry npages=%" PRIu64 " stride=%" PRIu64, npages, stride);
	for (;;) {
		uint64_t start, i, token;

		if (READ_ONCE(c->stop))
			return;
		/* vCPUs start apart and every sweep starts elsewhere: faults meet at varied pages */
		start = (vcpu_id * npages / nv + sweep * 61) % npages;
		token = ((uint64_t)vcpu_id << 56) | ((sweep + 1) & ((1ULL << 56) - 1));
		for (i = 0; i < npages; i++) {
			uint64_t p = start + i, g1, g2, loc, v;
			uintptr_t a;

			if (p >= npages)
				p -= npages;
			g1 = gentab[p];
			loc = c->loc;
			a = (uintptr_t)c->base[loc & 1] + (uintptr_t)(p * stride);
			pages++;
			v = load64(a);
			if (writer) {
				store64(a + 8 * (1 + vcpu_id), token);
				writes++;
			}
			g2 = gentab[p];
			if ((g1 & 1) || g1 != g2) {
				influx++;
				continue;
			}
			judged++;
			if (v != RACE_TAG(g1 >> 1, p)) {
				viol++;
				GUEST_SYNC(RACE_VIOLATION, p | (loc << 32), v, g1, a, c->seq);
			}
		}
		sweep++;
		me->judged = judged;
		me->influx = influx;
		me->writes = writes;
		me->violations = viol;
		me->pages = pages;
		me->last_seq = c->seq;
		barrier();
		WRITE_ONCE(me->sweeps, sweep);
	}
}
