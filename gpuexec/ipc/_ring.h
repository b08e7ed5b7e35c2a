/* The ring's layout, its writer's publish and the msgpack form of a call id, shared by
 * the two compiled parts: the ring core (_ringcore.c, every function of the rings) and
 * the driver's round trip (../executor/_calltable.c, which writes a request itself). Static inline: each
 * extension has its own copy; the layout is drawn in shm_ring.py, and ringcore_py.py
 * names the same numbers. Include after Python.h. */
#ifndef GPUEXEC_RING_H
#define GPUEXEC_RING_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The ring layout (shm_ring.py draws it; ringcore_py.py names the same numbers). */
#define WRITE_SEQ_OFF 64
#define FUTEX_OFF 72
#define SLEEPING_OFF 128
#define PUBLISHED_OFF 8
#define ONE_READER_SEQ_OFF 192 /* read_seq of a ring with one reader (a reply ring) */
#define SLOT_HEADER 16           /* a slot: length u32, pad u32, publish time u64, payload */
/* A packet holding one frame for every rank (packets.py): kind u8 = 0 (inline),
 * mask_len u16 = 0, n u16 = 1, length u32, then the frame. */
#define ONE_HEAD 9
static const unsigned char ONE_PACKET[5] = {0, 0, 0, 1, 0};
/* The doorbell. */
#define BELL_COUNTER 0
#define BELL_SLEEPING 64

#define SLICE_S 0.05 /* the longest the GIL stays released without a signal check */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t *u64_at(uintptr_t base, uint64_t off) {
    return (uint64_t *)(base + off);
}

static inline uint32_t *u32_at(uintptr_t base, uint64_t off) {
    return (uint32_t *)(base + off);
}

static inline uint64_t load_acq(uintptr_t base, uint64_t off) {
    return __atomic_load_n(u64_at(base, off), __ATOMIC_ACQUIRE);
}

/* FUTEX_WAIT (shared: the word is in a mapping of several processes). 0 when woken or
 * the word already differed, else errno (ETIMEDOUT, EINTR). */
static inline int futex_wait(uint32_t *addr, uint32_t expected, double seconds) {
    struct timespec ts;
    if (seconds < 0)
        seconds = 0;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (r == 0 || errno == EAGAIN)
        return 0;
    return errno;
}

