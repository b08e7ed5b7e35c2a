/* The driver's hot path in compiled code: the call table's steps, a user's call's entry
 * and its end when every rank answered it at once (gpuexec.executor.calls:
 * CallTable.enter and CallTable.answered are the general forms, and the pure-Python
 * twin of both), and a blocking call's whole round trip over shared memory (its twin:
 * DriverChannel.call_bare's Python steps, which take what it hands back).
 *
 *   enter_new(table, fixed, method, ranks,     a user's call made and entered
 *             unique_reply_rank, timeout, future)
 *   answered(table, fixed, call, values)       the call ended with its results
 *   Lane(items)                                what a channel's round trips read, made
 *                                              once (DriverChannel.__init__)
 *   lane.round_trip(method, ranks, timeout)    a blocking call by name over shared
 *                                              memory, sent, collected and ended
 *   lane.call_plain(method, args, kwargs,      the same with plain arguments (written
 *                   ranks, timeout)            here: ../ipc/_plain.h), or None
 *
 * (``fixed``: CallTable.fixed, the table's objects that never change.) The Lane reads
 * once what never changes for the channel (the request ring's geometry, the spin, the
 * doorbell, the locks' methods bound), so a call reads only what does: the writer's
 * position and the table's counters, kept in C structs (the base classes of RingWriter
 * and CallTable: WriterFields in ../ipc/_ring.h, TableFields here), and the flags of a
 * close. A round trip waits for its replies with the ring core's wait
 * (../ipc/_collect.h, compiled in here) and reads their plain results itself where they
 * lie (a None result by its bytes, any other plain value from its slot as msgspec reads
 * it), across as many waits as the ranks take.
 *
 * PendingCall here is the same record as calls.PendingCall (the same attributes, read and
 * written by the same Python code), with its fields in a C struct so that it is made in
 * one step rather than by nineteen attribute stores.
 *
 * Locking: every field of the table is guarded by table.lock (a threading.Lock). These
 * steps hold the GIL from start to end, make every object they need first (an allocation
 * may run the cyclic collector, and a finalizer may let another thread run), then find
 * table.lock free (or step aside) and do their reads and writes with no call into Python
 * and no release that could run a finalizer (ints, floats, None, the call itself still
 * held by the caller), so no other thread runs in between. Under the GIL that is the same
 * as taking the lock and releasing it, without the two calls. (abi3 builds load on GIL
 * builds only.) The round trip takes the channel's pump lock and then its send lock as
 * the channel's lock order says, each without waiting and with no call (they are Locks,
 * below; held by another thread: it hands the call back), and gives both back before it
 * returns, also when it returns an exception.
 *
 * What they do not handle they leave, having changed nothing, to the general Python
 * path: enter_new gives its call to table.enter(call) (a refusal, no free slot, the lock
 * held), answered calls table.answered(call, values) (a call that is not simply waiting
 * for all of its ranks, the lock held, a method not counted yet or due to be folded, a
 * slot awaited, a failing call in the table).
 *
 * Built against the limited API (abi3) with the ring core; see setup.py.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <stddef.h>

#include "../ipc/_ring.h" /* the ring's layout and publish (now_s: time.monotonic()'s clock) */
#include "../ipc/_plain.h" /* plain msgpack data: a call's arguments and results */
#include "../ipc/_collect.h" /* the wait for a call's replies (the ring core's) */

#define CALLTABLE_API 9 /* calls.py's API must be the same */

#define SET_FIELD(field, value) /* Py_SETREF, which the limited API lacks before 3.12 */ \
    do {                                                                               \
        PyObject *old_ = (field);                                                      \
        (field) = (value);                                                             \
        Py_XDECREF(old_);                                                              \
    } while (0)

/* -- PendingCall ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *call_id, *deadline, *done, *error, *event, *failures, *future, *method,
        *nbytes, *owed, *ping, *ranks, *segments, *slot, *started, *timeout,
        *unique_reply_rank, *value, *values;
    int answered_all; /* ended by end_simple while ``owed`` was never made: none owed */
} Call;

#define N_FIELDS 19
#define FIELD(name) {#name, T_OBJECT_EX, offsetof(Call, name), 0, NULL}
static PyMemberDef call_members[] = {
    FIELD(call_id), FIELD(deadline), FIELD(done), FIELD(error), FIELD(event),
    FIELD(failures), FIELD(future), FIELD(method), FIELD(nbytes), FIELD(ping),
    FIELD(ranks), FIELD(slot), FIELD(started), FIELD(timeout), FIELD(unique_reply_rank),
    FIELD(value), {NULL, 0, 0, 0, NULL},
};

/* owed, values and segments are made when first read: a call whose every rank answers at
 * once in the compiled steps never needs them (three containers fewer to make and free
 * per call). Until then owed is every rank of ``ranks`` (none once answered_all), values
 * {} and segments []; read or set from Python they are the same objects as ever. */
static PyObject *call_owed(PyObject *self, void *unused) {
    Call *c = (Call *)self;
    if (c->owed == NULL && (c->owed = PySet_New(c->answered_all ? NULL : c->ranks)) == NULL)
        return NULL;
    return Py_NewRef(c->owed);
}

static PyObject *call_values(PyObject *self, void *unused) {
    Call *c = (Call *)self;
    if (c->values == NULL && (c->values = PyDict_New()) == NULL)
        return NULL;
    return Py_NewRef(c->values);
}

static PyObject *call_segments(PyObject *self, void *unused) {
    Call *c = (Call *)self;
    if (c->segments == NULL && (c->segments = PyList_New(0)) == NULL)
        return NULL;
    return Py_NewRef(c->segments);
}

/* A setter for the three (deleting one is refused: PendingCall has no such state). */
static int set_lazy(PyObject **field, PyObject *value) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a PendingCall's field cannot be deleted");
        return -1;
    }
    SET_FIELD(*field, Py_NewRef(value));
    return 0;
}

static int call_set_owed(PyObject *self, PyObject *value, void *unused) {
    return set_lazy(&((Call *)self)->owed, value);
}

static int call_set_values(PyObject *self, PyObject *value, void *unused) {
    return set_lazy(&((Call *)self)->values, value);
}

static int call_set_segments(PyObject *self, PyObject *value, void *unused) {
    return set_lazy(&((Call *)self)->segments, value);
}

static PyGetSetDef call_getset[] = {
    {"owed", call_owed, call_set_owed, "Ranks that still owe a reply.", NULL},
    {"values", call_values, call_set_values, "rank -> its result, as they come.", NULL},
    {"segments", call_segments, call_set_segments, "Payload segments to close.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject **call_fields(Call *c) { return &c->call_id; }

static PyTypeObject *CallType;

/* A call as calls.PendingCall.__init__ makes it (slot False), or NULL. */
static Call *new_call(PyTypeObject *type, PyObject *call_id, PyObject *method,
                      PyObject *ranks, PyObject *unique_reply_rank, PyObject *timeout,
                      PyObject *future) {
    double started = now_s(), seconds = 0.0;
    if (timeout != Py_None) {
        seconds = PyFloat_AsDouble(timeout);
        if (seconds == -1.0 && PyErr_Occurred())
            return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Call *c = (Call *)alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->call_id = Py_NewRef(call_id);
    c->method = Py_NewRef(method);
    c->ranks = Py_NewRef(ranks);
    c->unique_reply_rank = Py_NewRef(unique_reply_rank);
    c->timeout = Py_NewRef(timeout);
    c->future = Py_NewRef(future);
    c->event = Py_NewRef(Py_None);
    c->failures = Py_NewRef(Py_None);
    c->value = Py_NewRef(Py_None);
    c->error = Py_NewRef(Py_None);
    c->done = Py_NewRef(Py_False);
    c->slot = Py_NewRef(Py_False);
    c->ping = Py_NewRef(Py_False);
    c->started = PyFloat_FromDouble(started);
    c->deadline = timeout == Py_None ? Py_NewRef(Py_None) : PyFloat_FromDouble(started + seconds);
    c->nbytes = PyLong_FromLong(0);
    if (c->started == NULL || c->deadline == NULL || c->nbytes == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    return c;
}

static PyObject *call_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"call_id", "method", "ranks", "unique_reply_rank", "timeout",
                             "future", NULL};
    PyObject *call_id, *method, *ranks, *unique_reply_rank, *timeout, *future;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO:PendingCall", kwlist, &call_id,
                                     &method, &ranks, &unique_reply_rank, &timeout, &future))
        return NULL;
    return (PyObject *)new_call(type, call_id, method, ranks, unique_reply_rank, timeout,
                                future);
}

static int call_traverse(PyObject *self, visitproc visit, void *arg) {
    return visit_fields(self, call_fields((Call *)self), N_FIELDS, visit, arg);
}

