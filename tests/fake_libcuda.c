/*
 * A fake libcuda.so.1 for CPU tests of gpuexec/worker/cuda_driver.py and stale_contexts.py.
 *
 * CI has no GPU and no CUDA driver, yet the binding must be tested through real ctypes calls
 * (argument types, out-pointers, CUresult checking, symbol fallback), so this file implements
 * every driver entry point the binding uses with a small scriptable model of the driver:
 *
 *   - cuInit(0) must come first: other device calls return CUDA_ERROR_NOT_INITIALIZED (3),
 *     and cuInit itself returns CUDA_ERROR_NO_DEVICE (100) when the device count is 0,
 *     as the real driver does.
 *   - each device has a primary-context refcount; the context is active while it is > 0.
 *     cuDevicePrimaryCtxRelease decrements it (CUDA_ERROR_INVALID_CONTEXT (201) when already
 *     0), cuDevicePrimaryCtxReset sets it to 0.
 *   - CUdevice handles are `handle_base + ordinal` (0 by default, as in the real driver), so
 *     a test can set another base and catch code that mixes ordinals and handles.
 *   - uuid byte i of device d is (16 * d + i) & 0xff: device 0 starts with a NUL byte, which
 *     catches bindings that read the uuid as a C string.
 *   - device d has 16 * (d + 1) GiB of memory (more than 4 GiB: catches a 32-bit size) and
 *     compute capability 9.d (cuDeviceGetAttribute 75/76); other attributes are invalid.
 *
 * Control API (exported next to the cu* symbols, wrapped by tests/fakecuda.py):
 *   fake_reset()                                  back to defaults: 2 devices, driver 12080,
 *                                                 nothing active, no errors, counters at 0
 *   fake_set_device_count(int n)                  0..FAKE_MAX_DEVICES
 *   fake_set_driver_version(int v)
 *   fake_set_handle_base(int base)
 *   fake_set_active(int dev, int active)          active: refcount = max(1, refcount); else 0
 *   fake_set_refcount(int dev, int n)             n retains of the primary context
 *   fake_get_refcount(int dev)
 *   fake_set_flags(int dev, unsigned flags)       flags reported by cuDevicePrimaryCtxGetState
 *   fake_set_error(const char *fn, int code, int count, int dev)
 *                                                 the next `count` calls (every call if < 0)
 *                                                 of symbol `fn` on ordinal `dev` (any device
 *                                                 if < 0) return `code` without doing anything;
 *                                                 returns -1 for an unknown symbol name
 *   fake_calls(const char *fn)                    calls of that exact symbol (-1 if unknown)
 *   fake_device_calls(int dev)                    calls of any symbol that named ordinal dev
 *   fake_is_initialized()
 * (fake_reset also forgets every pid's checkpoint state.)
 *
 * Checkpoint entry points (cuCheckpointProcess*): they act on other processes by pid and are
 * called from gpuexec's checkpoint controller, a process a test cannot reach with the control
 * API above, so they are scripted through files named by the environment instead:
 *   - a per-pid state machine (at most FAKE_MAX_PIDS pids): any live pid starts RUNNING;
 *     lock RUNNING->LOCKED, checkpoint LOCKED->CHECKPOINTED, restore CHECKPOINTED->LOCKED,
 *     unlock LOCKED->RUNNING; a call in another state returns CUDA_ERROR_ILLEGAL_STATE (401);
 *     a pid that is not alive gives CUDA_ERROR_INVALID_VALUE (1); NULL args are accepted
 *     (they are optional), non-zero reserved bytes give CUDA_ERROR_INVALID_VALUE.
 *   - $FAKECUDA_CHECKPOINT_SCRIPT: re-read at every checkpoint call; each line
 *     `<symbol> <pid or *> <CUresult> [delay_ms]` makes that call sleep delay_ms, then return
 *     the CUresult without changing the state (0: sleep, then behave normally). The first
 *     matching line wins; a line stays in force until the test rewrites the file.
 *   - $FAKECUDA_CHECKPOINT_LOG: every checkpoint call appends `<symbol> <pid> <CUresult>\n`,
 *     so a test can check the order of the calls across processes; a scripted delay first
 *     appends `<symbol> <pid> -1` ("under way") before it sleeps.
 *   - a lock's timeoutMs is honoured for a scripted delay: a lock delayed longer than its
 *     timeout returns CUDA_ERROR_TIMEOUT (909) after timeoutMs.
 *
 * Build variants with symbols missing: -DOMIT_<symbol>, for example
 * -DOMIT_cuDevicePrimaryCtxRelease_v2 (tests the fallback to the unversioned name) or
 * -DOMIT_cuDevicePrimaryCtxRelease_v2 -DOMIT_cuDevicePrimaryCtxRelease (no release at all).
 */

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUuuid_st {
    unsigned char bytes[16];
} CUuuid;

