"""C declarations of the KVM uapi and the few libc calls the binding needs.

Layouts are the kernel's uapi (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) written
out as facts: the host's linux-libc-dev is older than the kernel we drive, so we cannot include its
<linux/kvm.h>. tests/test_binding.py pins every size and the offsets that matter.

The same text is fed to cffi's cdef() and compiled into the extension (see _build.py), so the
compiler computes the layout the Python side uses. (Over 400 lines: the uapi structs, in one place.)
"""

UAPI = r"""
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax, ebx, ecx, edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_userspace_memory_region2 {
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

struct kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct kvm_memory_attributes {
    uint64_t address;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
};

struct kvm_pre_fault_memory {
    uint64_t gpa;
    uint64_t size;
    uint64_t flags;
    uint64_t padding[5];
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_dirty_gfn {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    uint32_t pad;
};

struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    uint32_t pad;
    uint8_t data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first, last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid;
    uint8_t writeable;
    uint8_t usermode;
    uint8_t pad[5];
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    uint8_t reserved[27];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_xen_hvm_config {
    uint32_t flags;
    uint32_t msr;
    uint64_t blob_addr_32;
    uint64_t blob_addr_64;
    uint8_t blob_size_32;
    uint8_t blob_size_64;
    uint8_t pad2[30];
};

struct kvm_stats_header {
    uint32_t flags;
    uint32_t name_size;
    uint32_t num_desc;
    uint32_t id_offset;
    uint32_t desc_offset;
    uint32_t data_offset;
};

struct kvm_stats_desc {
    uint32_t flags;
    int16_t exponent;
    uint16_t size;
    uint32_t offset;
    uint32_t bucket_size;
    char name[];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];

    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;

    uint64_t cr8;
    uint64_t apic_base;

    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            struct kvm_debug_exit_arch arch;
        } debug;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint64_t flags;
        } hypercall;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t insn_size;
            uint8_t insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];
        } system_event;
        struct {
            uint8_t error;
            uint8_t pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct {
            uint32_t flags;
        } notify;
        struct {
            uint64_t flags;
            uint64_t gpa;
            uint64_t size;
        } memory_fault;
        char padding[256];
    };

    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};
"""

# ---- Xen HVM emulation (KVM_CAP_XEN_HVM) -------------------------------------------------------------
# Added for harness/x86/xen.py; a block of its own so it reads apart from the structs above. Layouts
# from upstream's uapi (arch/x86/include/uapi/asm/kvm.h since the Xen structs moved there; earlier
# include/uapi/linux/kvm.h); struct kvm_xen_hvm_config is above. tests/test_xen_uapi.py pins them.
UAPI += r"""
struct kvm_xen_hvm_attr {
    uint16_t type;
    uint16_t pad[3];
    union {
        uint8_t long_mode;
        uint8_t vector;
        uint8_t runstate_update_flag;
        union {
            uint64_t gfn;
            uint64_t hva;
        } shared_info;
        struct {
            uint32_t send_port;
            uint32_t type;
            uint32_t flags;
            union {
                struct {
                    uint32_t port;
                    uint32_t vcpu;
                    uint32_t priority;
                } port;
                struct {
                    uint32_t port;
                    int32_t fd;
                } eventfd;
                uint32_t padding[4];
            } deliver;
        } evtchn;
        uint32_t xen_version;
        uint64_t pad[8];
    } u;
};

struct kvm_xen_vcpu_attr {
    uint16_t type;
    uint16_t pad[3];
    union {
        uint64_t gpa;
        uint64_t hva;
        uint64_t pad[8];
        struct {
            uint64_t state;
            uint64_t state_entry_time;
            uint64_t time_running;
            uint64_t time_runnable;
            uint64_t time_blocked;
            uint64_t time_offline;
        } runstate;
        uint32_t vcpu_id;
        struct {
            uint32_t port;
            uint32_t priority;
            uint64_t expires_ns;
        } timer;
        uint8_t vector;
    } u;
};

struct kvm_irq_routing_xen_evtchn {
    uint32_t port;
    uint32_t vcpu;
    uint32_t priority;
};
"""

