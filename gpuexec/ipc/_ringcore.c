/* The compiled ring core: the shared-memory hot path of gpuexec.ipc.shm_ring and
 * gpuexec.ipc.doorbell with real atomics, a real futex, and the GIL released while it
 * spins or sleeps.
 *
 * Every function here has a pure-Python twin in ringcore_py.py with the same name, the
 * same arguments and the same effect on the same bytes (the layout is drawn in
 * shm_ring.py): a compiled driver and a pure-Python worker share a ring. Each takes the
 * segment's memoryview (used by the twin) and its base address (used here).
 *
 * Memory ordering (C11 model, GCC/Clang __atomic builtins):
 *   publish   payload stores, then write_seq with RELEASE; then a SEQ_CST fence before
 *             reading the sleeping flags (Dekker with a sleeping reader)
 *   read      write_seq with ACQUIRE, then the payload
 *   release   read_seq with RELEASE (the reads of the slot happen before the writer
 *             may reuse it); the writer loads read_seq with ACQUIRE
 *   sleep     flag store, SEQ_CST fence, re-check write_seq, FUTEX_WAIT (Dekker)
 *
 * Fork and signals: no thread, no lock, no static mutable state (the attribute names
 * serve() reads are interned once, at import), so a fork at any moment leaves nothing
 * behind. While spinning or sleeping the GIL is released; it is
 * taken back after every futex wait (at most SLICE_S apart, and at once when a signal
 * interrupts the wait) to run Python's signal handlers: an exception they raise
 * (KeyboardInterrupt) leaves the wait. A spin is bounded by its caller (microseconds to
 * milliseconds) and also stops to check signals every SLICE_S. serve() holds the GIL
 * while it runs a worker's method, which is Python code: its handlers run there.
 *
 * Built against the limited API (abi3): one wheel for every CPython >= 3.10.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <dlfcn.h>
#include <math.h>

#include "_ring.h" /* the layout, the clock, the futex and the publish (shared) */
#include "_plain.h" /* plain msgpack data: a call's arguments and results (shared) */
#include "_collect.h" /* the driver's wait for replies (shared) */

/* -- argument parsing ------------------------------------------------------------- */

static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want,
                     nargs);
        return 0;
    }
    return 1;
}

static int as_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *out = (uint64_t)v;
    return 1;
}

static int as_double(PyObject *o, double *out) {
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred())
        return 0;
    *out = v;
    return 1;
}

/* -- the ring (its publish_at and one_packet_head: _ring.h) ------------------------ */

static PyObject *core_fence(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    (void)args;
    if (!nargs_ok(nargs, 0, "fence"))
        return NULL;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* published(view, base) -> write_seq, loaded with acquire. */
static PyObject *core_published(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base;
    if (!nargs_ok(nargs, 2, "published") || !as_u64(args[1], &base))
        return NULL;
    return PyLong_FromUnsignedLongLong(load_acq((uintptr_t)base, WRITE_SEQ_OFF));
}

/* publish(view, base, slot_off, seq, n_readers, bell_view, bell_base): stamp the
 * slot, publish message ``seq - 1`` by storing write_seq = seq (release) and its futex
 * word, then, after one full fence (Dekker), wake the ring's readers if any sleeps and,
 * given a doorbell (bell_base 0: none), its waiter if it sleeps (what ring() does,
 * without a second fence). */
static PyObject *core_publish(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, slot_off, seq, n_readers, bell;
    if (!nargs_ok(nargs, 7, "publish") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &slot_off) || !as_u64(args[3], &seq) ||
        !as_u64(args[4], &n_readers) || !as_u64(args[6], &bell))
        return NULL;
    publish_at((uintptr_t)base, slot_off, seq, n_readers, (uintptr_t)bell);
    Py_RETURN_NONE;
}

/* put_one(view, base, slot_off, frame, seq, n_readers, bell_view, bell_base): write a
 * packet of one frame for every rank (``frame``: bytes) into the slot at ``slot_off``
 * (the caller made sure it is free and fits) and publish it as publish() does: the
 * whole send of a one-frame message in one call. */
static PyObject *core_put_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, slot_off, seq, n_readers, bell;
    if (!nargs_ok(nargs, 8, "put_one") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &slot_off) || !as_u64(args[4], &seq) ||
        !as_u64(args[5], &n_readers) || !as_u64(args[7], &bell))
        return NULL;
    char *frame;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(args[3], &frame, &n) < 0)
        return NULL;
    uintptr_t b = (uintptr_t)base;
    memcpy(one_packet_head(b, slot_off, (uint32_t)n), frame, (size_t)n);
    publish_at(b, slot_off, seq, n_readers, (uintptr_t)bell);
    Py_RETURN_NONE;
}

/* release(view, base, off, seq): store this reader's read_seq (release). */
static PyObject *core_release(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, off, seq;
    if (!nargs_ok(nargs, 4, "release") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &off) || !as_u64(args[3], &seq))
        return NULL;
    __atomic_store_n(u64_at((uintptr_t)base, off), seq, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* min_read(view, base, first_off, n_readers) -> the slowest reader's read_seq. */
static PyObject *core_min_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, first, n;
    if (!nargs_ok(nargs, 4, "min_read") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &first) || !as_u64(args[3], &n))
        return NULL;
    uint64_t lo = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = load_acq((uintptr_t)base, first + 64 * i);
        if (v < lo)
            lo = v;
    }
    return PyLong_FromUnsignedLongLong(n ? lo : 0);
}

/* take_frame(view, base, reader_off, data_off, n_slots, slot_size, max_len) ->
 * (frame, published_ns) | None: the next message of the reader whose read_seq is at
 * ``reader_off`` in a ring of that shape, when it is a packet of one frame of at most
 * ``max_len`` bytes for every rank: its frame copied out (bytes), its publish time, and
 * the slot released at once. None, leaving it where it is, for any other message (a
 * longer or truncated one too: a long frame is better read in place) or none. */
/* The core of take_frame (GIL held): 1 with *frame (new bytes) and *stamp set and the
 * slot released; 0 when the next message is not such a packet, or there is none; -1 with
 * an exception set (no memory: the message left in place). */
static int take_frame_at(uintptr_t b, uint64_t reader_off, uint64_t data_off,
                         uint64_t n_slots, uint64_t slot_size, uint64_t max_len,
                         PyObject **frame, uint64_t *stamp) {
    uint64_t seq, slot;
    if (!next_slot(b, reader_off, data_off, n_slots, slot_size, &seq, &slot))
        return 0;
    uint32_t length;
    const unsigned char *at = one_frame_at(b, slot, slot_size, max_len, &length);
    if (at == NULL)
        return 0;
    *stamp = __atomic_load_n(u64_at(b, slot + PUBLISHED_OFF), __ATOMIC_RELAXED);
    *frame = PyBytes_FromStringAndSize((const char *)at, length);
    if (*frame == NULL)
        return -1;
    __atomic_store_n(u64_at(b, reader_off), seq + 1, __ATOMIC_RELEASE);
    return 1;
}

/* (frame, published_ns) for a frame take_frame_at copied out; the reference to
 * ``frame`` is consumed. The slot is released: on failure the message is lost with it. */
static PyObject *taken_pair(PyObject *frame, uint64_t stamp) {
    PyObject *ns = PyLong_FromUnsignedLongLong(stamp);
    PyObject *out = ns == NULL ? NULL : PyTuple_Pack(2, frame, ns);
    Py_XDECREF(ns);
    Py_DECREF(frame);
    return out;
}

static PyObject *core_take_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, reader_off, data_off, n_slots, slot_size, max_len, stamp;
    PyObject *frame;
    if (!nargs_ok(nargs, 7, "take_frame") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &reader_off) || !as_u64(args[3], &data_off) ||
        !as_u64(args[4], &n_slots) || !as_u64(args[5], &slot_size) ||
        !as_u64(args[6], &max_len))
        return NULL;
    int got = take_frame_at((uintptr_t)base, reader_off, data_off, n_slots, slot_size,
                            max_len, &frame, &stamp);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return taken_pair(frame, stamp);
}

/* Wait until write_seq > seq: spin (GIL released) until ``spin_until``, then sleep on
 * the futex word with the Dekker handshake on this reader's flag at ``flag_off`` until
 * ``sleep_until`` (monotonic seconds; inf: no limit). 1 once it is; 0 when that passes
 * first; -1 when a signal handler raised. Called with the GIL held; returns with it.
 * ``slot`` (0: none) is where the message waited for lies: its first two cache lines
 * are fetched as it arrives, while the GIL is taken back (a request with arguments spans
 * two: fetched one after the other, they would be two misses in a row). */
