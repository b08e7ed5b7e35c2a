/* The call table's hot steps in compiled code: a user's call's entry, and its end when
 * every rank answered it at once (gpuexec.executor.calls: CallTable.enter and
 * CallTable.answered are the general forms, and the pure-Python twin of both steps).
 *
 *   enter_new(table, method, ranks,            a user's call made and entered
 *             unique_reply_rank, timeout, future)
 *   answered(table, call, values)              the call ended with its results
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
 * builds only.)
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

#include <stddef.h>
#include <time.h>

#define CALLTABLE_API 1 /* calls.py's API must be the same */

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
} Call;

#define N_FIELDS 19
#define FIELD(name) {#name, T_OBJECT_EX, offsetof(Call, name), 0, NULL}
static PyMemberDef call_members[] = {
    FIELD(call_id), FIELD(deadline), FIELD(done), FIELD(error), FIELD(event),
    FIELD(failures), FIELD(future), FIELD(method), FIELD(nbytes), FIELD(owed),
    FIELD(ping), FIELD(ranks), FIELD(segments), FIELD(slot), FIELD(started),
    FIELD(timeout), FIELD(unique_reply_rank), FIELD(value), FIELD(values),
    {NULL, 0, 0, 0, NULL},
};

static PyObject **call_fields(Call *c) { return &c->call_id; }

static PyTypeObject *CallType;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

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
    c->owed = PySet_New(ranks);
    c->values = PyDict_New();
    c->segments = PyList_New(0);
    if (c->started == NULL || c->deadline == NULL || c->nbytes == NULL || c->owed == NULL ||
        c->values == NULL || c->segments == NULL) {
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
    PyObject **f = call_fields((Call *)self);
    for (int i = 0; i < N_FIELDS; i++)
        Py_VISIT(f[i]);
    Py_VISIT((PyObject *)Py_TYPE(self)); /* a heap type */
    return 0;
}

static int call_clear(PyObject *self) {
    PyObject **f = call_fields((Call *)self);
    for (int i = 0; i < N_FIELDS; i++)
        Py_CLEAR(f[i]);
    return 0;
}

static void call_dealloc(PyObject *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    call_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
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
    {Py_tp_methods, call_methods},
    {0, NULL},
};

static PyType_Spec call_spec = {
    "gpuexec.executor._calltable.PendingCall", sizeof(Call), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, call_slots,
};

/* -- the table's fields ------------------------------------------------------------- */

static PyObject *S_LOCK, *S_LOCKED, *S_REFUSAL, *S_INFLIGHT, *S_MAX_INFLIGHT, *S_IDS,
    *S_PENDING, *S_STATS, *S_CALLS, *S_METRICS, *S_METHODS, *S_RAW, *S_REQUEST_BYTES,
    *S_REPLIES, *S_LAST_REPLY, *S_FAILING, *S_SLOT_WAITERS, *S_FOLD_AT, *S_ANSWERED, *S_ENTER, *S_N_ASYNC;

/* 1: table.lock is free (no thread is inside the table), 0: held, -1: error. */
static int lock_free(PyObject *table) {
    PyObject *lock = PyObject_GetAttr(table, S_LOCK);
    if (lock == NULL)
        return -1;
    PyObject *held = PyObject_CallMethodObjArgs(lock, S_LOCKED, NULL);
    Py_DECREF(lock);
    if (held == NULL)
        return -1;
    int free = held == Py_False;
    Py_DECREF(held);
    return free;
}

/* The int attribute ``name`` of ``o`` as a C long (-1 with an error set on failure). */
static long long_attr(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    long n = PyLong_AsLong(v);
    Py_DECREF(v);
    return n;
}

/* ``o.name += delta`` for an int attribute; -1 on error. */
static int add_to_attr(PyObject *o, PyObject *name, long delta) {
    long n = long_attr(o, name);
    if (n == -1 && PyErr_Occurred())
        return -1;
    PyObject *v = PyLong_FromLong(n + delta);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return rc;
}

/* enter_new(table, method, ranks, unique_reply_rank, timeout, future): a user's call
 * made and entered in the table in one step, holding a slot and counted, as
 * CallTable.enter does it when the channel is usable and a slot is free; else (or the
 * lock is held) entered by CallTable.enter, which waits or raises. */