#define FAKE_MAX_DEVICES 16
#define FAKE_MAX_ERRORS 64

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_INVALID_CONTEXT 201
#define CUDA_ERROR_ILLEGAL_STATE 401
#define CUDA_ERROR_TIMEOUT 909
#define FAKE_MAX_PIDS 256

typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    unsigned long long reserved1[7];
} CUcheckpointLockArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointCheckpointArgs;
typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;
typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    unsigned long long reserved1;
} CUcheckpointRestoreArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointUnlockArgs;
_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "cuda.h: 64 bytes");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "cuda.h: 64 bytes");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "cuda.h: 64 bytes");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "cuda.h: 64 bytes");
enum { ST_RUNNING = 0, ST_LOCKED = 1, ST_CHECKPOINTED = 2, ST_FAILED = 3 };

/* Every symbol the fake can export, whether or not this variant omits it. */
#define FAKE_FUNCTIONS(X)               \
    X(cuInit)                           \
    X(cuDriverGetVersion)               \
    X(cuDeviceGetCount)                 \
    X(cuDeviceGet)                      \
    X(cuDeviceGetName)                  \
    X(cuDeviceTotalMem)                 \
    X(cuDeviceTotalMem_v2)              \
    X(cuDeviceGetAttribute)             \
    X(cuDeviceGetUuid)                  \
    X(cuDeviceGetUuid_v2)               \
    X(cuDevicePrimaryCtxGetState)       \
    X(cuDevicePrimaryCtxRelease)        \
    X(cuDevicePrimaryCtxRelease_v2)     \
    X(cuDevicePrimaryCtxReset)          \
    X(cuDevicePrimaryCtxReset_v2)       \
    X(cuCheckpointProcessLock)          \
    X(cuCheckpointProcessCheckpoint)    \
    X(cuCheckpointProcessRestore)       \
    X(cuCheckpointProcessUnlock)        \
    X(cuCheckpointProcessGetState)      \
    X(cuGetErrorName)                   \
    X(cuGetErrorString)

#define AS_ENUM(n) F_##n,
#define AS_NAME(n) #n,
enum fake_function { FAKE_FUNCTIONS(AS_ENUM) F_COUNT };
static const char *const FUNCTION_NAMES[F_COUNT] = {FAKE_FUNCTIONS(AS_NAME)};

struct fake_error {
    int function;  /* enum fake_function */
    int device;    /* ordinal, or -1 for any */
    int code;      /* CUresult to return */
    int remaining; /* calls left to fail; < 0: forever */
};

static struct {
    int initialized;
    int device_count;
    int driver_version;
    int handle_base;
    int refcount[FAKE_MAX_DEVICES];
    unsigned int flags[FAKE_MAX_DEVICES];
    long calls[F_COUNT];
    long device_calls[FAKE_MAX_DEVICES];
    struct fake_error errors[FAKE_MAX_ERRORS];
    int n_errors;
} S;

