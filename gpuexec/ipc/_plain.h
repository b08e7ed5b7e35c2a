/* Plain msgpack data in compiled code: the bytes msgspec writes for the values msgpack
 * carries faithfully as they are, and the objects msgspec reads back from them
 * (gpuexec.ipc.values.plain: None, bool, an int in [-2**63, 2**64), float, str, bytes,
 * list, dict with str keys; exact types, not subclasses). Anything else is "not plain"
 * here and is left, with nothing changed, to the Python codec, whose walk gives tuples,
 * big ints, sets and the rest their extension types and refuses what cannot travel,
 * saying why. So a value never travels differently for having met this code: the same
 * bytes msgspec writes (tests/test_plain_codec.py compares them), the same objects it
 * reads back.
 *
 * Shared by the two compiled parts (static: each has its own copy): the ring core
 * (a worker reads a call's arguments and writes its result) and the driver's round trip
 * (it writes a call's arguments and reads the results). Neither runs Python code while
 * it walks a value: it holds the GIL, calls nothing that can run a finalizer, and takes
 * only borrowed references of the containers it reads. Include after Python.h and
 * _ring.h. */
#ifndef GPUEXEC_PLAIN_H
#define GPUEXEC_PLAIN_H

#include <stdint.h>
#include <string.h>

/* (pack_uint: _ring.h, included first) */

/* Containers nested deeper than this are left to Python (values.MAX_DEPTH, 100, is the
 * wire's own limit; the walk there explains a value past it). */
#define PLAIN_DEPTH 32

/* Where a value is written: [at, end); ``full`` set when it did not fit. */
typedef struct {
    unsigned char *at, *end;
    int full;
} Room;

/* Where a value is read from: [at, end). */
typedef struct {
    const unsigned char *at, *end;
} Text;

static inline int room_for(Room *r, Py_ssize_t n) {
    if (r->end - r->at >= n)
        return 1;
    r->full = 1;
    return 0;
}

/* A type byte and a big-endian length or number of ``n`` bytes. */
static inline void put_sized(Room *r, unsigned char type, uint64_t v, int n) {
    *r->at++ = type;
    for (int i = n - 1; i >= 0; i--)
        *r->at++ = (unsigned char)(v >> (8 * i));
}

/* The head of a str (fixstr, str 8/16/32), a bin (8/16/32), an array or a map (fix,
 * 16/32) of ``n``: msgspec's shortest form. ``fix``: the fix form's first byte (0: none),
 * ``fix_most``: its largest n; ``first``: the 8-bit form's type byte (0: none; the 16
 * and 32-bit forms follow it). 0 when there is no room or n is over 32 bits. */
static int put_head(Room *r, uint64_t n, unsigned char fix, uint64_t fix_most,
                    unsigned char first, unsigned char first16) {
    if (!room_for(r, 5) || n > 0xffffffffull)
        return 0;
    if (fix && n <= fix_most)
        *r->at++ = (unsigned char)(fix | n);
    else if (first && n <= 0xff)
        put_sized(r, first, n, 1);
    else if (n <= 0xffff)
        put_sized(r, first16, n, 2);
    else
        put_sized(r, (unsigned char)(first16 + 1), n, 4);
    return 1;
}

static int put_bytes(Room *r, const char *s, Py_ssize_t n) {
    if (!room_for(r, n))
        return 0;
    memcpy(r->at, s, (size_t)n);
    r->at += n;
    return 1;
}

static int put_plain(Room *r, PyObject *v, int depth);

/* A str as msgspec writes it: 0 when it holds a lone surrogate (UTF-8 refuses it: the
 * walk gives it its extension type) or there is no room. */
static int put_str(Room *r, PyObject *v) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return put_head(r, (uint64_t)n, 0xa0, 31, 0xd9, 0xda) && put_bytes(r, s, n);
}

/* The items of a list or tuple as one msgpack array. */
static int put_items(Room *r, PyObject *seq, int depth) {
    int is_list = PyList_CheckExact(seq);
    Py_ssize_t n = is_list ? PyList_Size(seq) : PyTuple_Size(seq);
    if (!put_head(r, (uint64_t)n, 0x90, 15, 0, 0xdc))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int rc = put_plain(r, is_list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i),
                           depth + 1);
        if (rc <= 0)
            return rc;
    }
    return 1;
}

/* A dict with str keys as one msgpack map, in its order. */
static int put_map(Room *r, PyObject *d, int depth) {
    Py_ssize_t pos = 0;
    PyObject *k, *x;
    if (!put_head(r, (uint64_t)PyDict_Size(d), 0x80, 15, 0, 0xde))
        return 0;
    while (PyDict_Next(d, &pos, &k, &x)) {
        if (!PyUnicode_CheckExact(k))
            return 0;
        int rc = put_str(r, k);
        if (rc > 0)
            rc = put_plain(r, x, depth + 1);
        if (rc <= 0)
            return rc;
    }
    return 1;
}