# Helpers compiled into the extension. They return -errno instead of setting errno so that the
# Python side needs no second call to learn why an ioctl failed.
HELPERS_DECL = r"""
long kh_ioctl_ptr(int fd, unsigned long req, void *arg);
long kh_ioctl_int(int fd, unsigned long req, unsigned long arg);
int kh_run(int fd, uint32_t *exit_reason);

int kh_install_kick_handler(void);
int kh_kick_signal(void);

void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t len, int prot);
int madvise(void *addr, size_t length, int advice);
int fallocate(int fd, int mode, long offset, long len);
int mincore(void *addr, size_t length, unsigned char *vec);
int msync(void *addr, size_t length, int flags);
"""

HELPERS_SRC = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/* KVM_RUN = _IO(KVMIO, 0x80); pinned by tests/test_binding.py. */
#define KH_KVM_RUN 0xAE80UL

long kh_ioctl_ptr(int fd, unsigned long req, void *arg)
{
    long rc = ioctl(fd, req, arg);
    return rc < 0 ? -errno : rc;
}

long kh_ioctl_int(int fd, unsigned long req, unsigned long arg)
{
    long rc = ioctl(fd, req, arg);
    return rc < 0 ? -errno : rc;
}

int kh_run(int fd, uint32_t *exit_reason)
{
    /* KVM fills exit_reason on an error return only for KVM_EXIT_MEMORY_FAULT (api.rst: "stale/
     * undefined for all other error numbers"): clear it so a stale reason is never decoded. */
    *exit_reason = 0;
    return ioctl(fd, KH_KVM_RUN, 0) < 0 ? -errno : 0;
}

static void kh_kick_noop(int sig) { (void)sig; }

int kh_kick_signal(void)
{
    /* A realtime signal nobody else in a Python process uses; glibc keeps SIGRTMIN-3.. for itself. */
    return SIGRTMIN + 7;
}

int kh_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kh_kick_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must come back with EINTR */
    if (sigaction(kh_kick_signal(), &sa, NULL) < 0)
        return -errno;
    return 0;
}
"""

# The fast path: its struct is declared to cffi and compiled (after UAPI: it reads struct kvm_run).
FAST_DECL = r"""/* The vCPU's fast path (kh_run_fast): KVM_RUN re-entered in C for the exits a case asked to have
 * absorbed (OUT to a sink port, MMIO in a window completed with a fixed read value), counted here;
 * any other exit, an error or a kick returns to Python. Field order is ABI with the C below. */
struct kh_vcpu_fast {
    int32_t fd;
    volatile int32_t in_run;   /* 1 while this vCPU's thread is inside KVM_RUN (C race loops read it) */
    struct kvm_run *run;
    uint64_t budget;           /* return after this many absorbed exits (0: no limit) */
    uint64_t exits;            /* KVM_RUN returns, absorbed or not */
    uint64_t absorbed;         /* exits handled here since the last reset */
    uint64_t pio_out;          /* absorbed OUTs */
    uint64_t mmio_reads;       /* absorbed MMIO reads */
    uint64_t mmio_writes;      /* absorbed MMIO writes */
    uint64_t last_out;         /* data of the last absorbed OUT (its first 8 bytes) */
    uint64_t mmio_lo;          /* absorbed MMIO window [mmio_lo, mmio_hi); empty: none */
    uint64_t mmio_hi;
    uint64_t mmio_read_value;  /* what an absorbed MMIO read returns (little-endian, truncated) */
    uint32_t nsink;
    uint16_t sink_ports[8];    /* OUT to these ports is absorbed */
};
int kh_run_fast(struct kh_vcpu_fast *f);

/* Dirty harvests in bulk (harness/kvm/dirty.py): a bitmap's set bits as page numbers; page numbers
 * as a bitmap (-(i+1) when pages[i] is outside the slot); a dirty ring's DIRTY entries from fetch,
 * each marked RESET (-(n+1) when entry fetch+n is DIRTY|RESET). */
uint64_t kh_bitmap_pages(const uint64_t *bm, uint64_t npages, uint32_t *out);
int64_t kh_pages_bitmap(const uint32_t *pages, uint64_t n, uint64_t npages, uint64_t *bm);
int64_t kh_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t entries, uint64_t fetch, uint64_t limit,
                        uint32_t *slots, uint64_t *offsets);

/* harness.oracles.mmio.pattern_byte for n consecutive addresses (a page of it is 13 ms in Python,
 * per MMIO case, and ~10x that under TCG); tests/test_mmio_oracle.py pins it to the Python one. */
void kh_pattern_bytes(uint64_t addr, uint8_t *out, uint64_t n);
/* harness.memory.memtouch's words and checksum (guests/payloads/memtouch.c's, host side): up to 32k
 * words per check, ~10 ms each in Python; tests/test_memtouch_host.py pins them to the Python ones. */