static int call_clear(PyObject *self) {
    clear_fields(call_fields((Call *)self), N_FIELDS);
    return 0;
}

static void call_dealloc(PyObject *self) {
    free_fields(self, call_fields((Call *)self), N_FIELDS);
}

/* outcome(): the result, or raise the error (calls.PendingCall.outcome). */
static PyObject *call_outcome(PyObject *self, PyObject *unused) {
    Call *c = (Call *)self;
    if (c->error != NULL && c->error != Py_None) {
        PyErr_SetObject((PyObject *)Py_TYPE(c->error), c->error);
        return NULL;
    }
    return Py_NewRef(c->value != NULL ? c->value : Py_None);
}

static PyMethodDef call_methods[] = {
    {"outcome", call_outcome, METH_NOARGS, "The result, or raise the error."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot call_slots[] = {
    {Py_tp_doc, "One call in flight: which ranks still owe a reply, and what came back "
                "(calls.PendingCall, made in compiled code)."},
    {Py_tp_new, call_new},
    {Py_tp_dealloc, call_dealloc},
    {Py_tp_traverse, call_traverse},
    {Py_tp_clear, call_clear},
    {Py_tp_members, call_members},
    {Py_tp_getset, call_getset},
    {Py_tp_methods, call_methods},
    {0, NULL},
};

static PyType_Spec call_spec = {
    "gpuexec.executor._calltable.PendingCall", sizeof(Call), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, call_slots,
};

/* -- Lock ---------------------------------------------------------------------------- */

/* threading.Lock's interface over the same kind of lock (PyThread's), whose state the
 * compiled steps read and change with no call: the call table's lock and the channel's
 * pump and send locks are these where the steps are built (calls.make_lock). ``held``
 * is written with the GIL held, after the lock is taken and before it is given back:
 * while it is 0 no thread runs Python code inside the lock (a thread that has just
 * taken it sets it before it returns to Python), which is what the steps' "found free"
 * needs (see the locking paragraph above). Blocking waits release the GIL and run
 * signal handlers as threading.Lock's do (Ctrl-C interrupts a wait). */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int held;
} Lock;

static PyTypeObject *LockType;

/* Take ``l`` without waiting: 1 taken, 0 held by someone. */
static int lock_try(Lock *l) {
    if (PyThread_acquire_lock(l->lock, NOWAIT_LOCK) != PY_LOCK_ACQUIRED)
        return 0;
    l->held = 1;
    return 1;
}

static void lock_give(Lock *l) {
    l->held = 0;
    PyThread_release_lock(l->lock);
}

static PyObject *lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":Lock") || (kwargs != NULL && PyDict_Size(kwargs) != 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Lock *l = (Lock *)alloc(type, 0);
    if (l == NULL)
        return NULL;
    l->held = 0;
    if ((l->lock = PyThread_allocate_lock()) == NULL) {
        Py_DECREF(l);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate a lock");
        return NULL;
    }
    return (PyObject *)l;
}

static void lock_dealloc(PyObject *self) {
    Lock *l = (Lock *)self;
    PyTypeObject *type = Py_TYPE(self);
    if (l->lock != NULL) {
        if (l->held) /* (PyThread's locks must be free when freed) */
            PyThread_release_lock(l->lock);
        PyThread_free_lock(l->lock);
    }
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

/* acquire(blocking=True, timeout=-1) -> bool, as threading.Lock's. */
static PyObject *lock_acquire(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"blocking", "timeout", NULL};
    Lock *l = (Lock *)self;
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pd:acquire", kwlist, &blocking, &timeout))
        return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if ((timeout < 0 && timeout != -1) || isnan(timeout)) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    if (lock_try(l))
        Py_RETURN_TRUE;
    if (!blocking || timeout == 0)
        Py_RETURN_FALSE;
    double until = timeout < 0 ? INFINITY : now_s() + timeout;
    for (;;) {
        double left = until - now_s(); /* (waits of an hour at most: the loop goes on) */
        long long us = isinf(until) ? -1 : left <= 0 ? 0 : (long long)(fmin(left, 3600) * 1e6);
        PyLockStatus r;
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(l->lock, us, 1);
        Py_END_ALLOW_THREADS
        if (r == PY_LOCK_ACQUIRED) {
            l->held = 1;
            Py_RETURN_TRUE;
        }
        if (r == PY_LOCK_FAILURE)
            Py_RETURN_FALSE;
        if (PyErr_CheckSignals() < 0) /* interrupted: its handler raised (Ctrl-C) */
            return NULL;
    }
}

static PyObject *lock_release(PyObject *self, PyObject *unused) {
    Lock *l = (Lock *)self;
    if (!l->held) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(l);
    Py_RETURN_NONE;
}

static PyObject *lock_locked(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(((Lock *)self)->held);
}

static PyObject *lock_enter(PyObject *self, PyObject *unused) {
    PyObject *empty = PyTuple_New(0);
    PyObject *out = empty == NULL ? NULL : lock_acquire(self, empty, NULL);
    Py_XDECREF(empty);
    return out;
}