static PyObject *enter_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "enter_new takes 6 arguments");
        return NULL;
    }
    PyObject *table = args[0], *ids, *call_id, *pending = NULL, *stats = NULL, *calls = NULL,
             *inflight = NULL, *refusal = NULL, *n_async = NULL;
    int is_future = args[5] != Py_None;
    /* The call first (the objects the collector counts), with the next id. */
    if ((ids = PyObject_GetAttr(table, S_IDS)) == NULL)
        return NULL;
    call_id = PyIter_Next(ids); /* itertools.count: no Python code */
    Py_DECREF(ids);
    if (call_id == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "the call table's ids ran out");
        return NULL;
    }
    Call *call = new_call(CallType, call_id, args[1], args[2], args[3], args[4], args[5]);
    Py_DECREF(call_id);
    if (call == NULL)
        return NULL;
    /* Then the lock's state, and the reads and writes with nothing run in between. */
    long n_inflight, most, n_calls, futures = 0;
    int free = lock_free(table);
    if (free < 0 || (refusal = PyObject_GetAttr(table, S_REFUSAL)) == NULL ||
        ((n_inflight = long_attr(table, S_INFLIGHT)) == -1 && PyErr_Occurred()) ||
        ((most = long_attr(table, S_MAX_INFLIGHT)) == -1 && PyErr_Occurred()))
        goto error;
    if (!free || refusal != Py_None || n_inflight >= most) {
        /* The general path, with this call: it waits for the lock or a slot, or raises
         * the refusal. */
        PyObject *entered = PyObject_CallMethodObjArgs(table, S_ENTER, (PyObject *)call, NULL);
        if (entered == NULL)
            goto error;
        Py_DECREF(entered);
        goto done;
    }
    if ((pending = PyObject_GetAttr(table, S_PENDING)) == NULL ||
        (stats = PyObject_GetAttr(table, S_STATS)) == NULL ||
        ((n_calls = long_attr(stats, S_CALLS)) == -1 && PyErr_Occurred()) ||
        (is_future && (futures = long_attr(table, S_N_ASYNC)) == -1 && PyErr_Occurred()) ||
        (inflight = PyLong_FromLong(n_inflight + 1)) == NULL ||
        (calls = PyLong_FromLong(n_calls + 1)) == NULL ||
        (n_async = PyLong_FromLong(futures + 1)) == NULL)
        goto error;
    if (PyDict_SetItem(pending, call->call_id, (PyObject *)call) < 0 ||
        PyObject_SetAttr(table, S_INFLIGHT, inflight) < 0 ||
        PyObject_SetAttr(stats, S_CALLS, calls) < 0 ||
        (is_future && PyObject_SetAttr(table, S_N_ASYNC, n_async) < 0))
        goto error;
    SET_FIELD(call->slot, Py_NewRef(Py_True));
    goto done;
error:
    Py_CLEAR(call);
done:
    Py_XDECREF(pending);
    Py_XDECREF(stats);
    Py_XDECREF(refusal);
    Py_XDECREF(inflight);
    Py_XDECREF(calls);
    Py_XDECREF(n_async);
    return (PyObject *)call;
}

/* -- answered ----------------------------------------------------------------------- */

/* Whether ``call`` simply waits for every rank it was sent to, with nothing else to do at
 * its end (no future, no waiter's event, no payload, no failure, every rank's value), and
 * ``values`` (None or a dict) holds a value for each of them: 1, 0 (not simple), -1. */