static int wait_seq(uintptr_t b, uint64_t seq, uint64_t flag_off, double spin_until,
                    double sleep_until, uint64_t slot) {
    if (load_acq(b, WRITE_SEQ_OFF) > seq)
        return 1;
    int ok = 0, failed = 0;
    PyThreadState *ts = PyEval_SaveThread();
    double check_at = now_s() + SLICE_S;
    for (unsigned n = 0;; n++) {
        if (load_acq(b, WRITE_SEQ_OFF) > seq) {
            ok = 1;
            break;
        }
        if ((n & 31) == 0) {
            int tick = spin_tick(spin_until, &check_at, &ts);
            if (tick != 0) {
                failed = tick < 0;
                break;
            }
        }
        CPU_RELAX();
    }
    unsigned char *flag = (unsigned char *)(b + flag_off);
    uint32_t *word = u32_at(b, FUTEX_OFF);
    while (!ok && !failed) {
        double left = sleep_until - now_s();
        if (left <= 0)
            break;
        __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint32_t expected = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (load_acq(b, WRITE_SEQ_OFF) <= seq)
            futex_wait(word, expected, left < SLICE_S ? left : SLICE_S);
        __atomic_store_n(flag, 0, __ATOMIC_RELAXED);
        if (load_acq(b, WRITE_SEQ_OFF) > seq) {
            ok = 1;
            break;
        }
        if (check_signals(&ts) < 0)
            failed = 1;
    }
    if (ok && slot) {
        __builtin_prefetch((const void *)(b + slot));
        __builtin_prefetch((const void *)(b + slot + 64));
    }
    PyEval_RestoreThread(ts);
    return failed ? -1 : ok;
}

/* wait(view, base, seq, flag_off, spin_until, sleep_until) -> bool: True once
 * write_seq > seq (see wait_seq); False when ``sleep_until`` passes first. */
static PyObject *core_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, seq, flag_off;
    double spin_until, sleep_until;
    if (!nargs_ok(nargs, 6, "wait") || !as_u64(args[1], &base) || !as_u64(args[2], &seq) ||
        !as_u64(args[3], &flag_off) || !as_double(args[4], &spin_until) ||
        !as_double(args[5], &sleep_until))
        return NULL;
    int got = wait_seq((uintptr_t)base, seq, flag_off, spin_until, sleep_until, 0);
    if (got < 0)
        return NULL;
    return PyBool_FromLong(got);
}

/* next_frame(view, base, reader_off, flag_off, data_off, n_slots, slot_size, max_len,
 * spin, timeout) -> (frame, published_ns) | True | False: a reader's wait for its next
 * message (spinning ``spin`` seconds, then asleep until ``timeout`` seconds have passed;
 * inf: no limit) and, when that is a packet of one frame of at most ``max_len`` bytes for
 * every rank, its take (as take_frame) in the same call: the worker's wait for a
 * request. True when the message is another kind (left in place, to read in place);
 * False when the timeout passes first. The reader's position is its read_seq. */
static PyObject *core_next_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, reader_off, flag_off, data_off, n_slots, slot_size, max_len, stamp;
    double spin, timeout;
    if (!nargs_ok(nargs, 10, "next_frame") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &reader_off) || !as_u64(args[3], &flag_off) ||
        !as_u64(args[4], &data_off) || !as_u64(args[5], &n_slots) ||
        !as_u64(args[6], &slot_size) || !as_u64(args[7], &max_len) ||
        !as_double(args[8], &spin) || !as_double(args[9], &timeout))
        return NULL;
    if (n_slots == 0) {
        PyErr_SetString(PyExc_ValueError, "next_frame(): a ring has slots");
        return NULL;
    }
    uintptr_t b = (uintptr_t)base;
    uint64_t seq = __atomic_load_n(u64_at(b, reader_off), __ATOMIC_RELAXED);
    double start = load_acq(b, WRITE_SEQ_OFF) > seq ? 0.0 : now_s(); /* no clock if there */
    double sleep_until = start + timeout; /* inf stays inf */
    int got = wait_seq(b, seq, flag_off, start + (spin < timeout ? spin : timeout),
                       sleep_until, data_off + (seq % n_slots) * slot_size);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    PyObject *frame;
    got = take_frame_at(b, reader_off, data_off, n_slots, slot_size, max_len, &frame, &stamp);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    return taken_pair(frame, stamp);
}

/* -- the doorbell and the gather ------------------------------------------------------ */

/* ring(view, base): wake the doorbell's waiter if it sleeps (after a full fence). */
static PyObject *core_ring(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base;
    if (!nargs_ok(nargs, 2, "ring") || !as_u64(args[1], &base))
        return NULL;
    uintptr_t b = (uintptr_t)base;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!__atomic_load_n(u32_at(b, BELL_SLEEPING), __ATOMIC_RELAXED))
        Py_RETURN_NONE;
    __atomic_fetch_add(u32_at(b, BELL_COUNTER), 1, __ATOMIC_SEQ_CST);
    futex_wake(u32_at(b, BELL_COUNTER));
    Py_RETURN_NONE;
}

/* poke(view, base): move the counter whether or not the waiter sleeps, and wake it:
 * a gather that took its epoch before this returns at once. */
static PyObject *core_poke(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base;
    if (!nargs_ok(nargs, 2, "poke") || !as_u64(args[1], &base))
        return NULL;
    uintptr_t b = (uintptr_t)base;
    __atomic_fetch_add(u32_at(b, BELL_COUNTER), 1, __ATOMIC_SEQ_CST);
    futex_wake(u32_at(b, BELL_COUNTER));
    Py_RETURN_NONE;
}

/* epoch(view, base) -> the doorbell's counter, to hand to gather(). */
static PyObject *core_epoch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base;
    if (!nargs_ok(nargs, 2, "epoch") || !as_u64(args[1], &base))
        return NULL;
    return PyLong_FromUnsignedLong(
        __atomic_load_n(u32_at((uintptr_t)base, BELL_COUNTER), __ATOMIC_ACQUIRE));
}

/* Which of the reply rings hold a message: bit i of the mask for ring i. */
static int ready_mask(const uintptr_t *bases, Py_ssize_t n, uint64_t *mask, Py_ssize_t words) {
    int any = 0;
    for (Py_ssize_t w = 0; w < words; w++)
        mask[w] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (load_acq(bases[i], WRITE_SEQ_OFF) > load_acq(bases[i], ONE_READER_SEQ_OFF)) {
            mask[i / 64] |= 1ull << (i % 64);
            any = 1;
        }
    }
    return any;
}

static PyObject *mask_to_int(const uint64_t *mask, Py_ssize_t words) {
    PyObject *out = PyLong_FromUnsignedLongLong(mask[words - 1]);
    for (Py_ssize_t w = words - 2; out != NULL && w >= 0; w--) {
        PyObject *shift = PyLong_FromLong(64);
        PyObject *low = PyLong_FromUnsignedLongLong(mask[w]);
        PyObject *shifted = shift ? PyNumber_Lshift(out, shift) : NULL;
        PyObject *joined = (shifted && low) ? PyNumber_Or(shifted, low) : NULL;
        Py_XDECREF(shift);
        Py_XDECREF(low);
        Py_XDECREF(shifted);
        Py_DECREF(out);
        out = joined;
    }
    return out;
}

struct rings {
    const uintptr_t *bases;
    Py_ssize_t n;
    uint64_t *mask;
    Py_ssize_t words;
};

static int any_ready(void *ctx, int settled) {
    (void)settled;
    struct rings *r = ctx;
    return ready_mask(r->bases, r->n, r->mask, r->words);
}

/* gather(views, bases, bell_view, bell_base, epoch, spin_until, sleep_until) -> mask:
 * bit i set when reply ring i (a ring of one reader) holds a message. Spins over the
 * rings (GIL released) until ``spin_until``, then sleeps on the doorbell with its
 * handshake until ``sleep_until``; 0 when that passes, or at once when the doorbell's
 * counter is no longer ``epoch`` (poked: the caller re-checks its call). */
static PyObject *core_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t bell, epoch;
    double spin_until, sleep_until;
    if (!nargs_ok(nargs, 7, "gather") || !as_u64(args[3], &bell) ||
        !as_u64(args[4], &epoch) || !as_double(args[5], &spin_until) ||
        !as_double(args[6], &sleep_until))
        return NULL;
    PyObject *seq = args[1];
    if (!PyTuple_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "gather() wants a tuple of ring addresses");
        return NULL;
    }
    Py_ssize_t n = PyTuple_Size(seq); /* 0: sleep on the doorbell alone */
    Py_ssize_t words = n > 0 ? (n + 63) / 64 : 1;
    uintptr_t small_bases[64];
    uint64_t small_mask[1];
    uintptr_t *bases = n <= 64 ? small_bases : PyMem_Malloc(sizeof(uintptr_t) * (size_t)n);
    uint64_t *mask = words == 1 ? small_mask : PyMem_Malloc(sizeof(uint64_t) * (size_t)words);
    PyObject *out = NULL;
    if (bases == NULL || mask == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        if (!as_u64(PyTuple_GetItem(seq, i), &v))
            goto done;
        bases[i] = (uintptr_t)v;
    }
    struct rings rings = {bases, n, mask, words};
    int got = wait_bell((uintptr_t)bell, (uint32_t)epoch, spin_until, sleep_until, any_ready,
                        &rings);
    if (got >= 0)
        out = got ? mask_to_int(mask, words) : PyLong_FromLong(0);