static PyObject *lock_exit(PyObject *self, PyObject *args) {
    return lock_release(self, NULL);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.Lock's."},
    {"release", lock_release, METH_NOARGS, "Give the lock back (RuntimeError if free)."},
    {"locked", lock_locked, METH_NOARGS, "Whether the lock is held."},
    {"__enter__", lock_enter, METH_NOARGS, "acquire()"},
    {"__exit__", lock_exit, METH_VARARGS, "release()"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot lock_slots[] = {
    {Py_tp_doc, "threading.Lock's interface, its state read by the compiled steps with no "
                "call (see _calltable.c)."},
    {Py_tp_new, lock_new},
    {Py_tp_dealloc, lock_dealloc},
    {Py_tp_methods, lock_methods},
    {0, NULL},
};

static PyType_Spec lock_spec = {
    "gpuexec.executor._calltable.Lock", sizeof(Lock), 0, Py_TPFLAGS_DEFAULT, lock_slots,
};

/* -- the table's fields ------------------------------------------------------------- */

static PyObject *S_CALLS, *S_RAW, *S_REQUEST_BYTES, *S_FOLD_AT, *S_ANSWERED,
    *S_ENTER;

/* The table's counters and its refusal: calls.CallTable's ``inflight``,
 * ``max_inflight``, ``slot_waiters``, ``n_async`` (ints) and ``refusal`` (None or a
 * callable), the fields of its base class TableFields (attributes kept in a C struct,
 * ../ipc/_ring.h), which the steps read and write with no attribute lookup. */
typedef struct {
    PyObject_HEAD
    PyObject *inflight, *max_inflight, *slot_waiters, *n_async, *refusal;
} TableFields;
#define TABLE_FIELDS 5

#define TABLE_FIELD(name) {#name, T_OBJECT_EX, offsetof(TableFields, name), 0, NULL}
static PyMemberDef table_members[] = {
    TABLE_FIELD(inflight), TABLE_FIELD(max_inflight), TABLE_FIELD(slot_waiters),
    TABLE_FIELD(n_async), TABLE_FIELD(refusal), {NULL, 0, 0, 0, NULL},
};

FIELDS_TYPE(table, TableFields, inflight, TABLE_FIELDS,
            "gpuexec.executor._calltable.TableFields",
            "The call table's counters in a C struct (the base of calls.CallTable when "
            "these steps are built).");

static PyTypeObject *TableFieldsType;

/* The int field ``v`` (a table counter) as a C long: -1 with an error set when it is
 * unset (AttributeError, as reading it would) or not an int. */
static long field_long(PyObject *v, const char *name) {
    if (v == NULL) {
        PyErr_Format(PyExc_AttributeError, "the call table has no %s", name);
        return -1;
    }
    return PyLong_AsLong(v);
}

/* The table's objects the steps use, each made once by CallTable.__init__ and never
 * replaced, handed in as the tuple CallTable.fixed (no attribute lookup per call). */
typedef struct {
    PyObject *table, *lock, *ids, *pending, *stats, *metrics, *methods, *replies, *last,
        *failing, *by_all; /* by_all: CallMetrics.answered_by_all (u64 calls, f64 time) */
    long fold_at;          /* CallMetrics.fold_at (a constant of the class) */
} Refs;

/* The int attribute ``name`` of ``o`` as a C long (-1 with an error set on failure). */
static long long_attr(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    long n = PyLong_AsLong(v);
    Py_DECREF(v);
    return n;
}

/* ``t`` from ``table`` and its tuple CallTable.fixed (the objects above, in order):
 * borrowed, for as long as the caller holds the tuple; the class's fold_at. 0, or -1 with
 * TypeError (a table these steps did not build: its fields or its lock, which
 * calls.make_lock makes a Lock wherever these steps are built) or the error of reading
 * fold_at. */
static int refs_from(PyObject *table, PyObject *fixed, Refs *t) {
    if (!PyTuple_Check(fixed) || PyTuple_Size(fixed) != 10) {
        PyErr_SetString(PyExc_TypeError, "the call table's fixed objects: a tuple of 10");
        return -1;
    }
    if (!PyObject_TypeCheck(table, TableFieldsType)) {
        PyErr_SetString(PyExc_TypeError, "a call table of these steps' TableFields");
        return -1;
    }
    PyObject **at[] = {&t->lock, &t->ids, &t->pending, &t->stats, &t->metrics,
                       &t->methods, &t->replies, &t->last, &t->failing, &t->by_all};
    t->table = table;
    for (Py_ssize_t i = 0; i < 10; i++)
        *at[i] = PyTuple_GetItem(fixed, i);
    if (Py_TYPE(t->lock) != LockType) {
        PyErr_SetString(PyExc_TypeError, "the call table's lock: a Lock of these steps");
        return -1;
    }
    if ((t->fold_at = long_attr(t->metrics, S_FOLD_AT)) == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* 1: table.lock is free (no thread is inside the table), 0: held. */
static int lock_free(const Refs *t) {
    return !((Lock *)t->lock)->held; /* (a Lock: refs_from) */
}

/* A user's call made and entered in the table in one step, holding a slot and counted,
 * as CallTable.enter does it when the channel is usable and a slot is free; else (or the
 * lock is held) entered by CallTable.enter, which waits or raises. NULL on an error. */
static Call *enter_call(const Refs *t, PyObject *method, PyObject *ranks,
                        PyObject *unique_reply_rank, PyObject *timeout, PyObject *future) {
    PyObject *table = t->table, *call_id, *calls = NULL, *inflight = NULL, *n_async = NULL;
    int is_future = future != Py_None;
    /* The call first (the objects the collector counts), with the next id. */
    call_id = PyIter_Next(t->ids); /* itertools.count: no Python code */
    if (call_id == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "the call table's ids ran out");
        return NULL;
    }
    Call *call = new_call(CallType, call_id, method, ranks, unique_reply_rank, timeout,
                          future);
    Py_DECREF(call_id);
    if (call == NULL)
        return NULL;
    /* Then the lock's state, and the reads and writes with nothing run in between. */
    TableFields *tf = (TableFields *)table;
    long n_inflight, most, n_calls, futures = 0;
    int free = lock_free(t);
    if (((n_inflight = field_long(tf->inflight, "inflight")) == -1 && PyErr_Occurred()) ||
        ((most = field_long(tf->max_inflight, "max_inflight")) == -1 && PyErr_Occurred()))
        goto error;
    if (!free || tf->refusal != Py_None || n_inflight >= most) {
        /* The general path, with this call: it waits for the lock or a slot, or raises
         * the refusal. */
        PyObject *entered = PyObject_CallMethodObjArgs(table, S_ENTER, (PyObject *)call, NULL);
        if (entered == NULL)
            goto error;
        Py_DECREF(entered);
        goto done;
    }
    if (((n_calls = long_attr(t->stats, S_CALLS)) == -1 && PyErr_Occurred()) ||
        (is_future && (futures = field_long(tf->n_async, "n_async")) == -1 &&
         PyErr_Occurred()) ||
        (inflight = PyLong_FromLong(n_inflight + 1)) == NULL ||
        (calls = PyLong_FromLong(n_calls + 1)) == NULL ||
        (is_future && (n_async = PyLong_FromLong(futures + 1)) == NULL) ||
        !PyDict_Check(t->pending))
        goto error;
    if (PyDict_SetItem(t->pending, call->call_id, (PyObject *)call) < 0 ||
        PyObject_SetAttr(t->stats, S_CALLS, calls) < 0)
        goto error;
    SET_FIELD(tf->inflight, inflight);
    inflight = NULL;
    if (is_future) {
        SET_FIELD(tf->n_async, n_async);
        n_async = NULL;
    }
    SET_FIELD(call->slot, Py_NewRef(Py_True));
    goto done;
error:
    Py_CLEAR(call);
done:
    Py_XDECREF(inflight);
    Py_XDECREF(calls);
    Py_XDECREF(n_async);
    return call;
}

/* enter_new(table, fixed, method, ranks, unique_reply_rank, timeout, future):
 * enter_call. */
static PyObject *enter_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Refs t;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "enter_new takes 7 arguments");
        return NULL;
    }
    if (refs_from(args[0], args[1], &t) < 0)
        return NULL;
    return (PyObject *)enter_call(&t, args[2], args[3], args[4], args[5], args[6]);
}

/* -- answered ----------------------------------------------------------------------- */

/* Whether ``call`` simply waits for every rank it was sent to, with nothing else to do at
 * its end (no future, no waiter's event, no payload, no failure, every rank's value), and
 * ``values`` (None; a dict: rank -> value; or a list, values[i] rank i's, for a call to
 * the ranks 0..n-1 in order) holds a value for each of them: 1, 0 (not simple), -1. */
static int simple_call(Call *call, PyObject *values) {
    if (call->done != Py_False || call->failures != Py_None || call->future != Py_None ||
        call->unique_reply_rank != Py_None || call->event != Py_None ||
        call->ranks == NULL || call->started == NULL || call->nbytes == NULL ||
        call->call_id == NULL || call->method == NULL || !PyList_Check(call->ranks) ||
        call->answered_all ||
        (call->owed != NULL && !PySet_Check(call->owed)) ||
        (call->segments != NULL &&
         (!PyList_Check(call->segments) || PyList_Size(call->segments) != 0)))
        return 0;
    Py_ssize_t n = PyList_Size(call->ranks);
    if (call->owed != NULL && PySet_Size(call->owed) != n)
        return 0;
    if (values == Py_None)
        return 1;
    int in_order = PyList_Check(values); /* values[i]: rank i's (the ranks 0..n-1) */
    if (!(in_order || PyDict_Check(values)) ||
        (in_order ? PyList_Size(values) : PyDict_Size(values)) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rank = PyList_GetItem(call->ranks, i);
        int has = call->owed == NULL ? 1 : PySet_Contains(call->owed, rank);
        if (has <= 0)
            return has;
        if (in_order) {
            Py_ssize_t r = PyLong_AsSsize_t(rank);
            if (r != i)
                return r == -1 && PyErr_Occurred() ? -1 : 0;
        } else if (PyDict_GetItemWithError(values, rank) == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
    }
    return 1;
}

/* An item of the int list ``counts`` incremented (metrics.replies[rank] += 1). */
static int count_in(PyObject *counts, PyObject *rank) {
    Py_ssize_t i = PyLong_AsSsize_t(rank);
    if (i == -1 && PyErr_Occurred())
        return -1;
    PyObject *old = PyList_GetItem(counts, i);
    if (old == NULL)
        return -1;
    long n = PyLong_AsLong(old);
    if (n == -1 && PyErr_Occurred())
        return -1;
    PyObject *v = PyLong_FromLong(n + 1);
    return v == NULL ? -1 : PyList_SetItem(counts, i, v); /* steals v */
}

/* The end of a simple call (see simple_call), as CallTable.answered writes it: each rank
 * counted, the latency and request bytes of its method, the results in rank order, done,
 * out of the table, its slot back. 1: ended, 0: not for this path (nothing changed). */
static int end_simple(const Refs *t, Call *call, PyObject *values) {
    int ok = 0;
    PyObject *mstats = NULL, *raw = NULL, *now = NULL, *latency = NULL, *result = NULL,
             *nbytes = NULL, *old_bytes = NULL, *inflight = NULL;
    /* The results' list first (the one object the collector counts). */
    Py_ssize_t n = PyList_Size(call->ranks);
    if ((result = PyList_New(n)) == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = Py_None;
        if (PyList_Check(values)) /* present: simple_call looked */
            value = PyList_GetItem(values, i);
        else if (values != Py_None)
            value = PyDict_GetItemWithError(values, PyList_GetItem(call->ranks, i));
        PyList_SetItem(result, i, Py_NewRef(value)); /* a new list: cannot fail */
    }
    /* Then the lock's state, and the reads and writes with nothing run in between. */
    TableFields *tf = (TableFields *)t->table;
    long waiters, n_inflight = 0;
    int free = lock_free(t);
    if ((waiters = field_long(tf->slot_waiters, "slot_waiters")) == -1 && PyErr_Occurred())
        goto error;
    if (!free || (waiters != 0 && call->slot == Py_True))
        goto done; /* the general path waits for the lock, or notifies a slot's waiter */
    if (!PyDict_Check(t->methods) || !PyDict_Check(t->failing) ||
        PyDict_Size(t->failing) != 0 || !PyDict_Check(t->pending) ||
        !PyList_Check(t->replies) || !PyList_Check(t->last))
        goto done; /* a failing call to drop: the general path */
    mstats = PyDict_GetItemWithError(t->methods, call->method); /* borrowed */
    if (mstats == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done; /* its method not counted yet: the general path makes its stats */
    }
    Py_INCREF(mstats);
    if ((raw = PyObject_GetAttr(mstats, S_RAW)) == NULL ||
        (old_bytes = PyObject_GetAttr(mstats, S_REQUEST_BYTES)) == NULL)
        goto error;
    if (!PyList_Check(raw) || PyList_Size(raw) + 1 >= t->fold_at || !PyLong_Check(old_bytes) ||
        !PyLong_Check(call->nbytes))
        goto done; /* to be folded: the general path */
    double at = now_s();
    double started = PyFloat_AsDouble(call->started);
    /* A call to every rank (its ranks are distinct) is counted once for all of them. */
    int by_all = n == PyList_Size(t->replies) && PyByteArray_Check(t->by_all) &&
                 PyByteArray_Size(t->by_all) == 16;
    if ((started == -1.0 && PyErr_Occurred()) ||
        (!by_all && (now = PyFloat_FromDouble(at)) == NULL) ||
        (latency = PyFloat_FromDouble(at - started)) == NULL ||
        (nbytes = PyNumber_Add(old_bytes, call->nbytes)) == NULL ||
        (call->slot == Py_True &&
         (((n_inflight = field_long(tf->inflight, "inflight")) == -1 && PyErr_Occurred()) ||
          (inflight = PyLong_FromLong(n_inflight - 1)) == NULL)))
        goto error;
    /* The writes (only memory errors can fail them, as they would the general path). */
    if (by_all) {
        char *all = PyByteArray_AsString(t->by_all);
        uint64_t calls;
        memcpy(&calls, all, 8);
        calls += 1;
        memcpy(all, &calls, 8);
        memcpy(all + 8, &at, 8);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *rank = PyList_GetItem(call->ranks, i);
            Py_ssize_t r = PyLong_AsSsize_t(rank);
            if ((r == -1 && PyErr_Occurred()) || count_in(t->replies, rank) < 0 ||
                PyList_SetItem(t->last, r, Py_NewRef(now)) < 0)
                goto error;
        }
    }
    if ((call->owed != NULL ? PySet_Clear(call->owed) : (call->answered_all = 1, 0)) < 0 ||
        PyList_Append(raw, latency) < 0 ||
        PyObject_SetAttr(mstats, S_REQUEST_BYTES, nbytes) < 0)
        goto error;
    SET_FIELD(call->value, result);
    result = NULL;
    SET_FIELD(call->done, Py_NewRef(Py_True));
    if (PyDict_DelItem(t->pending, call->call_id) < 0)
        PyErr_Clear(); /* not in the table (the general path pops it the same way) */
    if (call->slot == Py_True) {
        SET_FIELD(call->slot, Py_NewRef(Py_False));
        SET_FIELD(tf->inflight, inflight);
        inflight = NULL;
    }
    ok = 1;
    goto done;
error:
    ok = -1;
done:
    Py_XDECREF(mstats);
    Py_XDECREF(raw);
    Py_XDECREF(old_bytes);
    Py_XDECREF(now);
    Py_XDECREF(latency);
    Py_XDECREF(result);
    Py_XDECREF(nbytes);
    Py_XDECREF(inflight);
    return ok;
}