/* ``v`` written as msgspec writes it: 1; 0 when it is not plain (see the top) or there
 * is no room (r->full set; what was written is the caller's to drop); -1 with an exception set (no
 * memory). */
static int put_plain(Room *r, PyObject *v, int depth) {
    if (v == Py_None || PyBool_Check(v)) {
        if (!room_for(r, 1))
            return 0;
        *r->at++ = v == Py_None ? 0xc0 : v == Py_True ? 0xc3 : 0xc2;
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (!room_for(r, 9))
            return 0;
        if (overflow < 0)
            return 0; /* below -2**63: an extension type */
        if (overflow > 0 || x >= 0) {
            uint64_t u = overflow > 0 ? PyLong_AsUnsignedLongLong(v) : (uint64_t)x;
            if (overflow > 0 && PyErr_Occurred()) {
                PyErr_Clear(); /* 2**64 or more */
                return 0;
            }
            r->at += pack_uint(u, r->at);
        } else if (x >= -32) {
            *r->at++ = (unsigned char)(int8_t)x;
        } else {
            int n = x >= -128 ? 1 : x >= -32768 ? 2 : x >= -2147483648ll ? 4 : 8;
            put_sized(r, n == 1 ? 0xd0 : n == 2 ? 0xd1 : n == 4 ? 0xd2 : 0xd3, (uint64_t)x, n);
        }
        return 1;
    }
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AsDouble(v);
        uint64_t bits;
        if (!room_for(r, 9))
            return 0;
        memcpy(&bits, &d, 8);
        put_sized(r, 0xcb, bits, 8);
        return 1;
    }
    if (PyUnicode_CheckExact(v))
        return put_str(r, v);
    if (PyBytes_CheckExact(v)) {
        Py_ssize_t n = PyBytes_Size(v);
        return put_head(r, (uint64_t)n, 0, 0, 0xc4, 0xc5) &&
               put_bytes(r, PyBytes_AsString(v), n);
    }
    if (depth >= PLAIN_DEPTH)
        return 0;
    if (PyList_CheckExact(v))
        return put_items(r, v, depth);
    if (PyDict_CheckExact(v))
        return put_map(r, v, depth);
    return 0; /* a tuple, a set, a subclass, an object: the walk's */
}

/* -- reading ------------------------------------------------------------------------- */

/* The unsigned big-endian number of ``n`` bytes at t->at (the caller checked the room). */
static inline uint64_t take_number(Text *t, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | t->at[i];
    t->at += n;
    return v;
}

/* The length after a type byte (``n`` bytes of it): 1 with *len; 0 when cut short or
 * longer than what is left (each item is one byte at least: ``per`` of them each). */
static int take_length(Text *t, int n, int per, uint64_t *len) {
    if (t->end - t->at < n)
        return 0;
    *len = take_number(t, n);
    return *len <= (uint64_t)(t->end - t->at) / (uint64_t)per;
}

static int get_plain(Text *t, int depth, PyObject **out);

/* A str of ``n`` bytes: 0 when they are not UTF-8 (msgspec refuses them: the Python
 * decoder counts the frame as malformed). */
static int get_str(Text *t, uint64_t n, PyObject **out) {
    if ((uint64_t)(t->end - t->at) < n)
        return 0;
    *out = PyUnicode_DecodeUTF8((const char *)t->at, (Py_ssize_t)n, NULL);
    if (*out == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    t->at += n;
    return 1;
}

/* An array of ``n`` items into a new list, or a new tuple (``tuple``: a call's
 * arguments, which the method is called with). */
static int get_items(Text *t, uint64_t n, int depth, int tuple, PyObject **out) {
    PyObject *seq = tuple ? PyTuple_New((Py_ssize_t)n) : PyList_New((Py_ssize_t)n);
    if (seq == NULL)
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *x;
        int rc = get_plain(t, depth + 1, &x);
        if (rc <= 0) {
            Py_DECREF(seq);
            return rc;
        }
        if (tuple)
            PyTuple_SetItem(seq, (Py_ssize_t)i, x); /* steals x; a new tuple: cannot fail */
        else
            PyList_SetItem(seq, (Py_ssize_t)i, x);
    }
    *out = seq;
    return 1;
}