static inline void futex_wake(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Stamp the slot at ``slot_off``, publish it by storing write_seq = seq (release) and
 * its futex word, then, after one full fence (Dekker), wake the ring's readers if any
 * sleeps and, given a doorbell (``bell`` 0: none), its waiter if it sleeps. */
static inline void publish_at(uintptr_t b, uint64_t slot_off, uint64_t seq, uint64_t n_readers,
                       uintptr_t bell) {
    __atomic_store_n(u64_at(b, slot_off + PUBLISHED_OFF), now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(u64_at(b, WRITE_SEQ_OFF), seq, __ATOMIC_RELEASE);
    __atomic_store_n(u32_at(b, FUTEX_OFF), (uint32_t)seq, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    const unsigned char *flags = (const unsigned char *)(b + SLEEPING_OFF);
    for (uint64_t i = 0; i < n_readers; i++) {
        if (__atomic_load_n(flags + i, __ATOMIC_RELAXED)) {
            futex_wake(u32_at(b, FUTEX_OFF));
            break;
        }
    }
    if (bell != 0 && __atomic_load_n(u32_at(bell, BELL_SLEEPING), __ATOMIC_RELAXED)) {
        __atomic_fetch_add(u32_at(bell, BELL_COUNTER), 1, __ATOMIC_SEQ_CST);
        futex_wake(u32_at(bell, BELL_COUNTER));
    }
}

/* Write the head of a packet of one frame of ``length`` bytes for every rank into the slot
 * at ``slot_off`` (its length word too): where the frame goes. */
static inline unsigned char *one_packet_head(uintptr_t b, uint64_t slot_off, uint32_t length) {
    unsigned char *head = (unsigned char *)(b + slot_off + SLOT_HEADER);
    uint32_t total = length + ONE_HEAD;
    uint16_t zero = 0, one = 1;
    memcpy(u32_at(b, slot_off), &total, 4);
    head[0] = 0;
    memcpy(head + 1, &zero, 2);
    memcpy(head + 3, &one, 2);
    memcpy(head + 5, &length, 4);
    return head + ONE_HEAD;
}

/* The msgpack form msgspec gives a non-negative int (its shortest): its length, written
 * at ``out`` (9 bytes at most). */
static inline Py_ssize_t pack_uint(uint64_t v, unsigned char *out) {
    if (v <= 0x7f) {
        out[0] = (unsigned char)v;
        return 1;
    }
    int n = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffull ? 4 : 8;
    out[0] = n == 1 ? 0xcc : n == 2 ? 0xcd : n == 4 ? 0xce : 0xcf;
    for (int i = 0; i < n; i++)
        out[1 + i] = (unsigned char)(v >> (8 * (n - 1 - i)));
    return 1 + n;
}

/* -- attributes kept in a C struct ----------------------------------------------------
 * A base class whose instances keep a few attributes as object fields of a C struct
 * (members, T_OBJECT_EX: NULL until set, like an attribute never assigned), so that
 * compiled code reads and writes them with no attribute lookup while Python reads and
 * writes them as attributes. Python subclasses it (the instance's other attributes stay
 * in its __dict__). Each such type's GC slots are these, over its ``n`` fields from
 * ``first`` on. */
static inline int visit_fields(PyObject *self, PyObject **first, int n, visitproc visit,
                               void *arg) {
    for (int i = 0; i < n; i++)
        Py_VISIT(first[i]);
    Py_VISIT((PyObject *)Py_TYPE(self)); /* a heap type */
    return 0;
}

static inline void clear_fields(PyObject **first, int n) {
    for (int i = 0; i < n; i++)
        Py_CLEAR(first[i]);
}

static inline void free_fields(PyObject *self, PyObject **first, int n) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    clear_fields(first, n);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

/* Such a type: ``prefix``_spec (for PyType_FromSpec), named ``name``, for the struct
 * ``Struct`` whose ``n`` object fields start at ``first``, with ``prefix``_members (its
 * PyMemberDef table, defined before) and ``doc``. */
#define FIELDS_TYPE(prefix, Struct, first, n, name, doc)                                   \
    static int prefix##_traverse(PyObject *self, visitproc visit, void *arg) {             \
        return visit_fields(self, &((Struct *)self)->first, n, visit, arg);                \
    }                                                                                      \
    static int prefix##_clear(PyObject *self) {                                            \
        clear_fields(&((Struct *)self)->first, n);                                         \
        return 0;                                                                          \
    }                                                                                      \
    static void prefix##_dealloc(PyObject *self) {                                         \
        free_fields(self, &((Struct *)self)->first, n);                                    \
    }                                                                                      \
    static PyType_Slot prefix##_slots[] = {                                                \
        {Py_tp_doc, doc},                                                                  \
        {Py_tp_new, PyType_GenericNew},                                                    \
        {Py_tp_dealloc, prefix##_dealloc},                                                 \
        {Py_tp_traverse, prefix##_traverse},                                               \
        {Py_tp_clear, prefix##_clear},                                                     \
        {Py_tp_members, prefix##_members},                                                 \
        {0, NULL},                                                                         \
    };                                                                                     \
    static PyType_Spec prefix##_spec = {                                                   \
        name, sizeof(Struct), 0,                                                           \
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE, prefix##_slots,     \
    }

/* The writer of a request ring, its position: shm_ring.RingWriter's ``_seq`` (messages
 * published: the ring's write_seq), ``_min_read`` (the slowest reader's read_seq when
 * last looked at) and ``_claimed`` (an open claim's view, or None), the fields of its
 * base class WriterFields (the ring core's), which the driver's round trip
 * (../executor/_calltable.c) reads and advances as RingWriter.put_one does. */
typedef struct {
    PyObject_HEAD
    PyObject *seq, *min_read, *claimed;
} WriterFields;
#define WRITER_FIELDS 3

#endif /* GPUEXEC_RING_H */