/* CallTable.answered(call, values), its common case here (values: None, a dict, or a
 * list in rank order from the round trip, given to the general path as a dict). */
static PyObject *answer(const Refs *t, PyObject *call, PyObject *values) {
    int simple = 0;
    if (Py_TYPE(call) == CallType) {
        simple = simple_call((Call *)call, values);
        if (simple > 0)
            simple = end_simple(t, (Call *)call, values);
        if (simple < 0)
            return NULL;
    }
    if (simple)
        return Py_NewRef(Py_None);
    if (!PyList_Check(values))
        return PyObject_CallMethodObjArgs(t->table, S_ANSWERED, call, values, NULL);
    /* The general path takes rank -> value (a list is only ever given for ranks 0..n-1). */
    PyObject *by_rank = PyDict_New(), *out = NULL;
    for (Py_ssize_t i = 0; by_rank != NULL && i < PyList_Size(values); i++) {
        PyObject *rank = PyLong_FromSsize_t(i);
        int bad = rank == NULL || PyDict_SetItem(by_rank, rank, PyList_GetItem(values, i)) < 0;
        Py_XDECREF(rank);
        if (bad)
            Py_CLEAR(by_rank);
    }
    if (by_rank != NULL)
        out = PyObject_CallMethodObjArgs(t->table, S_ANSWERED, call, by_rank, NULL);
    Py_XDECREF(by_rank);
    return out;
}

/* answered(table, fixed, call, values): every rank ``call`` was sent to answered it at
 * once, without an error (values None: None each; else values[rank]). */
static PyObject *answered(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Refs t;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "answered takes 4 arguments");
        return NULL;
    }
    if (refs_from(args[0], args[1], &t) < 0)
        return NULL;
    return answer(&t, args[2], args[3]);
}

/* -- a blocking call's round trip over shared memory ------------------------------ */

/* The lane: what a round trip reads, fixed for the channel's life, given once to Lane()
 * by DriverChannel.__init__ as a tuple of these items (in this order); the Lane keeps
 * them, and what it reads of them on every call it reads once here: the request ring's
 * geometry, the lane's numbers, the locks' methods bound (no lookup per call). */
enum {
    L_TABLE,     /* the CallTable */
    L_PUMP,      /* the channel's pump lock */
    L_SEND,      /* its send lock */
    L_CHANNEL,   /* the channel (its _go_on and _call_bare) */
    L_TRANSPORT, /* the ShmTransport (its _moved mask; collect_more) */
    L_WRITER,    /* the request ring's RingWriter (_seq, _min_read, _claimed) */
    L_PUT,       /* the request ring's geometry (RingWriter.put_params) */
    L_SHM,       /* the ShmDriverPath (its replies, spin) */
    L_IDS,       /* the encoder's cached headers: method name -> (before, after) */
    L_MAX_SIZE,  /* max_message_size (-1: none) */
    L_EVERY,     /* every rank, as a mask */
    L_N_RANKS,
    L_FIXED,     /* CallTable.fixed (see Refs) */
    L_LEARN,     /* the encoder's bare_call (it caches a name's pieces in L_IDS) */
    L_REPLIES,   /* each rank's (before, after): the bytes around the id of its None reply */
    L_BELL,      /* the doorbell's base address (its epoch: the count of its pokes) */
    L_UNSETTLED, /* the table's unsettled futures (a deque, never replaced) */
    L_TAKEN_MAX, /* the longest reply frame read in its slot (shm_ring.TAKEN_MAX) */
    L_LEN
};
typedef struct {
    PyObject_HEAD
    PyObject *items[L_LEN]; /* as given */
    Lock *pump, *send;      /* items[L_PUMP], items[L_SEND] (checked: Locks) */
    int released;           /* set by release() (DriverChannel.close, under both locks) */
    Refs t;                 /* the table's (borrowed from items[L_FIXED]) */
    uintptr_t base, bell_base, bell; /* the request ring, its doorbell (none: 0); ours */
    long long data, n_slots, slot_size, most; /* the request ring's geometry */
    unsigned long long readers, every;
    long long max_size; /* max_message_size (-1: none) */
    Py_ssize_t n_ranks;
    double spin_s; /* the reply rings' spin (ShmDriverPath.spin) */
    uint64_t max_len;       /* items[L_TAKEN_MAX] */
    /* The reply rings as the wait reads them, for shm.replies as last read (a strong
     * reference, so that a new tuple is known by its identity; see lane_rings). Used
     * under the pump lock only. */
    PyObject *replies_seen;
    struct awaited aw;
} Lane;

/* The unsigned int ``o`` (an address, a size) into ``*v``; 0, or -1 with an error. */
static int lane_number(PyObject *o, unsigned long long *v) {
    *v = PyLong_AsUnsignedLongLong(o);
    return *v == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}
enum { P_BASE, P_DATA, P_N_SLOTS, P_SLOT_SIZE, P_MAX, P_READERS, P_BELL_BASE, P_LEN };

#define NOT_SENT 0 /* where round_trip() hands a call back: entered, not sent */
#define SENT 1     /* sent, and not complete (or complete with an error) */

static PyObject *S_MOVED, *S_REPLIES, *S_SHAPE, *S_ADDRESS, *S_SPIN, *S_CLOSING,
    *S_SETTLE, *S_COLLECT_MORE, *S_MIN_READ_SEQ, *S_GO_ON, *S_CALL_BARE;