done:
    if (bases != NULL && bases != small_bases)
        PyMem_Free(bases);
    if (mask != NULL && mask != small_mask)
        PyMem_Free(mask);
    return out;
}

/* collect(views, bases, bell_view, bell_base, data_off, n_slots, slot_size, max_len,
 * befores, afters, epoch, spin_until, sleep_until, middle, want) -> (taken, framed, other,
 * frames): wait as gather() does for the reply rings in the mask ``want`` (up to 64 rings
 * of one reader, all of that shape), releasing in each the reply that is exactly
 * ``befores[i] + middle + afters[i]`` (the awaited call's None result, known by its
 * bytes) as it comes (bit set in ``taken``), until every wanted ring gave that reply or
 * holds another message (after ``spin_until``: until any holds another message), the
 * deadline passes or the doorbell is poked. Then each ring
 * holding another message that is a packet of one frame of at most ``max_len`` bytes
 * has that frame copied out and released (bit set in ``framed``, the frames in
 * ``frames`` in ring order, as take_frame gives them); any other message is left in
 * place (bit set in ``other``). The driver's whole wait for a call's replies in one
 * call; the arguments that do not change from call to call come first (to bind them
 * once). */
static PyObject *core_collect(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t bell, epoch, max_len;
    double spin_until, sleep_until;
    struct awaited w;
    if (!nargs_ok(nargs, 15, "collect") || !as_u64(args[3], &bell) ||
        !as_u64(args[4], &w.data_off) || !as_u64(args[5], &w.n_slots) ||
        !as_u64(args[6], &w.slot_size) || !as_u64(args[7], &max_len) ||
        !as_u64(args[10], &epoch) || !as_double(args[11], &spin_until) ||
        !as_double(args[12], &sleep_until) || !as_u64(args[14], &w.want))
        return NULL;
    PyObject *seq = args[1], *befores = args[8], *afters = args[9];
    if (!PyTuple_Check(seq) || !PyTuple_Check(befores) || !PyTuple_Check(afters)) {
        PyErr_SetString(PyExc_TypeError, "collect() wants tuples of addresses and bytes");
        return NULL;
    }
    w.n = PyTuple_Size(seq);
    if (w.n > 64 || PyTuple_Size(befores) != w.n || PyTuple_Size(afters) != w.n ||
        (w.n < 64 && (w.want >> w.n) != 0) || w.n_slots == 0) {
        PyErr_SetString(PyExc_ValueError, "collect(): up to 64 rings, a part for each");
        return NULL;
    }
    char *text;
    if (PyBytes_AsStringAndSize(args[13], &text, &w.middle_len) < 0)
        return NULL;
    w.middle = text;
    for (Py_ssize_t i = 0; i < w.n; i++) {
        uint64_t v;
        char *before, *after;
        if (!as_u64(PyTuple_GetItem(seq, i), &v) ||
            PyBytes_AsStringAndSize(PyTuple_GetItem(befores, i), &before, &w.before_len[i]) < 0 ||
            PyBytes_AsStringAndSize(PyTuple_GetItem(afters, i), &after, &w.after_len[i]) < 0)
            return NULL;
        w.bases[i] = (uintptr_t)v;
        w.before[i] = before;
        w.after[i] = after;
    }
    w.taken = w.other = 0;
    /* The bytes objects stay alive: the caller holds them, and the GIL is released only
     * inside this call, whose arguments it keeps. */
    if (wait_bell((uintptr_t)bell, (uint32_t)epoch, spin_until, sleep_until, scan_awaited,
                  &w) < 0)
        return NULL;
    /* A failure from here on (no memory) raises with this pass's replies released and
     * lost, as take_frame loses its message: the call ends by its timeout or a close. */
    uint64_t framed = 0;
    PyObject *frames = NULL, *out = NULL;
    for (uint64_t open = w.other; open; open &= open - 1) {
        Py_ssize_t i = __builtin_ctzll(open);
        PyObject *frame;
        uint64_t stamp;
        int got = take_frame_at(w.bases[i], ONE_READER_SEQ_OFF, w.data_off, w.n_slots,
                                w.slot_size, max_len, &frame, &stamp);
        if (got < 0)
            goto fail;
        if (got == 0)
            continue;
        if (frames == NULL && (frames = PyList_New(0)) == NULL) {
            Py_DECREF(frame);
            goto fail;
        }
        int appended = PyList_Append(frames, frame);
        Py_DECREF(frame);
        if (appended < 0)
            goto fail;
        framed |= 1ull << i;
    }
    w.other &= ~framed;
    PyObject *taken = PyLong_FromUnsignedLongLong(w.taken);
    PyObject *framed_int = PyLong_FromUnsignedLongLong(framed);
    PyObject *other = PyLong_FromUnsignedLongLong(w.other);
    if (frames == NULL)
        frames = PyTuple_New(0);
    if (taken && framed_int && other && frames)
        out = PyTuple_Pack(4, taken, framed_int, other, frames);
    Py_XDECREF(taken);
    Py_XDECREF(framed_int);
    Py_XDECREF(other);
fail:
    Py_XDECREF(frames);
    return out;
}

/* -- the worker's request loop ------------------------------------------------------- */

/* Attribute names the serving loop reads and stores (interned once, at import). */
static PyObject *S_RECHECK, *S_RUNNING, *S_METHOD, *S_ARMED, *S_CLOSED, *S_FN, *S_VALUE_RANK,
    *S_ARGS, *S_KWARGS, *S_CALL_ID, *S_DUNDER;

/* The worker's cancellation point (worker/cancel.py: CancelPoint's ``running``,
 * ``method``, ``armed``, ``recheck``) and its reply gate's ``closed`` (worker/deferred.py:
 * ReplyGate), the fields of their base classes CancelFields and GateFields (attributes
 * kept in a C struct, _ring.h) where this core is built: serve() reads and writes them
 * per call with no attribute lookup. Any other object's attributes it reads and writes
 * as attributes (fields_of). */
typedef struct {
    PyObject_HEAD
    PyObject *running, *method, *armed, *recheck;
} CancelFields;
#define CANCEL_FIELDS 4

typedef struct {
    PyObject_HEAD
    PyObject *closed;
} GateFields;
#define GATE_FIELDS 1

static PyTypeObject *CancelFieldsType, *GateFieldsType;

/* Where serve() finds the attributes it reads and writes: for each of its objects, the
 * address of each field when the object is one of this core's field types, else NULL
 * (the attribute, by name). */
struct fields_of {
    PyObject *cancel, *gate;
    PyObject **running, **method, **armed, **recheck, **closed;
};

static void find_fields(struct fields_of *f, PyObject *cancel, PyObject *gate) {
    int c = PyObject_TypeCheck(cancel, CancelFieldsType);
    int g = PyObject_TypeCheck(gate, GateFieldsType);
    CancelFields *cf = (CancelFields *)cancel;
    f->cancel = cancel;
    f->gate = gate;
    f->running = c ? &cf->running : NULL;
    f->method = c ? &cf->method : NULL;
    f->armed = c ? &cf->armed : NULL;
    f->recheck = c ? &cf->recheck : NULL;
    f->closed = g ? &((GateFields *)gate)->closed : NULL;
}

/* ``obj.name``, from its field when ``field`` is not NULL: whether it is true, 1 or 0;
 * -1 with an exception set (AttributeError for an unset field, as reading it raises). */
static int true_at(PyObject *obj, PyObject **field, PyObject *name) {
    PyObject *v = field == NULL ? PyObject_GetAttr(obj, name) : Py_XNewRef(*field);
    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_AttributeError, name);
        return -1;
    }
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* ``obj.name = value``, into its field when ``field`` is not NULL: 0, or -1 with an
 * exception set. */