void kh_memtouch_words(uint64_t pattern, uint64_t base, uint64_t stride, uint64_t n, uint64_t *out);
uint64_t kh_memtouch_checksum(const uint64_t *v, uint64_t n);
"""

FAST_SRC = r"""
/* Exit reasons and kvm_run offsets the fast path reads; pinned by tests/test_binding.py. */
#define KH_EXIT_IO 2
#define KH_EXIT_MMIO 6
#define KH_IO_OUT 1

void kh_memtouch_words(uint64_t pattern, uint64_t base, uint64_t stride, uint64_t n, uint64_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = (pattern ^ (base + i * stride)) * 0x9E3779B97F4A7C15ull;
}

uint64_t kh_memtouch_checksum(const uint64_t *v, uint64_t n)
{
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; i++)
        s = s * 31 + v[i];
    return s;
}

void kh_pattern_bytes(uint64_t addr, uint8_t *out, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        uint64_t z = addr + i + 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        out[i] = (uint8_t)(z ^ (z >> 31));
    }
}

uint64_t kh_bitmap_pages(const uint64_t *bm, uint64_t npages, uint32_t *out)
{
    uint64_t n = 0;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        for (uint64_t x = bm[w]; x; x &= x - 1) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(x);
            if (p >= npages)
                break;
            out[n++] = (uint32_t)p;
        }
    }
    return n;
}

int64_t kh_pages_bitmap(const uint32_t *pages, uint64_t n, uint64_t npages, uint64_t *bm)
{
    for (uint64_t i = 0; i < n; i++) {
        if (pages[i] >= npages)
            return -(int64_t)(i + 1);
        bm[pages[i] >> 6] |= 1ULL << (pages[i] & 63);
    }
    return 0;
}

#define KH_DIRTY_GFN_F_DIRTY 1U
#define KH_DIRTY_GFN_F_RESET 2U

int64_t kh_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t entries, uint64_t fetch, uint64_t limit,
                        uint32_t *slots, uint64_t *offsets)
{
    uint64_t n = 0;
    while (n < limit) {
        struct kvm_dirty_gfn *e = &ring[(fetch + n) & (entries - 1)];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);  /* then slot/offset */
        if (!(flags & KH_DIRTY_GFN_F_DIRTY))
            break;
        if (flags & KH_DIRTY_GFN_F_RESET)
            return -(int64_t)(n + 1);
        slots[n] = e->slot;
        offsets[n] = e->offset;
        __atomic_store_n(&e->flags, KH_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        n++;
    }
    return (int64_t)n;
}

static int kh_absorb(struct kh_vcpu_fast *f)
{
    struct kvm_run *r = f->run;
    if (r->exit_reason == KH_EXIT_IO) {
        if (r->io.direction != KH_IO_OUT)
            return 0;
        for (uint32_t i = 0; i < f->nsink; i++) {
            if (f->sink_ports[i] == r->io.port) {
                uint64_t v = 0;
                uint32_t n = (uint32_t)r->io.size * r->io.count;
                memcpy(&v, (char *)r + r->io.data_offset, n < 8 ? n : 8);
                f->last_out = v;
                f->pio_out++;
                return 1;
            }
        }
        return 0;
    }
    if (r->exit_reason == KH_EXIT_MMIO) {
        uint64_t a = r->mmio.phys_addr;
        if (a < f->mmio_lo || a >= f->mmio_hi || r->mmio.len > 8)
            return 0;
        if (r->mmio.is_write) {
            f->mmio_writes++;
        } else {
            memcpy(r->mmio.data, &f->mmio_read_value, r->mmio.len);
            f->mmio_reads++;
        }
        return 1;
    }
    return 0;
}

int kh_run_fast(struct kh_vcpu_fast *f)
{
    for (;;) {
        int rc;
        f->run->exit_reason = 0;  /* as kh_run: a stale reason is never decoded */
        f->in_run = 1;
        rc = ioctl(f->fd, KH_KVM_RUN, 0);
        f->in_run = 0;
        f->exits++;
        if (rc < 0)
            return -errno;
        if (!kh_absorb(f))
            return 0;
        f->absorbed++;
        if (f->budget && f->absorbed >= f->budget)
            return 0;  /* the last absorbed exit is left in kvm_run for the caller */
    }
}
"""