static PyObject *INF;      /* float('inf'): the deadline of a call without one */
static PyObject *INT_ZERO; /* 0 */

/* The exception being raised, taken as a value (with its traceback). */
static PyObject *caught(void) {
    PyObject *exc_type, *exc, *tb;
    PyErr_Fetch(&exc_type, &exc, &tb);
    PyErr_NormalizeException(&exc_type, &exc, &tb);
    if (exc != NULL && tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(exc_type);
    Py_XDECREF(tb);
    return exc != NULL ? exc : Py_NewRef(Py_None);
}

/* A request frame in pieces, written into the slot one after the other. */
struct frame {
    const char *at[4];
    Py_ssize_t len[4];
    int n;
    Py_ssize_t size;
};

static void add_piece(struct frame *f, const char *at, Py_ssize_t len) {
    f->at[f->n] = at;
    f->len[f->n++] = len;
    f->size += len;
}

/* The whole frame as bytes (for the Python steps it is handed to). */
static PyObject *frame_bytes(const struct frame *f) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, f->size);
    if (out == NULL)
        return NULL;
    char *at = PyBytes_AsString(out);
    for (int i = 0; i < f->n; i++) {
        memcpy(at, f->at[i], (size_t)f->len[i]);
        at += f->len[i];
    }
    return out;
}

/* channel._go_on(call, header, stage, error): where the channel's Python steps take the
 * call up (what it returns or raises is the call's); ``header``: the request's frame
 * ``f`` as bytes when it was not sent (None once sent: the Python steps only wait;
 * where no memory is left for it, the call is handed back with that error). Steals
 * ``error``. */
static PyObject *hand_back(PyObject *channel, Call *call, const struct frame *f, int stage,
                           PyObject *error) {
    PyObject *header = f == NULL ? Py_NewRef(Py_None) : frame_bytes(f);
    if (header == NULL) {
        PyObject *no_memory = caught();
        if (error == NULL)
            error = no_memory;
        else
            Py_DECREF(no_memory);
        header = Py_NewRef(Py_None);
    }
    PyObject *st = PyLong_FromLong(stage);
    PyObject *out = st == NULL ? NULL
                               : PyObject_CallMethodObjArgs(channel, S_GO_ON, (PyObject *)call,
                                                            header, st,
                                                            error != NULL ? error : Py_None,
                                                            NULL);
    Py_XDECREF(st);
    Py_DECREF(header);
    Py_XDECREF(error);
    return out;
}

/* Send frame ``f`` as the request ring's next packet when there is room
 * (RingWriter.put_one without its wait): 1 sent, 0 no room now (or a claim open), -1
 * error. */
static int put_frame(const Lane *lane, const struct frame *f) {
    PyObject *writer = lane->items[L_WRITER];
    WriterFields *w = (WriterFields *)writer; /* (checked by lane_new) */
    long long seq, min_read, n_slots = lane->n_slots;
    if (w->seq == NULL || w->min_read == NULL || w->claimed != Py_None ||
        n_slots <= 0 || f->size + ONE_HEAD > lane->most)
        return 0; /* a claim open (or a writer not set up): the general send */
    if (((seq = PyLong_AsLongLong(w->seq)) == -1 && PyErr_Occurred()) ||
        ((min_read = PyLong_AsLongLong(w->min_read)) == -1 && PyErr_Occurred()))
        return -1;
    if (min_read <= seq - n_slots) { /* no room as last seen: look again (a call into the
                                      * writer's Python, once every n_slots sends) */
        PyObject *now_read = PyObject_CallMethodObjArgs(writer, S_MIN_READ_SEQ, NULL);
        min_read = now_read == NULL ? -1 : PyLong_AsLongLong(now_read);
        Py_XDECREF(now_read);
        if (PyErr_Occurred())
            return -1;
        if (min_read <= seq - n_slots)
            return 0; /* full: the general send waits for room */
    }
    PyObject *next = PyLong_FromLongLong(seq + 1);
    if (next == NULL)
        return -1;
    SET_FIELD(w->seq, next);
    /* As the ring core's put_one: the packet written, then published (_ring.h). */
    uint64_t off = (uint64_t)(lane->data + (seq % n_slots) * lane->slot_size);
    char *at = (char *)one_packet_head(lane->base, off, (uint32_t)f->size);
    for (int i = 0; i < f->n; i++) {
        memcpy(at, f->at[i], (size_t)f->len[i]);
        at += f->len[i];
    }
    publish_at(lane->base, off, (uint64_t)seq + 1, (uint64_t)lane->readers, lane->bell_base);
    return 1;
}

/* transport._moved |= mask (the reply rings the core released messages of; written
 * only when that adds a ring: it stays set until the transport's readers catch up). */
static int mark_moved(PyObject *transport, unsigned long long mask) {
    PyObject *moved = PyObject_GetAttr(transport, S_MOVED);
    if (moved == NULL)
        return -1;
    unsigned long long was = PyLong_AsUnsignedLongLong(moved);
    Py_DECREF(moved);
    if (was == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if ((was | mask) == was)
        return 0;
    PyObject *both = PyLong_FromUnsignedLongLong(was | mask);
    if (both == NULL)
        return -1;
    int rc = PyObject_SetAttr(transport, S_MOVED, both);
    Py_DECREF(both);
    return rc;
}

/* A call id as msgpack writes it (pack_uint): the bytes between the cached pieces of
 * its request, and of its None replies. */
struct id_text {
    unsigned char at[9];
    Py_ssize_t len;
};

/* The plain result in the reply frame of ``n`` bytes at ``at`` when it is
 * ``Reply(id, rank, value)`` of a plain value: the bytes around the id of rank's None
 * reply (``before``, ``after``: see codec.none_reply_parts), with the value in place of
 * after's first nil (see _plain.h). 1 with *value; 0 for any other frame (the
 * transport's Python steps decode it); -1 with an exception set. */
static int plain_reply(const char *at, Py_ssize_t n, const char *before, Py_ssize_t b_len,
                       const char *after, Py_ssize_t a_len, const struct id_text *middle,
                       PyObject **value) {
    Py_ssize_t id_len = middle->len;
    Py_ssize_t rank_len = a_len - 2; /* after: rank, nil (the value), nil (no error) */
    if (rank_len < 1 || n < b_len + id_len + rank_len + 2 ||
        memcmp(at, before, (size_t)b_len) || memcmp(at + b_len, middle->at, (size_t)id_len) ||
        memcmp(at + b_len + id_len, after, (size_t)rank_len) || at[n - 1] != (char)0xc0)
        return 0;
    const unsigned char *start = (const unsigned char *)at + b_len + id_len + rank_len;
    Text text = {start, (const unsigned char *)at + n - 1};
    int rc = get_plain(&text, 0, value);
    if (rc > 0 && text.at != text.end) {
        Py_CLEAR(*value);
        return 0;
    }
    return rc;
}

/* The plain result of the message ring ``i`` of ``w`` holds next (a packet of one frame,
 * the call's own plain Reply: plain_reply), read where it lies: 1 with *value, the
 * message left in place (release_next releases it); 0 when it is anything else; -1
 * with an exception set. */
static int peek_plain(const struct awaited *w, Py_ssize_t i, uint64_t max_len,
                      const struct id_text *middle, PyObject **value) {
    uint64_t seq, slot;
    uint32_t length;
    if (!next_slot(w->bases[i], ONE_READER_SEQ_OFF, w->data_off, w->n_slots, w->slot_size,
                   &seq, &slot))
        return 0;
    const unsigned char *at = one_frame_at(w->bases[i], slot, w->slot_size, max_len, &length);
    if (at == NULL)
        return 0;
    return plain_reply((const char *)at, (Py_ssize_t)length, w->before[i], w->before_len[i],
                       w->after[i], w->after_len[i], middle, value);
}

/* Release the message reply ring ``i`` of ``w`` holds next (one peek_plain read). */
static void release_next(const struct awaited *w, Py_ssize_t i) {
    uintptr_t b = w->bases[i];
    uint64_t seq = __atomic_load_n(u64_at(b, ONE_READER_SEQ_OFF), __ATOMIC_RELAXED);
    __atomic_store_n(u64_at(b, ONE_READER_SEQ_OFF), seq + 1, __ATOMIC_RELEASE);
}

/* The reply rings of shm.replies in lane->aw (bases, and each rank's None-reply bytes),
 * read again when that tuple is not the one read last (a rank was replaced; under the
 * pump lock, as the replacement is). 1 ready; 0 the transport's steps collect (no ring,
 * or more than the 64 the wait takes); -1 with an exception set. */
static int lane_rings(Lane *lane) {
    PyObject *replies = PyObject_GetAttr(lane->items[L_SHM], S_REPLIES), *shape = NULL;
    if (replies == NULL)
        return -1;
    if (replies == lane->replies_seen) {
        Py_DECREF(replies);
        return lane->aw.n > 0;
    }
    struct awaited *w = &lane->aw;
    PyObject *parts = lane->items[L_REPLIES];
    Py_CLEAR(lane->replies_seen);
    w->n = 0;
    int rc = -1;
    if (!PyTuple_Check(replies) || !PyTuple_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "Lane: the reply rings and their parts, tuples");
        goto done;
    }
    Py_ssize_t n = PyTuple_Size(replies);
    if (n == 0 || n > 64 || PyTuple_Size(parts) != n) {
        rc = 0;
        goto done;
    }
    unsigned long long at[3];
    if ((shape = PyObject_GetAttr(PyTuple_GetItem(replies, 0), S_SHAPE)) == NULL)
        goto done;
    if (!PyTuple_Check(shape) || PyTuple_Size(shape) != 3) {
        PyErr_SetString(PyExc_TypeError, "Lane: a reply ring's shape, a tuple of 3");
        goto done;
    }
    for (Py_ssize_t i = 0; i < 3; i++)
        if (lane_number(PyTuple_GetItem(shape, i), &at[i]) < 0)
            goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *address = PyObject_GetAttr(PyTuple_GetItem(replies, i), S_ADDRESS);
        PyObject *part = PyTuple_GetItem(parts, i);
        unsigned long long base = 0;
        char *before, *after;
        int ok = address != NULL && PyTuple_Check(address) && PyTuple_Size(address) == 2 &&
                 lane_number(PyTuple_GetItem(address, 1), &base) == 0 &&
                 PyTuple_Check(part) && PyTuple_Size(part) == 2 &&
                 PyBytes_AsStringAndSize(PyTuple_GetItem(part, 0), &before,
                                         &w->before_len[i]) == 0 &&
                 PyBytes_AsStringAndSize(PyTuple_GetItem(part, 1), &after,
                                         &w->after_len[i]) == 0;
        Py_XDECREF(address);
        if (!ok) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Lane: a reply ring's address or parts");
            goto done;
        }
        w->bases[i] = (uintptr_t)base;
        w->before[i] = before;
        w->after[i] = after;
    }
    w->data_off = at[0];
    w->n_slots = at[1];
    w->slot_size = at[2];
    if (w->n_slots == 0) {
        rc = 0;
        goto done;
    }
    w->n = n;
    lane->replies_seen = Py_NewRef(replies);
    rc = 1;
