"""The C text of harness.race._cfast: the generation protocol's writers and the disruptors' inner
loops, so a host op costs what it costs in bench/race_disrupt.c (no GIL, no Python per op).

The region's writer state (gen, seq, page0_changes) and the writers' lock live in `struct
kh_region`; Region's Python methods call the same C functions (begin/end/cancel/lock), so the Python
step() path and the C loop publish exactly the same gentab[] and tag values, under one lock.
The lock is a semaphore, not a mutex: begin and cancel may legitimately come from different threads
(abort after an error), and it is taken with the GIL released (cffi releases it around every call),
so a C loop holding it never waits on Python.
"""

SHARED = r"""
/* in both the cdef and the C source */
#define KH_OP_FALLOCATE 1
#define KH_OP_MADVISE 2
#define KH_OP_REMAP 3
#define KH_OP_MPROTECT 4
#define KH_OP_SLOT_READD 5
#define KH_OP_SLOT_MOVE 6

#define KH_FAIL_FALLOCATE 1
#define KH_FAIL_MADVISE 2
#define KH_FAIL_MUNMAP 3
#define KH_FAIL_MMAP 4
#define KH_FAIL_MPROTECT_RO 5
#define KH_FAIL_MPROTECT_RW 6
#define KH_FAIL_SLOT 7        /* fail_a: which call (slot_arg[] index), fail_b: its GPA, fail_c: its size */

/* struct kvm_userspace_memory_region2 (harness/kvm/_cdefs.py; disruptors/kvm.py checks the size):
   KVM_SET_USER_MEMORY_REGION reads its first 32 bytes, which are the v1 struct */
struct kh_memslot {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

struct kh_disrupt {
    struct kh_region *r;
    int op;                   /* KH_OP_* */
    int fd;                   /* fallocate / remap: the fd (-1: anonymous) */
    int advice;               /* madvise: the advice; fallocate: the mode */
    uintptr_t addr;           /* the backing's mapping (== the region's hva) */
    /* remap */
    int prot, flags;
    int64_t base_off;         /* the mapping's file offset */
    int flip;                 /* fd kinds: map the other half of the double-size file */
    uint8_t *half;            /* per unit: which half is mapped now (shared with Python's step()) */
    uint64_t unit;
    int thp;                  /* MADV_HUGEPAGE on each new mapping */
    int thp_advice;
    /* the schedule, cycled */
    const uint64_t *sched_off;
    const uint64_t *sched_len;
    uint32_t nsched;
    uint32_t idx;
    const uint64_t *gaps_ns;  /* NULL: no pauses; else a pause of gaps_ns[ops % ngaps] after each op */
    uint32_t ngaps;
    /* overlap: the racing vCPUs' in_run flags (int32_t *, from harness.kvm._cffi) */
    const uintptr_t *in_run;
    uint32_t nvcpus;
    /* mprotect (no seqlock: content never changes): a range read-only every other op */
    int ro;                   /* a range is PROT_READ now: [ro_off, ro_off + ro_len) */
    uint64_t ro_off, ro_len;
    const uint32_t *writers;  /* the writer vCPUs, in Region.writers order */
    uint32_t nwriters;
    uint64_t *snap;           /* writer words of the range right after PROT_READ: [writer][page - p0] */
    uint64_t *landed;         /* (vcpu, page, before, after) per changed word, for the ro-write oracle */
    uint32_t landed_cap, nlanded;
    /* memslot ops, each over the whole region: raw KVM_SET_USER_MEMORY_REGION(2) on vm_fd at the GPA
       ctrl->loc names (slot_gpa[loc]); slot-readd issues slot_arg[0] (delete) then slot_arg[1]
       (re-add), slot-move slot_arg[0] at the other GPA, then ctrl->loc = the other (the guest follows) */
    int vm_fd;
    unsigned long slot_req[2];      /* the ioctl number for each slot_arg[] */
    struct kh_memslot slot_arg[2];  /* the loop sets guest_phys_addr per op */
    uint64_t slot_gpa[2];
    volatile int32_t stop;    /* any thread may set it: the loop returns after the current op */
    uint64_t ops, bytes, overlapped;
    /* the failed call: KH_FAIL_*, errno, its arguments */
    int fail, err;
    uint64_t fail_a, fail_b, fail_c;
};

"""