static int set_at(PyObject *obj, PyObject **field, PyObject *name, PyObject *value) {
    if (field == NULL)
        return PyObject_SetAttr(obj, name, value);
    PyObject *old = *field;
    *field = Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

/* The non-negative msgpack int at ``p`` (``left`` bytes there): its length, 0 if none. */
static Py_ssize_t unpack_uint(const unsigned char *p, Py_ssize_t left, uint64_t *v) {
    if (left < 1)
        return 0;
    int n = p[0] <= 0x7f ? 0 : p[0] == 0xcc ? 1 : p[0] == 0xcd ? 2 : p[0] == 0xce ? 4
                                             : p[0] == 0xcf ? 8 : -1;
    if (n < 0 || left < 1 + n)
        return 0;
    if (n == 0) {
        *v = p[0];
        return 1;
    }
    uint64_t out = 0;
    for (int i = 0; i < n; i++)
        out = out << 8 | p[1 + i];
    *v = out;
    return 1 + n;
}

/* A bare call in the slot at ``slot``: a packet of one frame for every rank that is
 * ``before`` + a call id + a rest (the method's part of the header). 1 with *id, *rest,
 * *rest_len set; 0 for any other message. */
static int bare_call_at(uintptr_t b, uint64_t slot, uint64_t slot_size, const char *before,
                        Py_ssize_t before_len, uint64_t *id, const unsigned char **rest,
                        Py_ssize_t *rest_len) {
    uint32_t length;
    const unsigned char *frame = one_frame_at(b, slot, slot_size, UINT32_MAX, &length);
    if (frame == NULL || (Py_ssize_t)length <= before_len ||
        memcmp(frame, before, (size_t)before_len))
        return 0;
    const unsigned char *at = frame + before_len;
    Py_ssize_t left = (Py_ssize_t)length - before_len;
    Py_ssize_t n = unpack_uint(at, left, id);
    /* a bare call's header ends with no arguments ([] {}) and every rank's value (-1):
     * any other call (one with arguments) is not looked up in ``calls`` */
    if (n == 0 || left - n < 4 || memcmp(frame + length - 3, "\x90\x80\xff", 3) != 0)
        return 0;
    *rest = at + n;
    *rest_len = left - n;
    return 1;
}

/* The method name at t->at (a msgpack str), the last one read when the bytes are the
 * same (*last: owned, kept across calls: a loop calls one method or a few): a new
 * reference; NULL with no exception set when there is no str there. */
static PyObject *name_at(Text *t, PyObject **last) {
    uint64_t n;
    unsigned char c = t->at < t->end ? *t->at : 0;
    if (c >= 0xa0 && c <= 0xbf) {
        n = c & 0x1f;
        t->at += 1;
    } else if (c == 0xd9 && t->end - t->at >= 2) {
        n = t->at[1];
        t->at += 2;
    } else {
        return NULL;
    }
    if ((uint64_t)(t->end - t->at) < n)
        return NULL;
    Py_ssize_t had_len;
    const char *had = *last == NULL ? NULL : PyUnicode_AsUTF8AndSize(*last, &had_len);
    if (had != NULL && (uint64_t)had_len == n && memcmp(had, t->at, n) == 0) {
        t->at += n;
        return Py_NewRef(*last);
    }
    PyErr_Clear();
    PyObject *name = PyUnicode_DecodeUTF8((const char *)t->at, (Py_ssize_t)n, NULL);
    if (name == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear(); /* the decoder counts it */
        return NULL;
    }
    t->at += n;
    Py_XDECREF(*last);
    *last = Py_NewRef(name);
    return name;
}

/* -- keyword arguments by name ----------------------------------------------------------
 * The limited API this build targets (3.10) passes keyword arguments as a dict, which
 * CPython turns back into a tuple of names and a row of values on every call.
 * PyObject_Vectorcall takes those directly (the stable ABI from 3.12; exported with the
 * same signature since 3.9): found at import (NULL: the dict), it lets a call with plain
 * keyword arguments pass their values as read and their names as a tuple kept from call
 * to call (a loop calls one method or a few). The names are interned, so the method
 * finds its parameters by identity, as for names written in code; a process interns at
 * most NAMES_INTERNED names this way (names made up at run time, from a dict of data
 * passed as keywords, would otherwise be kept for good from 3.12 on), then it stops. */
typedef PyObject *(*vectorcall_fn)(PyObject *, PyObject *const *, size_t, PyObject *);
static vectorcall_fn vectorcall;
#define VECTORCALL_OFFSET ((size_t)1 << (8 * sizeof(size_t) - 1)) /* its ARGUMENTS_OFFSET */
#define KW_MAX 15         /* keyword arguments passed by name at most (a fixmap) */
#define POSITIONAL_MAX 32 /* with at most this many positional ones (more: the dict) */
#define NAMES_INTERNED 4096
static long names_interned;

/* A call's keyword arguments read for vectorcall: ``n`` values (owned) and their names. */
struct keywords {
    Py_ssize_t n;
    PyObject *names; /* a tuple (owned), also kept in the loop's cache */
    PyObject *values[KW_MAX];
};

static void keywords_clear(struct keywords *kw) {
    for (Py_ssize_t i = 0; i < kw->n; i++)
        Py_CLEAR(kw->values[i]);
    Py_CLEAR(kw->names);
    kw->n = 0;
}

/* The str at t->at (fixstr or str 8, as msgspec writes a keyword's name): 1 with its
 * bytes at *at, *len, t->at moved past them; 0 for anything else. */
static int name_bytes(Text *t, const unsigned char **at, Py_ssize_t *len) {
    unsigned char c = t->at < t->end ? *t->at : 0;
    Py_ssize_t head = c >= 0xa0 && c <= 0xbf ? 1 : c == 0xd9 && t->end - t->at >= 2 ? 2 : 0;
    if (head == 0)
        return 0;
    *len = head == 1 ? (Py_ssize_t)(c & 0x1f) : (Py_ssize_t)t->at[1];
    if (t->end - t->at - head < *len)
        return 0;
    *at = t->at + head;
    t->at += head + *len;
    return 1;
}

/* The ``n`` pairs of a map of keyword arguments at t->at into ``kw``: each value read as
 * get_plain reads it; the names the tuple in *cache when they are its (by their bytes),
 * else a new tuple of them, interned, which replaces it. 1; 0 when the map is not plain
 * data, or names a keyword twice (the decoder takes it: a dict keeps the last); -1 with
 * an exception set. */
static int get_keywords(Text *t, Py_ssize_t n, PyObject **cache, struct keywords *kw) {
    const unsigned char *at[KW_MAX];
    Py_ssize_t len[KW_MAX];
    int same = *cache != NULL && PyTuple_Size(*cache) == n;
    kw->n = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!name_bytes(t, &at[i], &len[i]))
            goto not_plain;
        if (same) {
            Py_ssize_t had_len;
            const char *had = PyUnicode_AsUTF8AndSize(PyTuple_GetItem(*cache, i), &had_len);
            same = had != NULL && had_len == len[i] && memcmp(had, at[i], (size_t)len[i]) == 0;
        }
        int rc = get_plain(t, 1, &kw->values[i]);
        if (rc <= 0) {
            keywords_clear(kw);
            return rc;
        }
        kw->n = i + 1;
    }
    if (same) {
        kw->names = Py_NewRef(*cache);
        return 1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < i; j++)
            if (len[i] == len[j] && memcmp(at[i], at[j], (size_t)len[i]) == 0)
                goto not_plain; /* named twice */
    PyObject *names = PyTuple_New(n);
    for (Py_ssize_t i = 0; names != NULL && i < n; i++) {
        PyObject *name = PyUnicode_DecodeUTF8((const char *)at[i], len[i], NULL);
        if (name == NULL) {
            Py_CLEAR(names);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear(); /* not UTF-8: the decoder counts it */
                goto not_plain;
            }
            break;
        }
        if (names_interned < NAMES_INTERNED) {
            names_interned++;
            PyUnicode_InternInPlace(&name);
        }
        PyTuple_SetItem(names, i, name); /* steals it; a new tuple: cannot fail */
    }
    if (names == NULL) {
        keywords_clear(kw);
        return -1;
    }
    Py_XDECREF(*cache);
    *cache = Py_NewRef(names); /* the loop's, for the next call */
    kw->names = names;
    return 1;
not_plain:
    keywords_clear(kw);
    return 0;
}

/* A call by name with plain arguments in the slot at ``slot``, a packet of one frame of
 * at most ``max_len`` bytes for every rank: ``before`` + id + the method's name (no
 * dunder) + nil (no callable) + its arguments + its keyword arguments (not both empty:
 * the request loop learns the names of bare calls) + -1 (every rank's value), read as
 * msgspec reads it (_plain.h) without the Python decoder. 1 with *id and new references
 * in *name, *call_args (a tuple) and *call_kwargs (a dict; NULL when empty); 0 for any
 * other message (the Python decoder's); -1 with an exception set. */