done:
    Py_XDECREF(shape);
    Py_DECREF(replies);
    return rc;
}

/* The replies to ``call`` collected and the call ended, under the pump lock: every
 * rank's None result known by its bytes and released as it comes (the common case: one
 * wait), or plain results read where they lie and released once every rank answered,
 * over as many waits as the ranks take to answer; anything else (a failure, a value the
 * codec must read, nothing before the deadline or a poke, the table closing) handed to
 * the transport's own steps (collect_more) with the None results taken so far, every
 * other reply left in its ring for them to read. The wait is the ring core's
 * (../ipc/_collect.h), run here on the lane's rings with no call through Python. 0 done
 * with this step (the call may still be owed: the caller waits), -1 error. */
static int first_collect(Lane *lane, Call *call, const struct id_text *middle) {
    PyObject *table = lane->items[L_TABLE], *transport = lane->items[L_TRANSPORT];
    PyObject *deadline = NULL, *closing = NULL, *result = NULL, *more = NULL;
    PyObject *vals[64]; /* each peeked rank's plain result (set for the bits of peeked) */
    struct awaited *w = &lane->aw;
    unsigned long long every = lane->every, want = every, taken = 0, peeked = 0, left = 0;
    int rc = -1, passed = 0;
    double deadline_s;
    deadline = Py_NewRef(call->deadline == Py_None ? INF : call->deadline);
    if ((deadline_s = PyFloat_AsDouble(deadline)) == -1.0 && PyErr_Occurred())
        goto done;
    int rings = lane_rings(lane);
    if (rings < 0)
        goto done;
    if (rings == 0)
        goto to_python; /* more ranks than the wait takes: the transport's steps */
    for (;;) {
        /* The epoch before the check: a poke after it ends the wait (see ShmTransport;
         * ShmDriverPath.epoch reads the same word). */
        uint32_t seen = __atomic_load_n(u32_at(lane->bell, BELL_COUNTER), __ATOMIC_ACQUIRE);
        SET_FIELD(closing, PyObject_GetAttr(table, S_CLOSING));
        int closed = closing == NULL ? -1 : PyObject_IsTrue(closing);
        if (closed < 0)
            goto done;
        if (closed && !passed) {
            rc = 0; /* the caller's wait sees the close */
            goto done;
        }
        if (closed)
            goto to_python; /* what was taken is delivered there */
        w->middle = (const char *)middle->at;
        w->middle_len = middle->len;
        w->want = want;
        w->taken = w->other = 0;
        if (wait_bell(lane->bell, seen, now_s() + lane->spin_s, deadline_s, scan_awaited,
                      w) < 0)
            goto done;
        passed = 1;
        unsigned long long took = w->taken, other = w->other;
        taken |= took;
        /* released by the core: the readers catch up when next used */
        if (took && mark_moved(transport, took) < 0)
            goto done;
        if (taken == every && !peeked) {
            result = answer(&lane->t, (PyObject *)call, Py_None); /* the common case */
            rc = result == NULL ? -1 : 0;
            goto done;
        }
        for (unsigned long long open = other; open; open &= open - 1) {
            int i = __builtin_ctzll(open);
            PyObject *value = NULL;
            int got = peek_plain(w, i, lane->max_len, middle, &value);
            if (got < 0)
                goto done;
            if (got) {
                vals[i] = value;
                peeked |= 1ull << i;
            } else {
                left |= 1ull << i;
            }
        }
        if (left || !(took | other))
            goto to_python; /* a reply the codec must read, or nothing came */
        if ((taken | peeked) == every) { /* results, each rank's own, read here */
            PyObject *values = PyList_New(lane->n_ranks);
            if (values == NULL)
                goto done;
            for (Py_ssize_t i = 0; i < lane->n_ranks; i++)
                PyList_SetItem(values, i, Py_NewRef((peeked >> i) & 1 ? vals[i] : Py_None));
            for (unsigned long long open = peeked; open; open &= open - 1)
                release_next(w, __builtin_ctzll(open));
            result = mark_moved(transport, peeked) < 0
                         ? NULL
                         : answer(&lane->t, (PyObject *)call, values);
            Py_DECREF(values);
            rc = result == NULL ? -1 : 0;
            goto done;
        }
        /* Ranks still owed: another wait for theirs, spinning afresh. */
        want = every & ~(taken | peeked);
    }
to_python: /* the transport's own steps from here: the None results taken so far, and
            * every other reply still in its ring (a plain one read here too: read again
            * there) */
    if (passed) {
        PyObject *a = PyLong_FromUnsignedLongLong(taken),
                 *c = PyLong_FromUnsignedLongLong(left | peeked), *d = PyTuple_New(0);
        more = a == NULL || c == NULL || d == NULL ? NULL : PyTuple_Pack(4, a, INT_ZERO, c, d);
        Py_XDECREF(a);
        Py_XDECREF(c);
        Py_XDECREF(d);
        if (more == NULL)
            goto done;
    }
    result = PyObject_CallMethodObjArgs(transport, S_COLLECT_MORE, (PyObject *)call, deadline,
                                        more != NULL ? more : Py_None, NULL);
    rc = result == NULL ? -1 : 0;
done:
    for (unsigned long long open = peeked; open; open &= open - 1)
        Py_DECREF(vals[__builtin_ctzll(open)]);
    Py_XDECREF(deadline);
    Py_XDECREF(closing);
    Py_XDECREF(result);
    Py_XDECREF(more);
    return rc;
}

/* The rest of a blocking call's round trip once it is entered and its request frame
 * ``f`` made: sent under the pump and send locks when both are free, its replies
 * collected and the call ended; its list of results, or what channel._go_on gives for
 * what is handed back (see Lane.round_trip). */