static int simple_call(Call *call, PyObject *values) {
    if (call->done != Py_False || call->failures != Py_None || call->future != Py_None ||
        call->unique_reply_rank != Py_None || call->event != Py_None ||
        call->ranks == NULL || call->owed == NULL || call->segments == NULL ||
        call->started == NULL || call->nbytes == NULL || call->call_id == NULL ||
        call->method == NULL || !PyList_Check(call->ranks) || !PySet_Check(call->owed) ||
        !PyList_Check(call->segments) || PyList_Size(call->segments) != 0)
        return 0;
    Py_ssize_t n = PyList_Size(call->ranks);
    if (PySet_Size(call->owed) != n)
        return 0;
    if (values == Py_None)
        return 1;
    if (!PyDict_Check(values) || PyDict_Size(values) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rank = PyList_GetItem(call->ranks, i);
        int has = PySet_Contains(call->owed, rank);
        if (has <= 0)
            return has;
        if (PyDict_GetItemWithError(values, rank) == NULL)
            return PyErr_Occurred() ? -1 : 0;
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
static int end_simple(PyObject *table, Call *call, PyObject *values) {
    int ok = 0;
    PyObject *metrics = NULL, *methods = NULL, *mstats = NULL, *raw = NULL, *failing = NULL,
             *replies = NULL, *last = NULL, *now = NULL, *latency = NULL, *result = NULL,
             *pending = NULL, *nbytes = NULL, *old_bytes = NULL;
    /* The results' list first (the one object the collector counts). */
    Py_ssize_t n = PyList_Size(call->ranks);
    if ((result = PyList_New(n)) == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = Py_None;
        if (values != Py_None) /* present: simple_call looked */
            value = PyDict_GetItemWithError(values, PyList_GetItem(call->ranks, i));
        PyList_SetItem(result, i, Py_NewRef(value)); /* a new list: cannot fail */
    }
    /* Then the lock's state, and the reads and writes with nothing run in between. */
    long waiters, fold_at;
    int free = lock_free(table);
    if (free < 0 || ((waiters = long_attr(table, S_SLOT_WAITERS)) == -1 && PyErr_Occurred()))
        goto error;
    if (!free || (waiters != 0 && call->slot == Py_True))
        goto done; /* the general path waits for the lock, or notifies a slot's waiter */
    if ((metrics = PyObject_GetAttr(table, S_METRICS)) == NULL ||
        (methods = PyObject_GetAttr(metrics, S_METHODS)) == NULL ||
        (failing = PyObject_GetAttr(table, S_FAILING)) == NULL ||
        (pending = PyObject_GetAttr(table, S_PENDING)) == NULL ||
        (replies = PyObject_GetAttr(metrics, S_REPLIES)) == NULL ||
        (last = PyObject_GetAttr(metrics, S_LAST_REPLY)) == NULL ||
        ((fold_at = long_attr(metrics, S_FOLD_AT)) == -1 && PyErr_Occurred()))
        goto error;
    if (!PyDict_Check(methods) || !PyDict_Check(failing) || PyDict_Size(failing) != 0 ||
        !PyDict_Check(pending) || !PyList_Check(replies) || !PyList_Check(last))
        goto done; /* a failing call to drop: the general path */
    mstats = PyDict_GetItemWithError(methods, call->method); /* borrowed */
    if (mstats == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done; /* its method not counted yet: the general path makes its stats */
    }
    Py_INCREF(mstats);
    if ((raw = PyObject_GetAttr(mstats, S_RAW)) == NULL ||
        (old_bytes = PyObject_GetAttr(mstats, S_REQUEST_BYTES)) == NULL)
        goto error;
    if (!PyList_Check(raw) || PyList_Size(raw) + 1 >= fold_at || !PyLong_Check(old_bytes) ||
        !PyLong_Check(call->nbytes))
        goto done; /* to be folded: the general path */
    double t = now_s();
    double started = PyFloat_AsDouble(call->started);
    if ((started == -1.0 && PyErr_Occurred()) || (now = PyFloat_FromDouble(t)) == NULL ||
        (latency = PyFloat_FromDouble(t - started)) == NULL ||
        (nbytes = PyNumber_Add(old_bytes, call->nbytes)) == NULL)
        goto error;
    /* The writes (only memory errors can fail them, as they would the general path). */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rank = PyList_GetItem(call->ranks, i);
        Py_ssize_t r = PyLong_AsSsize_t(rank);
        if ((r == -1 && PyErr_Occurred()) || count_in(replies, rank) < 0 ||
            PyList_SetItem(last, r, Py_NewRef(now)) < 0)
            goto error;
    }
    if (PySet_Clear(call->owed) < 0 || PyList_Append(raw, latency) < 0 ||
        PyObject_SetAttr(mstats, S_REQUEST_BYTES, nbytes) < 0)
        goto error;
    SET_FIELD(call->value, result);
    result = NULL;
    SET_FIELD(call->done, Py_NewRef(Py_True));
    if (PyDict_DelItem(pending, call->call_id) < 0)
        PyErr_Clear(); /* not in the table (the general path pops it the same way) */
    if (call->slot == Py_True) {
        SET_FIELD(call->slot, Py_NewRef(Py_False));
        if (add_to_attr(table, S_INFLIGHT, -1) < 0)
            goto error;
    }
    ok = 1;
    goto done;
error:
    ok = -1;
done:
    Py_XDECREF(metrics);
    Py_XDECREF(methods);
    Py_XDECREF(mstats);
    Py_XDECREF(raw);
    Py_XDECREF(old_bytes);
    Py_XDECREF(failing);
    Py_XDECREF(replies);
    Py_XDECREF(last);
    Py_XDECREF(now);
    Py_XDECREF(latency);
    Py_XDECREF(result);
    Py_XDECREF(pending);
    Py_XDECREF(nbytes);
    return ok;
}

/* answered(table, call, values): every rank ``call`` was sent to answered it at once,
 * without an error (values None: None each; else values[rank]); CallTable.answered. */
static PyObject *answered(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "answered takes 3 arguments");
        return NULL;
    }
    PyObject *table = args[0], *call = args[1], *values = args[2];
    int simple = 0;
    if (Py_TYPE(call) == CallType) {
        simple = simple_call((Call *)call, values);
        if (simple > 0)
            simple = end_simple(table, (Call *)call, values);
        if (simple < 0)
            return NULL;
    }
    if (simple)
        return Py_NewRef(Py_None);
    return PyObject_CallMethodObjArgs(table, S_ANSWERED, call, values, NULL);
}

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
        {&S_LOCK, "lock"},           {&S_LOCKED, "locked"},
        {&S_REFUSAL, "refusal"},     {&S_INFLIGHT, "inflight"},
        {&S_MAX_INFLIGHT, "max_inflight"}, {&S_IDS, "ids"},
        {&S_PENDING, "pending"},     {&S_STATS, "stats"},
        {&S_CALLS, "calls"},         {&S_METRICS, "metrics"},
        {&S_METHODS, "methods"},     {&S_RAW, "raw"},
        {&S_REQUEST_BYTES, "request_bytes"}, {&S_REPLIES, "replies"},
        {&S_LAST_REPLY, "last_reply"}, {&S_FAILING, "failing"},
        {&S_SLOT_WAITERS, "slot_waiters"}, {&S_FOLD_AT, "fold_at"},
        {&S_ANSWERED, "answered"},   {&S_ENTER, "enter"},
        {&S_N_ASYNC, "n_async"},
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
    if (CallType == NULL || PyModule_AddObject(m, "PendingCall", Py_NewRef(CallType)) < 0 ||
        PyModule_AddIntConstant(m, "API", CALLTABLE_API) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