CDEF = r"""
struct kh_region {
    uint64_t gen;             /* last published generation */
    uint64_t seq;             /* host operations started (mirrored in ctrl[0]) */
    uint64_t page0_changes;   /* changes that covered the region's first page (kvmclock oracle) */
    uint64_t size, stride, npages;
    ...;
};

int kh_region_init(struct kh_region *r, uintptr_t gentab, uintptr_t ctrl, uintptr_t hva,
                   uint64_t size, uint64_t stride);
void kh_region_destroy(struct kh_region *r);
void kh_lock(struct kh_region *r);
int kh_trylock(struct kh_region *r);
void kh_unlock(struct kh_region *r);
void kh_begin(struct kh_region *r, uint64_t off, uint64_t len);
void kh_publish(struct kh_region *r, uint64_t off, uint64_t len);
void kh_end(struct kh_region *r, uint64_t off, uint64_t len);

""" + SHARED + r"""
int kh_disrupt_run(struct kh_disrupt *d, uint64_t limit, uint64_t slice_ns);
int kh_any_in_run(const uintptr_t *flags, uint32_t n);
"""

SRC = r"""
#ifndef _GNU_SOURCE  /* Python.h defines it: fallocate() needs it */
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define KH_CTRL_LOC 2  /* ctrl->loc (protocol.CTRL_LOC / 8): which GPA the slot is at */
#define KH_MAGIC 0xa5c3ULL
#define KH_GEN_MASK 0xfffffffULL
#define KH_PAGE_BITS 20
""" + SHARED + r"""

struct kh_region {
    uint64_t gen;
    uint64_t seq;
    uint64_t page0_changes;
    uint64_t size, stride, npages;
    volatile uint64_t *gentab;
    volatile uint64_t *ctrl;
    uint8_t *hva;
    sem_t lock;
};

/* protocol.tag_base(gen) */
static inline uint64_t kh_tag_base(uint64_t gen)
{
    return (KH_MAGIC << 48) | ((gen & KH_GEN_MASK) << KH_PAGE_BITS);
}

/* Region.pages_of: tag indices [p0, p1) inside [off, off+len) (ceil of both ends) */
static inline void kh_pages(const struct kh_region *r, uint64_t off, uint64_t len, uint64_t *p0, uint64_t *p1)
{
    *p0 = (off + r->stride - 1) / r->stride;
    *p1 = (off + len + r->stride - 1) / r->stride;
}

int kh_region_init(struct kh_region *r, uintptr_t gentab, uintptr_t ctrl, uintptr_t hva,
                   uint64_t size, uint64_t stride)
{
    r->gen = r->seq = r->page0_changes = 0;
    r->size = size;
    r->stride = stride;
    r->npages = size / stride;
    r->gentab = (volatile uint64_t *)gentab;
    r->ctrl = (volatile uint64_t *)ctrl;
    r->hva = (uint8_t *)hva;
    return sem_init(&r->lock, 0, 1) ? -errno : 0;
}

void kh_region_destroy(struct kh_region *r) { sem_destroy(&r->lock); }

void kh_lock(struct kh_region *r)
{
    while (sem_wait(&r->lock) && errno == EINTR)
        ;
}

int kh_trylock(struct kh_region *r) { return sem_trywait(&r->lock) == 0; }

void kh_unlock(struct kh_region *r) { sem_post(&r->lock); }

/* Region.begin_change without the lock: seq, ctrl[0], page0_changes, the range's pages odd */
static inline void kh_begin_locked(struct kh_region *r, uint64_t off, uint64_t len)
{
    uint64_t p0, p1, odd = 2 * r->gen + 1;
    r->seq++;
    r->ctrl[0] = r->seq;  /* one aligned 8-byte store (diagnostics: ops started) */
    if (off == 0)
        __atomic_add_fetch(&r->page0_changes, 1, __ATOMIC_RELAXED);  /* before the change */
    kh_pages(r, off, len, &p0, &p1);
    for (uint64_t p = p0; p < p1; p++)
        r->gentab[p] = odd;
    __asm__ __volatile__("" ::: "memory");  /* odd before the op (x86 keeps stores in order) */
}

void kh_begin(struct kh_region *r, uint64_t off, uint64_t len)
{
    kh_lock(r);
    kh_begin_locked(r, off, len);
}

/* Region._publish: the next generation's tags, then gentab[] even (data before publication) */
void kh_publish(struct kh_region *r, uint64_t off, uint64_t len)
{
    uint64_t p0, p1, gen = r->gen + 1;
    kh_pages(r, off, len, &p0, &p1);
    if (p1 > p0) {
        uint64_t tb = kh_tag_base(gen);
        for (uint64_t p = p0; p < p1; p++)
            *(volatile uint64_t *)(r->hva + p * r->stride) = tb + p;
        __asm__ __volatile__("" ::: "memory");
        for (uint64_t p = p0; p < p1; p++)
            r->gentab[p] = 2 * gen;
    }
    r->gen = gen;
}

void kh_end(struct kh_region *r, uint64_t off, uint64_t len)
{
    kh_publish(r, off, len);
    kh_unlock(r);
}

int kh_any_in_run(const uintptr_t *flags, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (*(volatile int32_t *)flags[i])
            return 1;
    return 0;
}

static inline uint64_t kh_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int kh_fail_nolock(struct kh_disrupt *d, int what, uint64_t a, uint64_t b, uint64_t c)
{
    d->err = errno;
    d->fail = what;
    d->fail_a = a;
    d->fail_b = b;
    d->fail_c = c;
    return -1;
}

static int kh_fail(struct kh_disrupt *d, int what, uint64_t a, uint64_t b, uint64_t c)
{
    kh_fail_nolock(d, what, a, b, c);
    kh_unlock(d->r);  /* abort: the range stays odd, never judged against a half-made generation */
    return -1;
}

/* Mprotect.step: one toggle. Returns 0, -1 (failed: d->fail...), 1 (landed[] full: drain, call again) */
static int kh_mprotect_step(struct kh_disrupt *d, uint64_t off, uint64_t len)
{
    struct kh_region *r = d->r;
    const uint64_t q = r->stride / 8;
    volatile uint64_t *w = (volatile uint64_t *)r->hva;
    int was;
    if (!d->ro) {
        uintptr_t a = d->addr + off;
        was = kh_any_in_run(d->in_run, d->nvcpus);
        if (mprotect((void *)a, len, PROT_READ))
            return kh_fail_nolock(d, KH_FAIL_MPROTECT_RO, a, len, 0);
        if (was && kh_any_in_run(d->in_run, d->nvcpus))
            d->overlapped++;
        d->ops++;
        d->bytes += len;
        uint64_t p0, p1;
        kh_pages(r, off, len, &p0, &p1);
        for (uint32_t k = 0; k < d->nwriters; k++)
            for (uint64_t p = p0; p < p1; p++)
                d->snap[k * r->npages + (p - p0)] = w[p * q + 1 + d->writers[k]];
        d->ro = 1;
        d->ro_off = off;
        d->ro_len = len;
        if (d->gaps_ns) {  /* pause(): read-only for the seeded gap */
            uint64_t g = d->gaps_ns[d->ops % d->ngaps];
            if (g) {
                struct timespec ts = { (time_t)(g / 1000000000ULL), (long)(g % 1000000000ULL) };
                while (nanosleep(&ts, &ts) && errno == EINTR)
                    ;
            }
        }
        return 0;
    }
    off = d->ro_off;
    len = d->ro_len;
    uint64_t p0, p1;
    kh_pages(r, off, len, &p0, &p1);
    if (d->nlanded + (uint64_t)d->nwriters * (p1 - p0) > d->landed_cap)
        return 1;
    for (uint32_t k = 0; k < d->nwriters; k++)
        for (uint64_t p = p0; p < p1; p++) {
            uint64_t b = d->snap[k * r->npages + (p - p0)], now = w[p * q + 1 + d->writers[k]];
            if (now != b) {
                uint64_t *l = d->landed + 4 * d->nlanded++;
                l[0] = d->writers[k];
                l[1] = p;
                l[2] = b;
                l[3] = now;
            }
        }
    uintptr_t a = d->addr + off;
    was = kh_any_in_run(d->in_run, d->nvcpus);
    if (mprotect((void *)a, len, PROT_READ | PROT_WRITE))
        return kh_fail_nolock(d, KH_FAIL_MPROTECT_RW, a, len, 0);
    if (was && kh_any_in_run(d->in_run, d->nvcpus))
        d->overlapped++;
    d->ops++;
    d->bytes += len;
    d->ro = 0;
    return 0;
}

/* Disruptor.run() for the disruptors with a C op: up to `limit` ops, or until `slice_ns` passed or
   d->stop; returns 0, or -1 with the failed call in d->fail/err/fail_* (the lock released, the
   range left odd), or 1 (mprotect: landed[] is full, drain it and call again). The caller
   (Python) holds no lock and, through cffi, not the GIL. */
int kh_disrupt_run(struct kh_disrupt *d, uint64_t limit, uint64_t slice_ns)
{
    struct kh_region *r = d->r;
    uint64_t until = kh_now_ns() + slice_ns;
    uint64_t done = 0;
    d->fail = 0;
    while (done < limit && !d->stop) {
        uint64_t off = d->sched_off[d->idx], len = d->sched_len[d->idx];
        if (d->op == KH_OP_MPROTECT) {
            int rc = kh_mprotect_step(d, off, len);
            if (rc)
                return rc;
            d->idx = d->idx + 1 < d->nsched ? d->idx + 1 : 0;
            done++;
            if ((done & 15) == 0 && kh_now_ns() >= until)
                break;
            continue;
        }
        d->idx = d->idx + 1 < d->nsched ? d->idx + 1 : 0;
        uintptr_t a = d->addr + off;
        int64_t fo = d->base_off + (int64_t)off;
        if (d->op == KH_OP_REMAP && d->flip) {
            /* Remap.step: each unit of the range flips to the other half (the first unit's new half) */
            uint8_t h = d->half[off / d->unit] ^ 1;
            memset(d->half + off / d->unit, h, len / d->unit);
            fo += (int64_t)h * (int64_t)r->size;
        }
        kh_lock(r);
        kh_begin_locked(r, off, len);
        int was = kh_any_in_run(d->in_run, d->nvcpus);
        switch (d->op) {
        case KH_OP_FALLOCATE:
            if (fallocate(d->fd, d->advice, (off_t)off, (off_t)len))
                return kh_fail(d, KH_FAIL_FALLOCATE, off, len, 0);
            break;
        case KH_OP_MADVISE:
            if (madvise((void *)a, len, d->advice))
                return kh_fail(d, KH_FAIL_MADVISE, a, len, (uint64_t)d->advice);
            break;
        case KH_OP_REMAP: {
            if (munmap((void *)a, len))
                return kh_fail(d, KH_FAIL_MUNMAP, a, len, 0);
            void *p = mmap((void *)a, len, d->prot, d->flags, d->fd, (off_t)fo);
            if ((uintptr_t)p != a)
                return kh_fail(d, KH_FAIL_MMAP, a, len, (uint64_t)fo);
            if (d->thp)
                madvise((void *)a, len, d->thp_advice);  /* best effort, as Remap.step */
            break;
        }
        case KH_OP_SLOT_READD: {
            /* SlotReadd.step: delete, then add again at Region.gpa_now (read under the lock) */
            uint64_t gpa = d->slot_gpa[r->ctrl[KH_CTRL_LOC] ? 1 : 0];
            for (int k = 0; k < 2; k++) {
                d->slot_arg[k].guest_phys_addr = gpa;
                if (ioctl(d->vm_fd, d->slot_req[k], &d->slot_arg[k]) < 0)
                    return kh_fail(d, KH_FAIL_SLOT, (uint64_t)k, gpa, d->slot_arg[k].memory_size);
            }
            break;
        }
        case KH_OP_SLOT_MOVE: {
            /* SlotMove.step: KVM_MR_MOVE to the other GPA, then Region.set_loc (the guest follows) */
            uint64_t loc = r->ctrl[KH_CTRL_LOC] ? 0 : 1;
            d->slot_arg[0].guest_phys_addr = d->slot_gpa[loc];
            if (ioctl(d->vm_fd, d->slot_req[0], &d->slot_arg[0]) < 0)
                return kh_fail(d, KH_FAIL_SLOT, 0, d->slot_gpa[loc], d->slot_arg[0].memory_size);
            r->ctrl[KH_CTRL_LOC] = loc;
            break;
        }
        default:
            errno = EINVAL;
            return kh_fail(d, 0, 0, 0, 0);
        }
        if (was && kh_any_in_run(d->in_run, d->nvcpus))
            d->overlapped++;
        kh_end(r, off, len);
        d->ops++;
        d->bytes += len;
        done++;
        if (d->gaps_ns) {  /* Disruptor.pause(): the gap drawn for this op count */
            uint64_t g = d->gaps_ns[d->ops % d->ngaps];
            if (g) {
                struct timespec ts = { (time_t)(g / 1000000000ULL), (long)(g % 1000000000ULL) };
                while (nanosleep(&ts, &ts) && errno == EINTR)
                    ;
            }
        }
        if ((done & 15) == 0 && kh_now_ns() >= until)
            break;
    }
    return 0;
}
"""