/* checkpoint states by pid; the controller calls from several threads, hence the mutex */
static struct {
    int pid;
    int state;
} PIDS[FAKE_MAX_PIDS];
static int n_pids;
static pthread_mutex_t pid_lock = PTHREAD_MUTEX_INITIALIZER;

static const struct {
    int code;
    const char *name;
    const char *text;
} ERRORS[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation is not permitted in the current state"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {909, "CUDA_ERROR_TIMEOUT", "wait operation timed out"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

/* ---- control API ---------------------------------------------------------------------- */

void fake_reset(void) {
    memset(&S, 0, sizeof S);
    n_pids = 0;
    S.device_count = 2;
    S.driver_version = 12080;
}

__attribute__((constructor)) static void fake_load(void) { fake_reset(); }

static int valid_ordinal(int dev) { return dev >= 0 && dev < FAKE_MAX_DEVICES; }

static int function_id(const char *name) {
    if (name == NULL) return -1;
    for (int i = 0; i < F_COUNT; i++)
        if (strcmp(name, FUNCTION_NAMES[i]) == 0) return i;
    return -1;
}

void fake_set_device_count(int n) {
    if (n < 0) n = 0;
    if (n > FAKE_MAX_DEVICES) n = FAKE_MAX_DEVICES;
    S.device_count = n;
}

void fake_set_driver_version(int version) { S.driver_version = version; }

void fake_set_handle_base(int base) { S.handle_base = base; }

void fake_set_refcount(int dev, int n) {
    if (valid_ordinal(dev)) S.refcount[dev] = n < 0 ? 0 : n;
}

void fake_set_active(int dev, int active) {
    if (!valid_ordinal(dev)) return;
    if (!active)
        S.refcount[dev] = 0;
    else if (S.refcount[dev] < 1)
        S.refcount[dev] = 1;
}

int fake_get_refcount(int dev) { return valid_ordinal(dev) ? S.refcount[dev] : -1; }

void fake_set_flags(int dev, unsigned int flags) {
    if (valid_ordinal(dev)) S.flags[dev] = flags;
}

int fake_set_error(const char *function, int code, int count, int dev) {
    int id = function_id(function);
    if (id < 0 || S.n_errors >= FAKE_MAX_ERRORS) return -1;
    S.errors[S.n_errors].function = id;
    S.errors[S.n_errors].device = dev < 0 ? -1 : dev;
    S.errors[S.n_errors].code = code;
    S.errors[S.n_errors].remaining = count < 0 ? -1 : count;
    S.n_errors++;
    return 0;
}

long fake_calls(const char *function) {
    int id = function_id(function);
    return id < 0 ? -1 : S.calls[id];
}

long fake_device_calls(int dev) { return valid_ordinal(dev) ? S.device_calls[dev] : -1; }

int fake_is_initialized(void) { return S.initialized; }

/* ---- helpers shared by the entry points ------------------------------------------------ */

/* Count the call (and the device it names), then return the injected error, if any. */
static CUresult enter(int function, int dev) {
    S.calls[function]++;
    if (valid_ordinal(dev)) S.device_calls[dev]++;
    for (int i = 0; i < S.n_errors; i++) {
        struct fake_error *e = &S.errors[i];
        if (e->function != function || e->remaining == 0) continue;
        if (e->device >= 0 && e->device != dev) continue;
        if (e->remaining > 0) e->remaining--;
        return e->code;
    }
    return CUDA_SUCCESS;
}

/* Ordinal of a CUdevice handle, or -1. */
static int ordinal_of(CUdevice handle) {
    int dev = handle - S.handle_base;
    return (dev >= 0 && dev < S.device_count) ? dev : -1;
}

/* Common prologue of the calls that take a CUdevice; *dev receives the ordinal. */
static CUresult enter_device(int function, CUdevice handle, int *dev) {
    *dev = ordinal_of(handle);
    CUresult rc = enter(function, *dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!S.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (*dev < 0) return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

static CUresult get_uuid(int function, CUuuid *uuid, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(function, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (uuid == NULL) return CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; i < 16; i++) uuid->bytes[i] = (unsigned char)((16 * dev + i) & 0xff);
    return CUDA_SUCCESS;
}

static CUresult release(int function, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(function, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (S.refcount[dev] <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    S.refcount[dev]--;
    return CUDA_SUCCESS;
}

static CUresult reset(int function, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(function, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    S.refcount[dev] = 0;
    return CUDA_SUCCESS;
}

static CUresult error_lookup(int function, CUresult error, const char **out, int want_text) {
    CUresult rc = enter(function, -1);
    if (rc != CUDA_SUCCESS) return rc;
    if (out == NULL) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++) {
        if (ERRORS[i].code == error) {
            *out = want_text ? ERRORS[i].text : ERRORS[i].name;
            return CUDA_SUCCESS;
        }
    }
    *out = NULL; /* what the real driver does for a code it does not know */
    return CUDA_ERROR_INVALID_VALUE;
}

/* ---- the driver API --------------------------------------------------------------------- */

#ifndef OMIT_cuInit
CUresult cuInit(unsigned int flags) {
    CUresult rc = enter(F_cuInit, -1);
    if (rc != CUDA_SUCCESS) return rc;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (S.device_count == 0) return CUDA_ERROR_NO_DEVICE;
    S.initialized = 1;
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDriverGetVersion
CUresult cuDriverGetVersion(int *version) {
    CUresult rc = enter(F_cuDriverGetVersion, -1);
    if (rc != CUDA_SUCCESS) return rc;
    if (version == NULL) return CUDA_ERROR_INVALID_VALUE;
    *version = S.driver_version; /* works before cuInit, as in the real driver */
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDeviceGetCount
CUresult cuDeviceGetCount(int *count) {
    CUresult rc = enter(F_cuDeviceGetCount, -1);
    if (rc != CUDA_SUCCESS) return rc;
    if (!S.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (count == NULL) return CUDA_ERROR_INVALID_VALUE;
    *count = S.device_count;
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDeviceGet
CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    CUresult rc = enter(F_cuDeviceGet, ordinal);
    if (rc != CUDA_SUCCESS) return rc;
    if (!S.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= S.device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = S.handle_base + ordinal;
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDeviceGetName
CUresult cuDeviceGetName(char *name, int len, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(F_cuDeviceGetName, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (name == NULL || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    char buf[64];
    int n = 0;
    const char *prefix = "Fake CUDA Device ";
    while (prefix[n] != '\0') {
        buf[n] = prefix[n];
        n++;
    }
    if (dev >= 10) buf[n++] = (char)('0' + dev / 10);
    buf[n++] = (char)('0' + dev % 10);
    buf[n] = '\0';
    strncpy(name, buf, (size_t)len - 1);
    name[len - 1] = '\0';
    return CUDA_SUCCESS;
}
#endif

static CUresult total_mem(int function, size_t *bytes, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(function, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (bytes == NULL) return CUDA_ERROR_INVALID_VALUE;
    *bytes = (size_t)16 * (size_t)(dev + 1) << 30;
    return CUDA_SUCCESS;
}

#ifndef OMIT_cuDeviceTotalMem
CUresult cuDeviceTotalMem(size_t *bytes, CUdevice handle) {
    return total_mem(F_cuDeviceTotalMem, bytes, handle);
}
#endif

#ifndef OMIT_cuDeviceTotalMem_v2
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice handle) {
    return total_mem(F_cuDeviceTotalMem_v2, bytes, handle);
}
#endif

#ifndef OMIT_cuDeviceGetAttribute
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice handle) {
    int dev;
    CUresult rc = enter_device(F_cuDeviceGetAttribute, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (value == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (attribute == 75) *value = 9;               /* COMPUTE_CAPABILITY_MAJOR */
    else if (attribute == 76) *value = dev % 10;   /* COMPUTE_CAPABILITY_MINOR */
    else return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDeviceGetUuid
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice handle) {
    return get_uuid(F_cuDeviceGetUuid, uuid, handle);
}
#endif

#ifndef OMIT_cuDeviceGetUuid_v2
CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice handle) {
    return get_uuid(F_cuDeviceGetUuid_v2, uuid, handle);
}
#endif

#ifndef OMIT_cuDevicePrimaryCtxGetState
CUresult cuDevicePrimaryCtxGetState(CUdevice handle, unsigned int *flags, int *active) {
    int dev;
    CUresult rc = enter_device(F_cuDevicePrimaryCtxGetState, handle, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (flags == NULL || active == NULL) return CUDA_ERROR_INVALID_VALUE;
    *flags = S.flags[dev];
    *active = S.refcount[dev] > 0;
    return CUDA_SUCCESS;
}
#endif

#ifndef OMIT_cuDevicePrimaryCtxRelease
CUresult cuDevicePrimaryCtxRelease(CUdevice handle) {
    return release(F_cuDevicePrimaryCtxRelease, handle);
}
#endif

#ifndef OMIT_cuDevicePrimaryCtxRelease_v2
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice handle) {
    return release(F_cuDevicePrimaryCtxRelease_v2, handle);
}
#endif

#ifndef OMIT_cuDevicePrimaryCtxReset
CUresult cuDevicePrimaryCtxReset(CUdevice handle) {
    return reset(F_cuDevicePrimaryCtxReset, handle);
}
#endif

#ifndef OMIT_cuDevicePrimaryCtxReset_v2
CUresult cuDevicePrimaryCtxReset_v2(CUdevice handle) {
    return reset(F_cuDevicePrimaryCtxReset_v2, handle);
}
#endif

#ifndef OMIT_cuGetErrorName
CUresult cuGetErrorName(CUresult error, const char **name) {
    return error_lookup(F_cuGetErrorName, error, name, 0);
}
#endif

#ifndef OMIT_cuGetErrorString
CUresult cuGetErrorString(CUresult error, const char **text) {
    return error_lookup(F_cuGetErrorString, error, text, 1);
}
#endif

/* ---- checkpoint entry points (see the top of the file) --------------------------------- */


/* The state slot of pid (made RUNNING on first sight), or NULL when the pid is not alive. */
static int *pid_state(int pid) {
    if (pid <= 0 || kill(pid, 0) != 0) return NULL;
    for (int i = 0; i < n_pids; i++)
        if (PIDS[i].pid == pid) return &PIDS[i].state;
    if (n_pids >= FAKE_MAX_PIDS) return NULL;
    PIDS[n_pids].pid = pid;
    PIDS[n_pids].state = ST_RUNNING;
    return &PIDS[n_pids++].state;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The scripted outcome of (symbol, pid): 1, with code and delay set, when a line matches. */
static int scripted(const char *symbol, int pid, int *code, long *delay) {
    const char *path = getenv("FAKECUDA_CHECKPOINT_SCRIPT");
    if (path == NULL || *path == '\0') return 0;
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    char line[256], fn[128], who[32];
    int found = 0;
    while (!found && fgets(line, sizeof line, f) != NULL) {
        int rc = 0;
        long ms = 0;
        int n = sscanf(line, "%127s %31s %d %ld", fn, who, &rc, &ms);
        if (n < 3 || strcmp(fn, symbol) != 0) continue;
        if (strcmp(who, "*") != 0 && atoi(who) != pid) continue;
        *code = rc;
        *delay = n >= 4 ? ms : 0;
        found = 1;
    }
    fclose(f);
    return found;
}

static CUresult logged(const char *symbol, int pid, CUresult rc) {
    const char *path = getenv("FAKECUDA_CHECKPOINT_LOG");
    if (path != NULL && *path != '\0') {
        FILE *f = fopen(path, "a");
        if (f != NULL) {
            fprintf(f, "%s %d %d\n", symbol, pid, rc);
            fclose(f);
        }
    }
    return rc;
}

static int all_zero(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

/* One transition from `from` to `to`, with the script, the log and the counters. */
static CUresult transition(int function, int pid, int from, int to, unsigned int timeout_ms) {
    const char *symbol = FUNCTION_NAMES[function];
    CUresult rc = enter(function, -1);
    if (rc != CUDA_SUCCESS) return logged(symbol, pid, rc);
    if (!S.initialized) return logged(symbol, pid, CUDA_ERROR_NOT_INITIALIZED);
    int code = 0;
    long delay = 0;
    if (scripted(symbol, pid, &code, &delay)) {
        if (timeout_ms > 0 && delay > (long)timeout_ms) {
            logged(symbol, pid, -1);
            sleep_ms(timeout_ms);
            return logged(symbol, pid, CUDA_ERROR_TIMEOUT);
        }
        if (delay > 0) {
            logged(symbol, pid, -1); /* "under way": a test may act during the delay */
            sleep_ms(delay);
        }
        if (code != CUDA_SUCCESS) return logged(symbol, pid, code);
    }
    pthread_mutex_lock(&pid_lock);
    int *state = pid_state(pid);
    if (state == NULL)
        rc = CUDA_ERROR_INVALID_VALUE;
    else if (*state != from)
        rc = CUDA_ERROR_ILLEGAL_STATE;
    else
        *state = to;
    pthread_mutex_unlock(&pid_lock);
    return logged(symbol, pid, rc);
}

#ifndef OMIT_cuCheckpointProcessLock
CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    if (args != NULL && (args->reserved0 || !all_zero(args->reserved1, sizeof args->reserved1)))
        return logged("cuCheckpointProcessLock", pid, CUDA_ERROR_INVALID_VALUE);
    return transition(F_cuCheckpointProcessLock, pid, ST_RUNNING, ST_LOCKED,
                      args != NULL ? args->timeoutMs : 0);
}
#endif

#ifndef OMIT_cuCheckpointProcessCheckpoint
CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
    if (args != NULL && !all_zero(args, sizeof *args))
        return logged("cuCheckpointProcessCheckpoint", pid, CUDA_ERROR_INVALID_VALUE);
    return transition(F_cuCheckpointProcessCheckpoint, pid, ST_LOCKED, ST_CHECKPOINTED, 0);
}
#endif

#ifndef OMIT_cuCheckpointProcessRestore
CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    if (args != NULL && (args->gpuPairs != NULL || args->gpuPairsCount != 0 ||
                         !all_zero(args->reserved, sizeof args->reserved) || args->reserved1))
        return logged("cuCheckpointProcessRestore", pid, CUDA_ERROR_INVALID_VALUE);
    return transition(F_cuCheckpointProcessRestore, pid, ST_CHECKPOINTED, ST_LOCKED, 0);
}
#endif

#ifndef OMIT_cuCheckpointProcessUnlock
CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
    if (args != NULL && !all_zero(args, sizeof *args))
        return logged("cuCheckpointProcessUnlock", pid, CUDA_ERROR_INVALID_VALUE);
    return transition(F_cuCheckpointProcessUnlock, pid, ST_LOCKED, ST_RUNNING, 0);
}
#endif

#ifndef OMIT_cuCheckpointProcessGetState
CUresult cuCheckpointProcessGetState(int pid, int *out) {
    CUresult rc = enter(F_cuCheckpointProcessGetState, -1);
    if (rc != CUDA_SUCCESS) return rc;
    if (!S.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (out == NULL) return CUDA_ERROR_INVALID_VALUE;
    int code = 0;
    long delay = 0;
    if (scripted("cuCheckpointProcessGetState", pid, &code, &delay) && code != CUDA_SUCCESS)
        return code;
    pthread_mutex_lock(&pid_lock);
    int *state = pid_state(pid);
    if (state != NULL) *out = *state;
    pthread_mutex_unlock(&pid_lock);
    return state == NULL ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}
#endif