static int plain_call_at(uintptr_t b, uint64_t slot, uint64_t slot_size, uint64_t max_len,
                         const char *before, Py_ssize_t before_len, PyObject **last,
                         PyObject **names, uint64_t *id, PyObject **name,
                         PyObject **call_args, PyObject **call_kwargs, struct keywords *kw) {
    uint32_t length;
    const unsigned char *frame = one_frame_at(b, slot, slot_size, max_len, &length);
    if (frame == NULL || (Py_ssize_t)length <= before_len ||
        memcmp(frame, before, (size_t)before_len))
        return 0;
    Text t = {frame + before_len, frame + length};
    Py_ssize_t n = unpack_uint(t.at, t.end - t.at, id);
    if (n == 0)
        return 0;
    t.at += n;
    PyObject *nm = name_at(&t, last), *a = NULL, *k = NULL;
    if (nm == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int rc = 0;
    if (PyUnicode_Tailmatch(nm, S_DUNDER, 0, PY_SSIZE_T_MAX, -1) != 0 || t.at >= t.end ||
        *t.at++ != 0xc0)
        goto end;
    if ((rc = get_args(&t, &a)) <= 0)
        goto end;
    unsigned char c = t.at < t.end ? *t.at : 0;
    if (vectorcall != NULL && c > 0x80 && c <= 0x80 + KW_MAX &&
        PyTuple_Size(a) <= POSITIONAL_MAX) { /* keywords by name (see get_keywords) */
        t.at++;
        if ((rc = get_keywords(&t, c & 0x0f, names, kw)) <= 0)
            goto end;
    } else if (!((c >= 0x80 && c <= 0x8f) || c == 0xde || c == 0xdf) ||
               (rc = get_plain(&t, 0, &k)) <= 0) {
        goto end;
    }
    rc = 0;
    if (t.end - t.at != 1 || *t.at != 0xff ||
        (PyTuple_Size(a) == 0 && kw->n == 0 && (k == NULL || PyDict_Size(k) == 0)))
        goto end;
    *name = nm;
    *call_args = a;
    *call_kwargs = k != NULL && PyDict_Size(k) ? Py_NewRef(k) : NULL;
    Py_XDECREF(k);
    return 1;
end:
    if (PyErr_Occurred() && rc >= 0)
        PyErr_Clear(); /* (the dunder check cannot fail on a str) */
    Py_DECREF(nm);
    Py_XDECREF(a);
    Py_XDECREF(k);
    keywords_clear(kw);
    return rc < 0 ? -1 : 0;
}

#define RECORDS 33 /* arrivals kept for the forecast: its history (32 gaps) and one */

/* What serve() keeps of the calls it answered: when each request was published and
 * when its reply left (the forecast's two anchors), the last RECORDS of them. */
struct records {
    uint64_t stamp[RECORDS];
    double replied[RECORDS];
    unsigned long n;
};

static PyObject *records_list(const struct records *r) {
    if (r->n == 0)
        Py_RETURN_NONE;
    unsigned long first = r->n > RECORDS ? r->n - RECORDS : 0;
    PyObject *out = PyList_New((Py_ssize_t)(r->n - first));
    for (unsigned long k = first; out != NULL && k < r->n; k++) {
        PyObject *pair = Py_BuildValue("(Kd)", (unsigned long long)r->stamp[k % RECORDS],
                                       r->replied[k % RECORDS]);
        if (pair == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SetItem(out, (Py_ssize_t)(k - first), pair);
    }
    return out;
}

/* The bound method ``name`` of ``target`` when it is one a bare call may run now (the
 * serving loop's state allows it and it is callable): a new reference; NULL with no
 * exception set when the call must be left to Python; NULL with one set on failure. */
static PyObject *runnable(PyObject *target, PyObject *name, const struct fields_of *f) {
    int recheck = true_at(f->cancel, f->recheck, S_RECHECK); /* a cancelled call queued? */
    if (recheck != 0)
        return NULL;
    PyObject *method = PyObject_GetAttr(target, name);
    if (method == NULL || !PyCallable_Check(method)) {
        PyErr_Clear(); /* Python's loop answers it (AttributeError) */
        Py_XDECREF(method);
        return NULL;
    }
    return method;
}

/* Run ``method`` as the request loop runs a call's method, armed for cancellation
 * (cancel.running / method / armed, as CancelPoint expects), with ``call_args`` (a tuple;
 * NULL: none) and ``call_kwargs`` (a dict; NULL: none): its result, or NULL with the
 * exception it raised moved into *error. */
static PyObject *run_armed(PyObject *method, PyObject *call_args, PyObject *call_kwargs,
                           const struct keywords *kw, const struct fields_of *f,
                           PyObject *id, PyObject *name, PyObject **error) {
    *error = NULL;
    PyObject *cancel = f->cancel;
    if (set_at(cancel, f->running, S_RUNNING, id) < 0 ||
        set_at(cancel, f->method, S_METHOD, name) < 0 ||
        set_at(cancel, f->armed, S_ARMED, Py_True) < 0)
        return NULL;
    PyObject *value;
    if (kw->n > 0) { /* keywords by name (get_keywords): one row, the first slot spare */
        PyObject *row[1 + POSITIONAL_MAX + KW_MAX];
        Py_ssize_t n_pos = PyTuple_Size(call_args);
        for (Py_ssize_t i = 0; i < n_pos; i++)
            row[1 + i] = PyTuple_GetItem(call_args, i);
        for (Py_ssize_t i = 0; i < kw->n; i++)
            row[1 + n_pos + i] = kw->values[i];
        value = vectorcall(method, row + 1, (size_t)n_pos | VECTORCALL_OFFSET, kw->names);
    } else {
        value = call_args == NULL ? PyObject_CallNoArgs(method)
                                  : PyObject_Call(method, call_args, call_kwargs);
    }
    PyObject *type = NULL, *tb = NULL;
    if (value == NULL) {
        PyErr_Fetch(&type, error, &tb);
        PyErr_NormalizeException(&type, error, &tb);
        if (tb != NULL && *error != NULL)
            PyException_SetTraceback(*error, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
    }
    if (set_at(cancel, f->armed, S_ARMED, Py_False) < 0) {
        Py_XDECREF(value);
        Py_CLEAR(*error);
        return NULL;
    }
    return value;
}

/* A request serve() decoded (``decode`` gave ``msg``) that it may run now: a call by name
 * with arguments (a ``call_type``, no callable, every rank's value wanted, a name that is
 * no dunder and a callable attribute of ``target``, no cancelled call possibly queued):
 * 1 with *id and new references in *name, *method, *call_args (a tuple) and *call_kwargs
 * (NULL when empty); 0 to give ``msg`` to the request loop (a call without arguments too:
 * the loop learns its name for serve's bare calls); -1 with an exception set. */
static int servable_call(PyObject *msg, PyObject *call_type, PyObject *target,
                         const struct fields_of *f, uint64_t *id, PyObject **name,
                         PyObject **method, PyObject **call_args, PyObject **call_kwargs) {
    if ((PyObject *)Py_TYPE(msg) != call_type)
        return 0;
    PyObject *fn = NULL, *rank = NULL, *a = NULL, *k = NULL, *nm = NULL, *cid = NULL;
    int out = -1;
    if ((fn = PyObject_GetAttr(msg, S_FN)) == NULL ||
        (rank = PyObject_GetAttr(msg, S_VALUE_RANK)) == NULL ||
        (a = PyObject_GetAttr(msg, S_ARGS)) == NULL ||
        (k = PyObject_GetAttr(msg, S_KWARGS)) == NULL ||
        (nm = PyObject_GetAttr(msg, S_METHOD)) == NULL ||
        (cid = PyObject_GetAttr(msg, S_CALL_ID)) == NULL)
        goto end;
    out = 0;
    long value_rank = PyLong_AsLong(rank);
    if (value_rank == -1 && PyErr_Occurred())
        goto failed;
    if (fn != Py_None || value_rank >= 0 || !PyList_Check(a) || !PyDict_Check(k) ||
        (PyList_Size(a) == 0 && PyDict_Size(k) == 0) || !PyUnicode_Check(nm) ||
        PyUnicode_Tailmatch(nm, S_DUNDER, 0, PY_SSIZE_T_MAX, -1) != 0)
        goto end;
    unsigned long long call_id = PyLong_AsUnsignedLongLong(cid);
    if (call_id == (unsigned long long)-1 && PyErr_Occurred())
        goto failed;
    if ((*method = runnable(target, nm, f)) == NULL) {
        out = PyErr_Occurred() ? -1 : 0;
        goto end;
    }
    if ((*call_args = PyList_AsTuple(a)) == NULL) {
        Py_CLEAR(*method);
        out = -1;
        goto end;
    }
    *id = call_id;
    *call_kwargs = PyDict_Size(k) ? k : NULL;
    Py_XINCREF(*call_kwargs);
    *name = nm;
    Py_INCREF(nm);
    out = 1;
    goto end;
failed: /* a field msgspec would not have decoded: the loop looks at it */
    PyErr_Clear();
end:
    Py_XDECREF(fn);
    Py_XDECREF(rank);
    Py_XDECREF(a);
    Py_XDECREF(k);
    Py_XDECREF(nm);
    Py_XDECREF(cid);
    return out;
}

struct reply_ring {
    uintptr_t b, bell;
    uint64_t data_off, n_slots, slot_size, seq, min_read;
    const char *before, *after;
    Py_ssize_t before_len, after_len, max_reply;
};

/* Whether the reply ring has a free slot (its reader's position looked at again only
 * when it seemed full). */
static int ring_room(struct reply_ring *r) {
    if (r->min_read + r->n_slots <= r->seq) {
        r->min_read = load_acq(r->b, ONE_READER_SEQ_OFF);
        if (r->min_read + r->n_slots <= r->seq)
            return 0;
    }
    return 1;
}

/* Write and publish one reply frame, the bytes at ``a``, ``m`` and ``c`` one after the
 * other (a length 0: no part), when it fits in a slot, the ring has room and it is not
 * over max_reply: 1; 0 to leave it to Python (it waits for room, sends a longer frame by
 * ZeroMQ, refuses what is over max_message_size). */
static int put_reply(struct reply_ring *r, const char *a, Py_ssize_t a_len,
                     const unsigned char *m, Py_ssize_t m_len, const char *c,
                     Py_ssize_t c_len) {
    uint64_t n = (uint64_t)(a_len + m_len + c_len);
    if ((r->max_reply >= 0 && n > (uint64_t)r->max_reply) ||
        n + ONE_HEAD + SLOT_HEADER > r->slot_size)
        return 0;
    if (!ring_room(r))
        return 0;
    uint64_t slot = r->data_off + (r->seq % r->n_slots) * r->slot_size;
    unsigned char *at = one_packet_head(r->b, slot, (uint32_t)n);
    memcpy(at, a, (size_t)a_len);
    if (m_len)
        memcpy(at + a_len, m, (size_t)m_len);
    if (c_len)
        memcpy(at + a_len + m_len, c, (size_t)c_len);
    r->seq += 1;
    publish_at(r->b, slot, r->seq, 1, r->bell);
    return 1;
}

/* The reply ``Reply(id, rank, value)`` of a plain ``value`` written into the next slot
 * as msgspec writes it (_plain.h: the reply's cached bytes around the id, the value,
 * nil) and published: 1; 0 when it is not plain, or the ring has no room now, or it is
 * over max_reply or a slot (Python's encoder takes it: see put_value_reply); -1 with an
 * exception set. */
static int put_plain_reply(struct reply_ring *r, uint64_t id, PyObject *value) {
    Py_ssize_t rank_len = r->after_len - 2; /* the reply's after: rank, nil, nil */
    if (rank_len < 1 || !ring_room(r))
        return 0;
    uint64_t slot = r->data_off + (r->seq % r->n_slots) * r->slot_size;
    unsigned char *frame = (unsigned char *)(r->b + slot + SLOT_HEADER + ONE_HEAD);
    uint64_t cap = r->slot_size - SLOT_HEADER - ONE_HEAD;
    if (r->max_reply >= 0 && (uint64_t)r->max_reply < cap)
        cap = (uint64_t)r->max_reply;
    Room room = {frame, frame + cap, 0};
    if (!put_bytes(&room, r->before, r->before_len) || !room_for(&room, 9))
        return 0;
    room.at += pack_uint(id, room.at);
    int rc = put_bytes(&room, r->after, rank_len);
    if (rc > 0)
        rc = put_plain(&room, value, 0);
    if (rc <= 0 || !room_for(&room, 1))
        return rc < 0 ? -1 : 0;
    *room.at++ = 0xc0; /* no error */
    one_packet_head(r->b, slot, (uint32_t)(room.at - frame));
    r->seq += 1;
    publish_at(r->b, slot, r->seq, 1, r->bell);
    return 1;
}

/* Publish the reply to call ``id`` whose method returned ``value``: None's cached bytes
 * around the id, any other value's frame as ``reply_frame(id, value)`` makes it (None from
 * it, or an Exception: Python's encoder takes the value). 1 when published; 0 to leave it
 * to Python, with the frame made in *made (a new reference) when only the ring's room or
 * its slot's size stopped it (Python sends it as it is); -1 with a BaseException set that
 * is no Exception (it propagates). */
static int put_value_reply(struct reply_ring *r, uint64_t id, PyObject *id_obj,
                           PyObject *value, PyObject *reply_frame, PyObject **made) {
    if (value == Py_None) {
        unsigned char packed[9];
        Py_ssize_t id_len = pack_uint(id, packed);
        return put_reply(r, r->before, r->before_len, packed, id_len, r->after, r->after_len);
    }
    int plain = put_plain_reply(r, id, value);
    if (plain < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* (no memory for the value's objects) Python's encoder tries */
        plain = 0;
    }
    if (plain != 0 || reply_frame == Py_None)
        return plain;
    PyObject *frame = PyObject_CallFunctionObjArgs(reply_frame, id_obj, value, NULL);
    if (frame == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t n = PyBytes_Check(frame) ? PyBytes_Size(frame) : -1;
    if (n < 0 || (r->max_reply >= 0 && n > r->max_reply)) { /* Python refuses it, saying why */
        Py_DECREF(frame);
        return 0;
    }
    if (put_reply(r, PyBytes_AsString(frame), n, NULL, 0, NULL, 0)) {
        Py_DECREF(frame);
        return 1;
    }
    *made = frame; /* no room now, or longer than a slot: Python sends it as it is */
    return 0;
}

/* The name ``calls`` maps the method part of a bare call's header to (borrowed; the dict
 * holds it), or NULL with no exception set when it is not there. The last one found is
 * kept in *key / *name (owned) and compared first: a loop calls one method or a few. */
static PyObject *cached_name(PyObject *calls, const unsigned char *rest, Py_ssize_t len,
                             PyObject **key, PyObject **name) {
    if (*key != NULL && PyBytes_Size(*key) == len &&
        memcmp(PyBytes_AsString(*key), rest, (size_t)len) == 0)
        return *name;
    PyObject *k = PyBytes_FromStringAndSize((const char *)rest, len);
    if (k == NULL)
        return NULL;
    PyObject *found = PyDict_GetItemWithError(calls, k);
    if (found == NULL || !PyUnicode_Check(found)) {
        Py_DECREF(k);
        return NULL;
    }
    Py_XDECREF(*key);
    *key = k;
    Py_INCREF(found);
    Py_XDECREF(*name);
    *name = found;
    return found;
}

/* serve(view, base, reader_off, flag_off, data_off, n_slots, slot_size, max_len, spin,
 * timeout, reply_view, reply_base, reply_data_off, reply_n_slots, reply_slot_size,
 * bell_view, bell_base, call_before, calls, reply_before, reply_after, max_reply, target,
 * cancel, gate, decode, call_type, reply_frame, first_spin) -> (got, ran, records): a
 * worker's wait for its next request (as next_frame, spinning ``first_spin`` seconds) that
 * also answers the requests it can without the request loop:
 *   - a bare call (``call_before`` + id + a method part that ``calls`` maps to a method
 *     name) is taken and its method ``getattr(target, name)`` run, without decoding;
 *   - a call by name with plain arguments (see plain_call_at) is taken and its method
 *     run with them, read here as msgspec reads them, without ``decode`` (keyword
 *     arguments passed by name: see get_keywords);
 *   - any other request of one frame for every rank is taken and given to ``decode``
 *     (None: not done); a call by name with arguments (see servable_call) has its method
 *     run with them;
 * each armed for cancellation; when it returns None, ``reply_before`` + id +
 * ``reply_after`` is published into the reply ring (of one reader, whose only writer the
 * caller is: its position is read from the ring) with the doorbell rung, a plain value's
 * reply as msgspec writes it (put_plain_reply), and any other value as
 * ``reply_frame(id, value)`` makes its frame; then the wait goes on, spinning
 * ``spin`` seconds only. ``got`` is what next_frame gives for the first request left to
 * Python, or (message, stamp) for one ``decode`` decoded that the loop must answer
 * ((frame, stamp) again when ``decode`` raised: the loop decodes it and deals with the
 * error), False when none came, None when ``ran`` = (call_id, name, value, error, stamp,
 * frame) is a call whose method ran here and that Python must answer (it raised, the
 * gate was closed, the reply ring full, the reply over ``max_reply`` bytes when that is
 * >= 0 or longer than a slot, the value not made a frame here); ``frame``: the reply's
 * frame when it was made here but found no room or no slot it fits (else None);
 * ``records``: (published_ns, replied) of each call answered here, the last RECORDS
 * (None: none). The reader's read_seq and the reply ring's write_seq are in the rings
 * (the caller takes them up). Every argument but the last stays the same from call to
 * call (to bind them once). */
static PyObject *core_serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    uint64_t base, reader_off, flag_off, data_off, n_slots, slot_size, max_len;
    double first_spin, spin, timeout;
    struct reply_ring r;
    uint64_t rbase, rbell;
    long long max_reply;
    char *call_before, *text;
    Py_ssize_t call_before_len;
    if (!nargs_ok(nargs, 29, "serve") || !as_u64(args[1], &base) ||
        !as_u64(args[2], &reader_off) || !as_u64(args[3], &flag_off) ||
        !as_u64(args[4], &data_off) || !as_u64(args[5], &n_slots) ||
        !as_u64(args[6], &slot_size) || !as_u64(args[7], &max_len) ||
        !as_double(args[8], &spin) || !as_double(args[9], &timeout) ||
        !as_u64(args[11], &rbase) || !as_u64(args[12], &r.data_off) ||
        !as_u64(args[13], &r.n_slots) || !as_u64(args[14], &r.slot_size) ||
        !as_u64(args[16], &rbell) || !as_double(args[28], &first_spin))
        return NULL;
    if (PyBytes_AsStringAndSize(args[17], &call_before, &call_before_len) < 0 ||
        PyBytes_AsStringAndSize(args[19], &text, &r.before_len) < 0)
        return NULL;
    r.before = text;
    if (PyBytes_AsStringAndSize(args[20], &text, &r.after_len) < 0)
        return NULL;
    r.after = text;
    max_reply = PyLong_AsLongLong(args[21]);
    if (max_reply == -1 && PyErr_Occurred())
        return NULL;
    r.max_reply = max_reply < 0 ? -1 : (Py_ssize_t)max_reply;
    PyObject *calls = args[18], *target = args[22], *cancel = args[23], *gate = args[24];
    PyObject *decode = args[25], *call_type = args[26], *reply_frame = args[27];
    struct fields_of fields;
    find_fields(&fields, cancel, gate);
    if (n_slots == 0 || r.n_slots == 0 || !PyDict_Check(calls)) {
        PyErr_SetString(PyExc_ValueError, "serve(): rings with slots and a dict of calls");
        return NULL;
    }
    r.b = (uintptr_t)rbase;
    r.bell = (uintptr_t)rbell;
    r.seq = __atomic_load_n(u64_at(r.b, WRITE_SEQ_OFF), __ATOMIC_RELAXED); /* its own word */
    r.min_read = 0; /* not looked at yet: read when the ring may be full */
    uintptr_t b = (uintptr_t)base;
    struct records rec;
    rec.n = 0;
    PyObject *key = NULL, *name = NULL, *last_name = NULL, *names = NULL, *got = NULL,
             *ran = NULL, *out = NULL;
    uint64_t seq = __atomic_load_n(u64_at(b, reader_off), __ATOMIC_RELAXED);
    double start = load_acq(b, WRITE_SEQ_OFF) > seq ? 0.0 : now_s();
    double spin_until = start + (first_spin < timeout ? first_spin : timeout);
    double sleep_until = start + timeout;
    for (;;) {
        int waited = wait_seq(b, seq, flag_off, spin_until, sleep_until,
                              data_off + (seq % n_slots) * slot_size);
        if (waited < 0)
            goto done;
        if (waited == 0) {
            got = Py_False;
            Py_INCREF(got);
            break;
        }
        uint64_t slot = data_off + (seq % n_slots) * slot_size, id, stamp;
        const unsigned char *rest;
        Py_ssize_t rest_len;
        PyObject *called = NULL, *method = NULL, *call_args = NULL, *call_kwargs = NULL;
        struct keywords kw = {0, NULL, {NULL}};
        if (bare_call_at(b, slot, slot_size, call_before, call_before_len, &id, &rest,
                         &rest_len) &&
            (called = cached_name(calls, rest, rest_len, &key, &name)) != NULL)
            method = runnable(target, called, &fields);
        if (method != NULL) {
            Py_INCREF(called); /* (borrowed from ``calls``) */
        } else if (!PyErr_Occurred()) {
            int plain = plain_call_at(b, slot, slot_size, max_len, call_before,
                                      call_before_len, &last_name, &names, &id, &called,
                                      &call_args, &call_kwargs, &kw);
            if (plain < 0 && PyErr_ExceptionMatches(PyExc_Exception))
                PyErr_Clear(); /* (no memory for its objects) the decoder's, as below */
            if (plain > 0 && (method = runnable(target, called, &fields)) == NULL) {
                Py_CLEAR(called); /* not runnable now: the request loop's (decoded again) */
                Py_CLEAR(call_args);
                Py_CLEAR(call_kwargs);
                keywords_clear(&kw);
            }
        }
        if (PyErr_Occurred())
            goto done;
        if (method != NULL) { /* a bare call, or one with plain arguments: taken */
            stamp = __atomic_load_n(u64_at(b, slot + PUBLISHED_OFF), __ATOMIC_RELAXED);
            seq += 1;
            __atomic_store_n(u64_at(b, reader_off), seq, __ATOMIC_RELEASE);
        } else { /* Python's, or decoded here: taken as next_frame takes it */
            PyObject *frame, *msg;
            int took = take_frame_at(b, reader_off, data_off, n_slots, slot_size, max_len,
                                     &frame, &stamp);
            if (took < 0)
                goto done;
            if (took == 0) {
                got = Py_True;
                Py_INCREF(got);
                break;
            }
            seq += 1;
            if (decode == Py_None ||
                (msg = PyObject_CallFunctionObjArgs(decode, frame, NULL)) == NULL) {
                if (decode != Py_None && !PyErr_ExceptionMatches(PyExc_Exception)) {
                    Py_DECREF(frame);
                    goto done;
                }
                PyErr_Clear(); /* the loop decodes it again and deals with what it is */
                if ((got = taken_pair(frame, stamp)) == NULL)
                    goto done;
                break;
            }
            Py_DECREF(frame);
            int can = servable_call(msg, call_type, target, &fields, &id, &called, &method,
                                    &call_args, &call_kwargs);
            if (can <= 0) {
                if (can == 0)
                    got = taken_pair(msg, stamp); /* the loop answers it */
                else
                    Py_DECREF(msg);
                if (got == NULL)
                    goto done;
                break;
            }
            Py_DECREF(msg);
        }
        PyObject *id_obj = PyLong_FromUnsignedLongLong(id), *error = NULL, *value = NULL;
        if (id_obj != NULL)
            value = run_armed(method, call_args, call_kwargs, &kw, &fields, id_obj, called,
                              &error);
        Py_DECREF(method);
        Py_XDECREF(call_args);
        Py_XDECREF(call_kwargs);
        keywords_clear(&kw);
        int put = 0; /* 1: published here; 0: Python answers it; -1: failed */
        PyObject *made = NULL;
        if (value != NULL) {
            int closed = true_at(gate, fields.closed, S_CLOSED);
            put = closed < 0 ? -1 : closed ? 0 : put_value_reply(&r, id, id_obj, value,
                                                                 reply_frame, &made);
        }
        if ((value == NULL && error == NULL) || put < 0) {
            Py_XDECREF(id_obj);
            Py_XDECREF(value);
            Py_XDECREF(error);
            Py_DECREF(called);
            goto done;
        }
        if (put == 0) {
            ran = Py_BuildValue("(OOOOKO)", id_obj, called, value ? value : Py_None,
                                error ? error : Py_None, (unsigned long long)stamp,
                                made ? made : Py_None);
            Py_XDECREF(made);
            Py_DECREF(id_obj);
            Py_XDECREF(value);
            Py_XDECREF(error);
            Py_DECREF(called);
            if (ran == NULL)
                goto done;
            got = Py_None;
            Py_INCREF(got);
            break;
        }
        Py_DECREF(id_obj);
        Py_DECREF(value);
        Py_DECREF(called);
        double now = now_s();
        rec.stamp[rec.n % RECORDS] = stamp;
        rec.replied[rec.n % RECORDS] = now;
        rec.n += 1;
        spin_until = sleep_until = now + spin; /* from here on: spin, then leave */
    }
    PyObject *records = records_list(&rec);
    if (records != NULL) {
        out = PyTuple_Pack(3, got, ran ? ran : Py_None, records);
        Py_DECREF(records);
    }
done:
    Py_XDECREF(got);
    Py_XDECREF(ran);
    Py_XDECREF(key);
    Py_XDECREF(name);
    Py_XDECREF(last_name);
    Py_XDECREF(names);
    return out;
}

/* -- plain msgpack data (_plain.h) --------------------------------------------------- */

/* pack_plain(value) -> bytes | None: msgspec's bytes for a plain value, None for any
 * other (see _plain.h). */
static PyObject *core_pack_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 1, "pack_plain"))
        return NULL;
    Py_ssize_t cap = 64;
    for (;;) {
        PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
        if (out == NULL)
            return NULL;
        unsigned char *at = (unsigned char *)PyBytes_AsString(out);
        Room r = {at, at + cap, 0};
        int rc = put_plain(&r, args[0], 0);
        if (rc > 0) {
            PyObject *exact = PyBytes_FromStringAndSize((const char *)at, r.at - at);
            Py_DECREF(out);
            return exact;
        }
        Py_DECREF(out);
        if (rc < 0)
            return NULL;
        if (!r.full || cap > (PY_SSIZE_T_MAX >> 2)) /* not plain */
            Py_RETURN_NONE;
        cap *= 4; /* no room: again, with more */
    }
}

/* unpack_plain(frame) -> (value,) | None: the plain value that is the whole of
 * ``frame``, as msgspec reads it; None when it is not one (see _plain.h). */
static PyObject *core_unpack_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    char *data;
    Py_ssize_t n;
    if (!nargs_ok(nargs, 1, "unpack_plain") || PyBytes_AsStringAndSize(args[0], &data, &n) < 0)
        return NULL;
    Text t = {(const unsigned char *)data, (const unsigned char *)data + n};
    PyObject *value;
    int rc = get_plain(&t, 0, &value);
    if (rc < 0)
        return NULL;
    if (rc == 0)
        Py_RETURN_NONE;
    if (t.at != t.end) {
        Py_DECREF(value);
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_Pack(1, value);
    Py_DECREF(value);
    return out;
}

/* -- the request writer's position (WriterFields, _ring.h) --------------------------- */

static PyMemberDef writer_members[] = {
    {"_seq", T_OBJECT_EX, offsetof(WriterFields, seq), 0, NULL},
    {"_min_read", T_OBJECT_EX, offsetof(WriterFields, min_read), 0, NULL},
    {"_claimed", T_OBJECT_EX, offsetof(WriterFields, claimed), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

FIELDS_TYPE(writer, WriterFields, seq, WRITER_FIELDS,
            "gpuexec.ipc._ringcore.WriterFields",
            "A ring writer's position in a C struct (the base of shm_ring.RingWriter when "
            "the compiled core is built; see _ring.h).");

/* -- the worker's cancellation point and reply gate (CancelFields, GateFields) ------- */

#define CANCEL_FIELD(name) {#name, T_OBJECT_EX, offsetof(CancelFields, name), 0, NULL}
static PyMemberDef cancel_members[] = {
    CANCEL_FIELD(running), CANCEL_FIELD(method), CANCEL_FIELD(armed), CANCEL_FIELD(recheck),
    {NULL, 0, 0, 0, NULL},
};

FIELDS_TYPE(cancel, CancelFields, running, CANCEL_FIELDS,
            "gpuexec.ipc._ringcore.CancelFields",
            "A worker's cancellation state in a C struct (the base of "
            "worker.cancel.CancelPoint when the compiled core is built).");

static PyMemberDef gate_members[] = {
    {"closed", T_OBJECT_EX, offsetof(GateFields, closed), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

FIELDS_TYPE(gate, GateFields, closed, GATE_FIELDS, "gpuexec.ipc._ringcore.GateFields",
            "A worker's reply gate's state in a C struct (the base of "
            "worker.deferred.ReplyGate when the compiled core is built).");

static PyMethodDef methods[] = {
    {"fence", (PyCFunction)(void (*)(void))core_fence, METH_FASTCALL, "A full memory barrier."},
    {"published", (PyCFunction)(void (*)(void))core_published, METH_FASTCALL,
     "published(view, base) -> write_seq (acquire)."},
    {"publish", (PyCFunction)(void (*)(void))core_publish, METH_FASTCALL,
     "publish(view, base, slot_off, seq, n_readers, bell_view, bell_base): stamp, "
     "publish, wake sleepers (and the doorbell's, after the same fence)."},
    {"put_one", (PyCFunction)(void (*)(void))core_put_one, METH_FASTCALL,
     "put_one(view, base, slot_off, frame, seq, n_readers, bell_view, bell_base): "
     "write a one-frame packet into a slot and publish it."},
    {"take_frame", (PyCFunction)(void (*)(void))core_take_frame, METH_FASTCALL,
     "take_frame(view, base, reader_off, data_off, n_slots, slot_size, max_len) -> "
     "(frame, published_ns) | None: copy out and "
     "release the next message when it is a one-frame packet."},
    {"release", (PyCFunction)(void (*)(void))core_release, METH_FASTCALL,
     "release(view, base, off, seq): store a reader's read_seq (release)."},
    {"min_read", (PyCFunction)(void (*)(void))core_min_read, METH_FASTCALL,
     "min_read(view, base, first_off, n_readers) -> the slowest reader's read_seq."},
    {"wait", (PyCFunction)(void (*)(void))core_wait, METH_FASTCALL,
     "wait(view, base, seq, flag_off, spin_until, sleep_until) -> bool."},
    {"next_frame", (PyCFunction)(void (*)(void))core_next_frame, METH_FASTCALL,
     "next_frame(view, base, reader_off, flag_off, data_off, n_slots, slot_size, max_len, "
     "spin, timeout) -> (frame, published_ns) | True | False: wait, then take."},
    {"ring", (PyCFunction)(void (*)(void))core_ring, METH_FASTCALL,
     "ring(view, base): wake the doorbell's waiter if it sleeps."},
    {"poke", (PyCFunction)(void (*)(void))core_poke, METH_FASTCALL,
     "poke(view, base): move the doorbell's counter and wake its waiter."},
    {"epoch", (PyCFunction)(void (*)(void))core_epoch, METH_FASTCALL,
     "epoch(view, base) -> the doorbell's counter."},
    {"collect", (PyCFunction)(void (*)(void))core_collect, METH_FASTCALL,
     "collect(views, bases, bell_view, bell_base, data_off, n_slots, slot_size, max_len, "
     "befores, afters, epoch, spin_until, sleep_until, middle, want) -> "
     "(taken, framed, other, frames)."},
    {"gather", (PyCFunction)(void (*)(void))core_gather, METH_FASTCALL,
     "gather(views, bases, bell_view, bell_base, epoch, spin_until, sleep_until) -> mask."},
    {"serve", (PyCFunction)(void (*)(void))core_serve, METH_FASTCALL,
     "serve(view, base, reader_off, flag_off, data_off, n_slots, slot_size, max_len, spin, "
     "timeout, reply_view, reply_base, reply_data_off, reply_n_slots, reply_slot_size, "
     "bell_view, bell_base, call_before, calls, reply_before, reply_after, max_reply, "
     "target, cancel, gate, decode, call_type, reply_frame, first_spin) -> (got, ran, "
     "records): wait for the next request, answering the calls it can."},
    {"pack_plain", (PyCFunction)(void (*)(void))core_pack_plain, METH_FASTCALL,
     "pack_plain(value) -> bytes | None: msgspec's bytes for a plain value."},
    {"unpack_plain", (PyCFunction)(void (*)(void))core_unpack_plain, METH_FASTCALL,
     "unpack_plain(frame) -> (value,) | None: the plain value a frame holds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringcore",
    "The compiled ring core (see ringcore.py for the interface both cores share).", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* The interface version: ringcore.py's API must match, so that a build left over from an
 * older source (an editable install after a pull) is refused, not called wrongly. */
#define CORE_API 12

PyMODINIT_FUNC PyInit__ringcore(void) {
    if ((S_RECHECK = PyUnicode_InternFromString("recheck")) == NULL ||
        (S_RUNNING = PyUnicode_InternFromString("running")) == NULL ||
        (S_METHOD = PyUnicode_InternFromString("method")) == NULL ||
        (S_ARMED = PyUnicode_InternFromString("armed")) == NULL ||
        (S_CLOSED = PyUnicode_InternFromString("closed")) == NULL ||
        (S_FN = PyUnicode_InternFromString("fn")) == NULL ||
        (S_VALUE_RANK = PyUnicode_InternFromString("value_rank")) == NULL ||
        (S_ARGS = PyUnicode_InternFromString("args")) == NULL ||
        (S_KWARGS = PyUnicode_InternFromString("kwargs")) == NULL ||
        (S_CALL_ID = PyUnicode_InternFromString("call_id")) == NULL ||
        (S_DUNDER = PyUnicode_InternFromString("__")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    vectorcall = (vectorcall_fn)dlsym(RTLD_DEFAULT, "PyObject_Vectorcall");
    PyObject *writer_type = PyType_FromSpec(&writer_spec);
    CancelFieldsType = (PyTypeObject *)PyType_FromSpec(&cancel_spec);
    GateFieldsType = (PyTypeObject *)PyType_FromSpec(&gate_spec);
    if (PyModule_AddStringConstant(m, "NAME", "compiled") < 0 ||
        PyModule_AddIntConstant(m, "API", CORE_API) < 0 || writer_type == NULL ||
        PyModule_AddObject(m, "WriterFields", Py_NewRef(writer_type)) < 0 ||
        CancelFieldsType == NULL ||
        PyModule_AddObject(m, "CancelFields", Py_NewRef(CancelFieldsType)) < 0 ||
        GateFieldsType == NULL ||
        PyModule_AddObject(m, "GateFields", Py_NewRef(GateFieldsType)) < 0) {
        Py_XDECREF(writer_type);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(writer_type); /* (the module holds it) */
    return m;
}