static PyObject *trip(Lane *lane, Call *call, const struct frame *f,
                      const struct id_text *middle) {
    PyObject *channel = lane->items[L_CHANNEL];
    PyObject *nbytes = PyLong_FromSsize_t(f->size); /* (the metrics') */
    if (nbytes == NULL)
        return hand_back(channel, call, f, NOT_SENT, caught());
    SET_FIELD(call->nbytes, nbytes);
    /* The send, under the pump lock and the send lock, when both are free. */
    if (!lock_try(lane->pump))
        return hand_back(channel, call, f, NOT_SENT, NULL);
    int sent = 0;
    if (lock_try(lane->send)) {
        sent = lane->released ? 0 : put_frame(lane, f); /* released: _go_on raises */
        lock_give(lane->send);
    }
    if (sent <= 0) {
        PyObject *error = sent < 0 ? caught() : NULL;
        lock_give(lane->pump);
        return hand_back(channel, call, f, NOT_SENT, error);
    }
    /* The replies, still under the pump lock. */
    int rc = first_collect(lane, call, middle);
    PyObject *error = rc < 0 ? caught() : NULL;
    lock_give(lane->pump);
    if (error != NULL)
        return hand_back(channel, call, NULL, SENT, error);
    int queued = PyObject_IsTrue(lane->items[L_UNSETTLED]);
    if (queued > 0) {
        PyObject *r = PyObject_CallMethodObjArgs(lane->items[L_TABLE], S_SETTLE, NULL);
        queued = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    if (queued < 0)
        return NULL; /* (as the general path: an error of settle() is raised) */
    if (call->done == Py_True && call->error == Py_None)
        return Py_NewRef(call->value);
    return hand_back(channel, call, NULL, SENT, NULL);
}

/* The cached pieces around the id of a call by name without arguments to ``method``
 * (the encoder's, made by its bare_call when ``learn``), when the call may take the
 * round trip (to every rank, ``ranks`` a list of them): 1 with new references in
 * *before, *after (the encoder may clear its dict while another thread runs); 0 not; -1
 * with an exception set. */
static int pieces_for(const Lane *lane, PyObject *method, PyObject *ranks, int learn,
                      PyObject **before, PyObject **after) {
    PyObject *ids = lane->items[L_IDS];
    PyObject *parts = PyDict_GetItemWithError(ids, method); /* borrowed */
    if (parts == NULL && !PyErr_Occurred() && learn && PyUnicode_CheckExact(method)) {
        PyObject *zero = PyLong_FromLong(0);
        PyObject *made = zero == NULL ? NULL
                                      : PyObject_CallFunctionObjArgs(lane->items[L_LEARN],
                                                                     zero, method, NULL);
        Py_XDECREF(zero);
        Py_XDECREF(made);
        if (made == NULL)
            return -1;
        parts = PyDict_GetItemWithError(ids, method);
    }
    if (parts == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!(PyTuple_Check(parts) && PyTuple_Size(parts) == 2 &&
          PyBytes_Check(*before = PyTuple_GetItem(parts, 0)) &&
          PyBytes_Check(*after = PyTuple_GetItem(parts, 1)) && PyList_Check(ranks) &&
          PyList_Size(ranks) == lane->n_ranks))
        return 0;
    Py_INCREF(*before);
    Py_INCREF(*after);
    return 1;
}

/* The call entered and its request made of ``before`` + its id + ``after`` (its last
 * ``drop`` bytes left out) + ``body``, then trip(). ``method``..``timeout``: enter_call's. */
static PyObject *enter_and_trip(Lane *lane, PyObject *method, PyObject *ranks,
                                PyObject *timeout, PyObject *before, PyObject *after,
                                Py_ssize_t drop, const char *body, Py_ssize_t body_len) {
    Call *call = enter_call(&lane->t, method, ranks, Py_None, timeout, Py_None);
    if (call == NULL)
        return NULL; /* refused: nothing was sent */
    struct id_text middle;
    uint64_t id = PyLong_AsUnsignedLongLong(call->call_id);
    middle.len = pack_uint(id, middle.at);
    struct frame f = {{NULL}, {0}, 0, 0};
    add_piece(&f, PyBytes_AsString(before), PyBytes_Size(before));
    add_piece(&f, (const char *)middle.at, middle.len);
    add_piece(&f, PyBytes_AsString(after), PyBytes_Size(after) - drop);
    if (body_len)
        add_piece(&f, body, body_len);
    PyObject *out = PyErr_Occurred()
                        ? hand_back(lane->items[L_CHANNEL], call, &f, NOT_SENT, caught())
                        : trip(lane, call, &f, &middle);
    Py_DECREF(call);
    return out;
}

/* Lane.round_trip(method, ranks, timeout): DriverChannel.call_bare, the whole round trip
 * of a blocking call by name over shared memory in one call: the call made and entered,
 * its cached header written into the request ring under the pump and send locks, its
 * replies collected (None results known by their bytes, plain values read here) and
 * recorded, its list of results returned. A name without a cached header (or one over
 * max_message_size, or not every rank): channel._call_bare does it all. Anything else
 * that is not the common case is handed to channel._go_on(call, header, stage, error),
 * whose outcome is the call's: NOT_SENT (the pump or send lock taken, the channel
 * released, the ring full), SENT (a reply still owed, or not read here, or the call ended
 * with an error); ``error``: an exception raised while it sent (NOT_SENT) or waited
 * (SENT: Ctrl-C), taken as a value with every lock given back first. */
static PyObject *lane_round_trip(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Lane *lane = (Lane *)self;
    PyObject *before = NULL, *after = NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "round_trip(method, ranks, timeout)");
        return NULL;
    }
    int ok = pieces_for(lane, args[0], args[1], 0, &before, &after);
    if (ok < 0)
        return NULL;
    PyObject *out;
    if (!ok || (lane->max_size >= 0 &&
                PyBytes_Size(before) + 9 + PyBytes_Size(after) > lane->max_size))
        out = PyObject_CallMethodObjArgs(lane->items[L_CHANNEL], S_CALL_BARE, args[0],
                                         args[1], args[2], NULL); /* nothing done here */
    else
        out = enter_and_trip(lane, args[0], args[1], args[2], before, after, 0, NULL, 0);
    Py_XDECREF(before);
    Py_XDECREF(after);
    return out;
}

#define BODY_MAX 8192 /* a call's arguments written here first: longer ones are Python's */

/* Lane.call_plain(method, args, kwargs, ranks, timeout): DriverChannel.call_plain, the
 * round trip of a blocking call by name with plain arguments (``args`` a tuple or list,
 * ``kwargs`` None or a dict with str keys, every value plain msgpack data: _plain.h) to
 * every rank over shared memory, as round_trip does it, its request written as msgspec
 * writes Call(id, method, None, args, kwargs): its list of results. None, having done
 * nothing, for any other call (a value that is not plain, arguments over BODY_MAX bytes
 * or max_message_size, a name the encoder cannot write): the caller's general path. */
static PyObject *lane_call_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Lane *lane = (Lane *)self;
    PyObject *before = NULL, *after = NULL;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "call_plain(method, args, kwargs, ranks, timeout)");
        return NULL;
    }
    PyObject *call_args = args[1], *call_kwargs = args[2];
    if (!(PyTuple_CheckExact(call_args) || PyList_CheckExact(call_args)) ||
        !(call_kwargs == Py_None || PyDict_CheckExact(call_kwargs)))
        Py_RETURN_NONE;
    /* The arguments first, into a buffer: a value that is not plain costs nothing else. */
    unsigned char body[BODY_MAX];
    Room room = {body, body + BODY_MAX, 0};
    int rc = put_items(&room, call_args, 0);
    if (rc > 0)
        rc = call_kwargs == Py_None ? put_bytes(&room, "\x80", 1) : put_map(&room, call_kwargs, 0);
    if (rc > 0)
        rc = put_bytes(&room, "\xff", 1); /* value_rank -1: every rank's value */
    if (rc <= 0)
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    int ok = pieces_for(lane, args[0], args[3], 1, &before, &after);
    if (ok < 0)
        return NULL;
    Py_ssize_t body_len = room.at - body;
    PyObject *out;
    /* The bare header's after ends with its arguments: [] {} -1 (0x90 0x80 0xff). */
    if (!ok || PyBytes_Size(after) < 3 ||
        (lane->max_size >= 0 &&
         PyBytes_Size(before) + 9 + PyBytes_Size(after) - 3 + body_len > lane->max_size))
        out = Py_NewRef(Py_None);
    else
        out = enter_and_trip(lane, args[0], args[3], args[4], before, after, 3,
                             (const char *)body, body_len);
    Py_XDECREF(before);
    Py_XDECREF(after);
    return out;
}

/* -- the Lane ----------------------------------------------------------------------- */

static int lane_clear(PyObject *self) {
    Lane *lane = (Lane *)self;
    for (int i = 0; i < L_LEN; i++)
        Py_CLEAR(lane->items[i]);
    lane->pump = lane->send = NULL; /* (borrowed from the items) */
    Py_CLEAR(lane->replies_seen);
    lane->aw.n = 0;
    lane->t.table = NULL; /* (borrowed from the items) */
    return 0;
}