/* A map of ``n`` pairs with str keys into a new dict. */
static int get_map(Text *t, uint64_t n, int depth, PyObject **out) {
    PyObject *d = PyDict_New();
    if (d == NULL)
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *k = NULL, *x = NULL;
        unsigned char c = t->at < t->end ? t->at[0] : 0;
        int rc = c >= 0xa0 && c <= 0xbf ? 1 : c >= 0xd9 && c <= 0xdb ? 1 : 0; /* a str */
        if (rc > 0)
            rc = get_plain(t, depth + 1, &k);
        if (rc > 0)
            rc = get_plain(t, depth + 1, &x);
        if (rc > 0 && PyDict_SetItem(d, k, x) < 0)
            rc = -1;
        Py_XDECREF(k);
        Py_XDECREF(x);
        if (rc <= 0) {
            Py_DECREF(d);
            return rc;
        }
    }
    *out = d;
    return 1;
}

/* The value at t->at, read as msgspec reads it into a new object (*out), t->at moved
 * past it: 1; 0 when what is there is not plain (an extension type: the Python decoder
 * rebuilds it), not valid msgpack or cut short (the Python decoder says so, and the
 * frame is counted), a map key that is not a str, or nested deeper than PLAIN_DEPTH;
 * -1 with an exception set (no memory). */
static int get_plain(Text *t, int depth, PyObject **out) {
    if (t->at >= t->end)
        return 0;
    unsigned char c = *t->at++;
    uint64_t n;
    if (c <= 0x7f || c >= 0xe0) {
        *out = PyLong_FromLong(c <= 0x7f ? (long)c : (long)(int8_t)c);
        return *out == NULL ? -1 : 1;
    }
    if (c >= 0xa0 && c <= 0xbf)
        return get_str(t, c & 0x1f, out);
    if (c >= 0x80 && c <= 0x9f && depth >= PLAIN_DEPTH)
        return 0;
    if (c >= 0x90 && c <= 0x9f)
        return get_items(t, c & 0x0f, depth, 0, out);
    if (c >= 0x80 && c <= 0x8f)
        return get_map(t, c & 0x0f, depth, out);
    switch (c) {
    case 0xc0:
    case 0xc2:
    case 0xc3:
        *out = Py_NewRef(c == 0xc0 ? Py_None : c == 0xc3 ? Py_True : Py_False);
        return 1;
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf: {
        int w = 1 << (c - 0xcc);
        if (t->end - t->at < w)
            return 0;
        *out = PyLong_FromUnsignedLongLong(take_number(t, w));
        return *out == NULL ? -1 : 1;
    }
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int w = 1 << (c - 0xd0);
        if (t->end - t->at < w)
            return 0;
        uint64_t u = take_number(t, w);
        long long x = w == 1 ? (int8_t)u : w == 2 ? (int16_t)u : w == 4 ? (int32_t)u
                                                                      : (long long)u;
        *out = PyLong_FromLongLong(x);
        return *out == NULL ? -1 : 1;
    }
    case 0xca:
    case 0xcb: {
        int w = c == 0xca ? 4 : 8;
        if (t->end - t->at < w)
            return 0;
        uint64_t u = take_number(t, w);
        double d;
        if (w == 4) {
            uint32_t u32 = (uint32_t)u;
            float f;
            memcpy(&f, &u32, 4);
            d = f;
        } else {
            memcpy(&d, &u, 8);
        }
        *out = PyFloat_FromDouble(d);
        return *out == NULL ? -1 : 1;
    }
    case 0xd9:
    case 0xda:
    case 0xdb:
        return take_length(t, 1 << (c - 0xd9), 1, &n) ? get_str(t, n, out) : 0;
    case 0xc4:
    case 0xc5:
    case 0xc6:
        if (!take_length(t, 1 << (c - 0xc4), 1, &n))
            return 0;
        *out = PyBytes_FromStringAndSize((const char *)t->at, (Py_ssize_t)n);
        t->at += n;
        return *out == NULL ? -1 : 1;
    case 0xdc:
    case 0xdd:
        if (depth >= PLAIN_DEPTH || !take_length(t, c == 0xdc ? 2 : 4, 1, &n))
            return 0;
        return get_items(t, n, depth, 0, out);
    case 0xde:
    case 0xdf:
        if (depth >= PLAIN_DEPTH || !take_length(t, c == 0xde ? 2 : 4, 2, &n))
            return 0;
        return get_map(t, n, depth, out);
    default:
        return 0; /* an extension type (0xc7-0xc9, 0xd4-0xd8), or 0xc1 (never used) */
    }
}

/* A call's arguments (a msgpack array) into a new tuple: as get_plain. */
static inline int get_args(Text *t, PyObject **out) {
    uint64_t n;
    if (t->at >= t->end)
        return 0;
    unsigned char c = *t->at++;
    if (c >= 0x90 && c <= 0x9f)
        n = c & 0x0f;
    else if (!((c == 0xdc || c == 0xdd) && take_length(t, c == 0xdc ? 2 : 4, 1, &n)))
        return 0;
    return get_items(t, n, 0, 1, out);
}

#endif /* GPUEXEC_PLAIN_H */
