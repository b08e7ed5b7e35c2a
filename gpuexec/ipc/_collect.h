/* The driver's wait for a call's replies, shared by the two compiled parts: the ring
 * core (_ringcore.c: collect(), gather() and the readers' waits use its pieces) and the
 * driver's round trip (../executor/_calltable.c, which collects without a call through
 * Python). Static: each extension has its own copy. Include after _ring.h.
 *
 *   wait_bell(bell, epoch, spin_until, sleep_until, ready, ctx)
 *       spin (GIL released), then sleep on the doorbell, until ready() says so
 *   scan_awaited (a ready() over struct awaited)
 *       the awaited rings: each None result to the call known by its bytes and
 *       released (w->taken), any other message marked (w->other) and left in place
 *   next_slot(b, reader_off, ..., &seq, &slot)
 *       where a reader's next message lies
 *   one_frame_at(b, slot, slot_size, max_len, &length)
 *       the frame of a one-frame packet in a slot, where it lies
 */
#ifndef GPUEXEC_COLLECT_H
#define GPUEXEC_COLLECT_H

/* The next message the reader at ``reader_off`` of ring ``b`` has not released: 1 with
 * its sequence number in *seq and its slot's offset in *slot; 0 when there is none. */
static inline int next_slot(uintptr_t b, uint64_t reader_off, uint64_t data_off,
                            uint64_t n_slots, uint64_t slot_size, uint64_t *seq,
                            uint64_t *slot) {
    *seq = __atomic_load_n(u64_at(b, reader_off), __ATOMIC_RELAXED);
    if (load_acq(b, WRITE_SEQ_OFF) <= *seq)
        return 0;
    *slot = data_off + (*seq % n_slots) * slot_size;
    return 1;
}

/* The frame of the message in the slot at ``slot`` when it is a packet of one frame of
 * at most ``max_len`` bytes for every rank whose lengths agree: its first byte, its length
 * in *length; NULL for any other message. */
static const unsigned char *one_frame_at(uintptr_t b, uint64_t slot, uint64_t slot_size,
                                         uint64_t max_len, uint32_t *length) {
    uint32_t total;
    const unsigned char *head = (const unsigned char *)(b + slot + SLOT_HEADER);
    memcpy(&total, u32_at(b, slot), 4);
    if (total < ONE_HEAD || total > slot_size - SLOT_HEADER || total - ONE_HEAD > max_len)
        return NULL;
    memcpy(length, head + 5, 4);
    if (*length != total - ONE_HEAD || memcmp(head, ONE_PACKET, 5) != 0)
        return NULL;
    return head + ONE_HEAD;
}

/* Take the GIL back for a moment and run signal handlers: -1 when one raised. */
static int check_signals(PyThreadState **ts) {
    PyEval_RestoreThread(*ts);
    int r = PyErr_CheckSignals();
    *ts = PyEval_SaveThread();
    return r;
}

/* One check of a spin loop, made every few iterations: 0 to go on spinning; 1 once
 * ``spin_until`` has passed; -1 when a Python signal handler raised (checked at most
 * every SLICE_S, taking the GIL back for it). */
static int spin_tick(double spin_until, double *check_at, PyThreadState **ts) {
    double t = now_s();
    if (t >= spin_until)
        return 1;
    if (t >= *check_at) {
        if (check_signals(ts) < 0)
            return -1;
        *check_at = t + SLICE_S;
    }
    return 0;
}


/* Wait on the doorbell at ``b`` until ``ready(ctx, settled)`` says so: spin (GIL
 * released) until ``spin_until``, then sleep with the handshake until ``sleep_until``
 * (``settled``: 0 while spinning, 1 from then on). 1 once ready; 0 when that passes, or
 * at once when the counter is no longer ``epoch`` (poked); -1 when a signal handler
 * raised. Called with the GIL held; returns with it held. */
typedef int (*ready_fn)(void *ctx, int settled);