static int lane_traverse(PyObject *self, visitproc visit, void *arg) {
    Lane *lane = (Lane *)self;
    for (int i = 0; i < L_LEN; i++)
        Py_VISIT(lane->items[i]);
    Py_VISIT(lane->replies_seen);
    Py_VISIT((PyObject *)Py_TYPE(self)); /* a heap type */
    return 0;
}

static void lane_dealloc(PyObject *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

/* 0 when ``writer`` keeps its position in the ring core's WriterFields (the struct of
 * ../ipc/_ring.h, which put_frame reads), else -1 with TypeError. */
static int writer_checked(PyObject *writer) {
    PyObject *core = PyImport_ImportModule("gpuexec.ipc._ringcore");
    PyObject *type = core == NULL ? NULL : PyObject_GetAttrString(core, "WriterFields");
    PyObject *size = type == NULL ? NULL : PyObject_GetAttrString(type, "__basicsize__");
    int ok = size != NULL && PyType_Check(type) &&
             PyObject_TypeCheck(writer, (PyTypeObject *)type) &&
             PyLong_AsSsize_t(size) == (Py_ssize_t)sizeof(WriterFields);
    Py_XDECREF(core);
    Py_XDECREF(type);
    Py_XDECREF(size);
    if (ok)
        return 0;
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "Lane: a request ring writer of the ring core's "
                                         "WriterFields");
    return -1;
}

/* Lane(items): the tuple of the L_ items above. */
static PyObject *lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *items;
    if (!PyArg_ParseTuple(args, "O!:Lane", &PyTuple_Type, &items))
        return NULL;
    if (PyTuple_Size(items) != L_LEN) {
        PyErr_SetString(PyExc_TypeError, "Lane(items): a tuple of the round trip's items");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Lane *lane = (Lane *)alloc(type, 0);
    if (lane == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < L_LEN; i++)
        lane->items[i] = Py_NewRef(PyTuple_GetItem(items, i));
    PyObject *put = lane->items[L_PUT], *spin = NULL;
    unsigned long long at[P_LEN], bell, every, n_ranks, max_len;
    long long max_size;
    if (refs_from(lane->items[L_TABLE], lane->items[L_FIXED], &lane->t) < 0 ||
        writer_checked(lane->items[L_WRITER]) < 0)
        goto error;
    if (!PyTuple_Check(put) || PyTuple_Size(put) != P_LEN) {
        PyErr_SetString(PyExc_TypeError, "Lane: the request ring's geometry, a tuple of 7");
        goto error;
    }
    for (Py_ssize_t i = 0; i < P_LEN; i++)
        if (lane_number(PyTuple_GetItem(put, i), &at[i]) < 0)
            goto error;
    if (lane_number(lane->items[L_BELL], &bell) < 0 ||
        lane_number(lane->items[L_EVERY], &every) < 0 ||
        lane_number(lane->items[L_N_RANKS], &n_ranks) < 0 ||
        lane_number(lane->items[L_TAKEN_MAX], &max_len) < 0 ||
        ((max_size = PyLong_AsLongLong(lane->items[L_MAX_SIZE])) == -1 && PyErr_Occurred()) ||
        (spin = PyObject_GetAttr(lane->items[L_SHM], S_SPIN)) == NULL ||
        ((lane->spin_s = PyFloat_AsDouble(spin)) == -1.0 && PyErr_Occurred()))
        goto error;
    Py_CLEAR(spin);
    lane->base = (uintptr_t)at[P_BASE];
    lane->data = (long long)at[P_DATA];
    lane->n_slots = (long long)at[P_N_SLOTS];
    lane->slot_size = (long long)at[P_SLOT_SIZE];
    lane->most = (long long)at[P_MAX];
    lane->readers = at[P_READERS];
    lane->bell_base = (uintptr_t)at[P_BELL_BASE];
    lane->bell = (uintptr_t)bell;
    lane->every = every;
    lane->n_ranks = (Py_ssize_t)n_ranks;
    lane->max_size = max_size;
    lane->max_len = max_len;
    PyObject *pump = lane->items[L_PUMP], *send = lane->items[L_SEND];
    if (Py_TYPE(pump) != LockType || Py_TYPE(send) != LockType) { /* (the table's: refs_from) */
        PyErr_SetString(PyExc_TypeError, "Lane: the pump and send locks are Locks");
        goto error;
    }
    lane->pump = (Lock *)pump;
    lane->send = (Lock *)send;
    return (PyObject *)lane;
error:
    Py_XDECREF(spin);
    Py_DECREF(lane);
    return NULL;
}

/* release(): the channel released its transport (DriverChannel.close, holding the pump
 * and send locks): no round trip writes into its rings from now on (each hands its call
 * back, whose general path finds the channel closed). */
static PyObject *lane_release(PyObject *self, PyObject *unused) {
    ((Lane *)self)->released = 1;
    Py_RETURN_NONE;
}

static PyMethodDef lane_methods[] = {
    {"release", lane_release, METH_NOARGS,
     "The channel released its transport: no round trip writes into its rings."},
    {"round_trip", (PyCFunction)(void (*)(void))lane_round_trip, METH_FASTCALL,
     "A blocking call by name over shared memory, sent and collected (see the source)."},
    {"call_plain", (PyCFunction)(void (*)(void))lane_call_plain, METH_FASTCALL,
     "round_trip of a call with plain arguments, or None (see the source)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot lane_slots[] = {
    {Py_tp_doc, "What a channel's round trips read over shared memory, fixed for its life "
                "(DriverChannel.__init__ makes it; see the source)."},
    {Py_tp_new, lane_new},
    {Py_tp_dealloc, lane_dealloc},
    {Py_tp_traverse, lane_traverse},
    {Py_tp_clear, lane_clear},
    {Py_tp_methods, lane_methods},
    {0, NULL},
};

static PyType_Spec lane_spec = {
    "gpuexec.executor._calltable.Lane", sizeof(Lane), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, lane_slots,
};

/* -- the module --------------------------------------------------------------------- */

static PyMethodDef table_functions[] = {
    {"enter_new", (PyCFunction)(void (*)(void))enter_new, METH_FASTCALL,
     "A user's call made and entered in the table (CallTable._new_call)."},
    {"answered", (PyCFunction)(void (*)(void))answered, METH_FASTCALL,
     "CallTable.answered, its common case in compiled code."},
    {NULL, NULL, 0, NULL},
};

static int intern_all(void) {
    struct {
        PyObject **at;
        const char *name;
    } names[] = {
        {&S_CALLS, "calls"},         {&S_RAW, "raw"},
        {&S_REQUEST_BYTES, "request_bytes"}, {&S_FOLD_AT, "fold_at"},
        {&S_ANSWERED, "answered"},   {&S_ENTER, "enter"},
        {&S_MOVED, "_moved"},
        {&S_REPLIES, "replies"},     {&S_SHAPE, "shape"},
        {&S_ADDRESS, "address"},     {&S_SPIN, "spin"},
        {&S_CLOSING, "closing"},     {&S_SETTLE, "settle"},
        {&S_COLLECT_MORE, "collect_more"}, {&S_MIN_READ_SEQ, "_min_read_seq"},
        {&S_GO_ON, "_go_on"},        {&S_CALL_BARE, "_call_bare"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].at = PyUnicode_InternFromString(names[i].name)) == NULL)
            return -1;
    return 0;
}

static struct PyModuleDef table_module = {
    PyModuleDef_HEAD_INIT, "_calltable",
    "The call table's hot steps in compiled code (see gpuexec.executor.calls).", -1,
    table_functions, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__calltable(void) {
    if (intern_all() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&table_module);
    if (m == NULL)
        return NULL;
    CallType = (PyTypeObject *)PyType_FromSpec(&call_spec);
    TableFieldsType = (PyTypeObject *)PyType_FromSpec(&table_spec);
    LockType = (PyTypeObject *)PyType_FromSpec(&lock_spec);
    PyObject *lane_type = PyType_FromSpec(&lane_spec);
    if (CallType == NULL || PyModule_AddObject(m, "PendingCall", Py_NewRef(CallType)) < 0 ||
        TableFieldsType == NULL ||
        PyModule_AddObject(m, "TableFields", Py_NewRef(TableFieldsType)) < 0 ||
        LockType == NULL || PyModule_AddObject(m, "Lock", Py_NewRef(LockType)) < 0 ||
        lane_type == NULL || PyModule_AddObject(m, "Lane", lane_type) < 0 ||
        (INF = PyFloat_FromDouble(INFINITY)) == NULL ||
        (INT_ZERO = PyLong_FromLong(0)) == NULL ||
        PyModule_AddIntConstant(m, "API", CALLTABLE_API) < 0 ||
        PyModule_AddIntConstant(m, "NOT_SENT", NOT_SENT) < 0 ||
        PyModule_AddIntConstant(m, "SENT", SENT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