static int wait_bell(uintptr_t b, uint32_t epoch, double spin_until, double sleep_until,
                     ready_fn ready, void *ctx) {
    uint32_t *counter = u32_at(b, BELL_COUNTER);
    uint32_t *sleeping = u32_at(b, BELL_SLEEPING);
    if (ready(ctx, 0))
        return 1;
    int got = 0, failed = 0;
    PyThreadState *ts = PyEval_SaveThread();
    double check_at = now_s() + SLICE_S;
    for (unsigned k = 0;; k++) {
        if ((got = ready(ctx, 0)))
            break;
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) != epoch)
            break;
        if ((k & 15) == 0) {
            int tick = spin_tick(spin_until, &check_at, &ts);
            if (tick != 0) {
                failed = tick < 0;
                break;
            }
        }
        CPU_RELAX();
    }
    while (!got && !failed) {
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) != epoch)
            break;
        double left = sleep_until - now_s();
        if (left <= 0)
            break;
        __atomic_store_n(sleeping, 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint32_t expected = __atomic_load_n(counter, __ATOMIC_ACQUIRE);
        if (expected == epoch && !(got = ready(ctx, 1)))
            futex_wait(counter, expected, left < SLICE_S ? left : SLICE_S);
        __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
        if (got || (got = ready(ctx, 1)))
            break;
        if (check_signals(&ts) < 0)
            failed = 1;
    }
    PyEval_RestoreThread(ts);
    return failed ? -1 : got;
}


/* What collect() waits for: the awaited call's replies in up to 64 reply rings. */
struct awaited {
    uintptr_t bases[64];
    Py_ssize_t n;
    uint64_t data_off, n_slots, slot_size;
    const char *before[64], *after[64], *middle; /* per ring: before + middle + after */
    Py_ssize_t before_len[64], after_len[64], middle_len;
    uint64_t want, taken, other;
};

/* Whether ring i's next message is the one-frame packet before_i + middle + after_i. */
static int is_expected(const struct awaited *w, Py_ssize_t i, uint64_t slot) {
    uintptr_t b = w->bases[i];
    const unsigned char *head = (const unsigned char *)(b + slot + SLOT_HEADER);
    uint64_t want = (uint64_t)w->before_len[i] + (uint64_t)w->middle_len +
                    (uint64_t)w->after_len[i];
    uint32_t total, length;
    if (want + ONE_HEAD + SLOT_HEADER > w->slot_size)
        return 0;
    memcpy(&total, u32_at(b, slot), 4);
    memcpy(&length, head + 5, 4);
    if (total != want + ONE_HEAD || length != want || memcmp(head, ONE_PACKET, 5) != 0)
        return 0;
    const unsigned char *at = head + ONE_HEAD;
    return memcmp(at, w->before[i], (size_t)w->before_len[i]) == 0 &&
           memcmp(at + w->before_len[i], w->middle, (size_t)w->middle_len) == 0 &&
           memcmp(at + w->before_len[i] + w->middle_len, w->after[i],
                  (size_t)w->after_len[i]) == 0;
}

/* Take what has come: each awaited ring's expected reply is released (``taken``), any
 * other message marks its ring (``other``: left for the caller). Ready once every
 * awaited ring is one or the other, or, once the spin is over (``settled``), as soon as
 * one holds another message: it may be a failure, which must reach the driver while the
 * other ranks still run the call (they are cancelled on it), not when they end. */
static int scan_awaited(void *ctx, int settled) {
    struct awaited *w = ctx;
    uint64_t open = w->want & ~(w->taken | w->other);
    while (open) {
        Py_ssize_t i = __builtin_ctzll(open);
        open &= open - 1;
        uintptr_t b = w->bases[i];
        uint64_t seq, slot;
        if (!next_slot(b, ONE_READER_SEQ_OFF, w->data_off, w->n_slots, w->slot_size, &seq,
                       &slot))
            continue;
        if (is_expected(w, i, slot)) {
            __atomic_store_n(u64_at(b, ONE_READER_SEQ_OFF), seq + 1, __ATOMIC_RELEASE);
            w->taken |= 1ull << i;
        } else {
            w->other |= 1ull << i;
        }
    }
    return (w->taken | w->other) == w->want || (settled && w->other != 0);
}


#endif /* GPUEXEC_COLLECT_H */
