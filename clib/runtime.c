/* AscendCL runtime semantics, as flexnpu_client/runtime.py: which devices a process sees, set/reset reference
 * counts, the current device and context per thread, which session each handle belongs to, host memory, copy
 * directions, core limits and IPC memory. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fnpu.h"
#include "map.h"

#define RECORDED (1ull << 32) /* owner flags: an event with a record not undone by a reset */
#define CAPTURING (1ull << 33) /* a stream between aclmdlRICaptureBegin and End */
#define DEVICE_OF(v) ((int)((v) & 0xffffffffu))

struct opened {
    struct fnpu_session *session;
    int refs;
    uint64_t default_context;
};

struct constant {
    int device;
    uint8_t *data;
    size_t len;
    uint64_t ptr;
};

static struct {
    pthread_mutex_t lock;
    int initialized;
    int discovered, direct, phase;
    char **devices;
    int ndevices;
    struct opened *opened;
    struct fnpu_map owner; /* context/stream/event/graph handle -> device | flags */
    struct fnpu_map host;  /* aclrtMallocHost pointers */
    struct constant *constants;
    size_t nconstants;
} rt = {.lock = PTHREAD_MUTEX_INITIALIZER};

static __thread int tl_device = -1;
static __thread uint64_t tl_context;
static __thread uint64_t tl_limits = FNPU_OWN_LIMITS;

int fnpu_is_device(const void *ptr) { return (uint64_t)(uintptr_t)ptr >= FNPU_DEVICE_VA_BASE; }

/* -- which devices: FLEXNPU_DEVICES, else direct mode's virtual NPUs, else bound FlexNPU nodes (/dev/davinciN
 *    regular files: real driver nodes are character devices), else FLEXNPU_MOUNT's davinciN files; then
 *    ASCEND_RT_VISIBLE_DEVICES (logical ids; parsing stops at the first invalid entry), as devices.py. ------- */

static int node_number(const char *name) {
    if (strncmp(name, "davinci", 7) != 0 || !name[7]) {
        return -1;
    }
    for (const char *p = name + 7; *p; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
    }
    return atoi(name + 7);
}

static int by_number(const void *a, const void *b) {
    const char *x = strrchr(*(char *const *)a, '/') + 1, *y = strrchr(*(char *const *)b, '/') + 1;
    return node_number(x) - node_number(y);
}

static void push(char ***list, int *n, char *item) {
    char **grown = realloc(*list, (*n + 1) * sizeof **list);
    if (grown) {
        grown[(*n)++] = item;
        *list = grown;
    } else {
        free(item);
    }
}

static void numbered(const char *dir, int regular_only, char ***out, int *n) {
    DIR *d = opendir(dir);
    if (!d) {
        return;
    }
    for (struct dirent *e; (e = readdir(d));) {
        if (node_number(e->d_name) < 0) {
            continue;
        }
        char *path = malloc(strlen(dir) + strlen(e->d_name) + 2);
        if (!path) {
            continue;
        }
        sprintf(path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (regular_only && (stat(path, &st) != 0 || !S_ISREG(st.st_mode))) {
            free(path);
            continue;
        }
        push(out, n, path);
    }
    closedir(d);
    if (*n > 1) {
        qsort(*out, *n, sizeof **out, by_number);
    }
}

static void visible(void) {
    const char *spec = getenv("ASCEND_RT_VISIBLE_DEVICES");
    if (!spec) {
        return;
    }
    char **chosen = NULL;
    int n = 0;
    char *copy = strdup(spec), *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (*item == ' ') {
            item++;
        }
        char *end;
        long id = strtol(item, &end, 10);
        while (*end == ' ') {
            end++;
        }
        int dup = 0;
        for (int i = 0; i < n && end != item && id >= 0 && id < rt.ndevices; i++) {
            dup |= chosen[i] == rt.devices[id];
        }
        if (end == item || *end || id < 0 || id >= rt.ndevices || dup) {
            break;
        }
        push(&chosen, &n, rt.devices[id]);
    }
    free(copy);
    for (int i = 0; i < rt.ndevices; i++) {
        int kept = 0;
        for (int j = 0; j < n; j++) {
            kept |= chosen[j] == rt.devices[i];
        }
        if (!kept) {
            free(rt.devices[i]);
        }
    }
    free(rt.devices);
    rt.devices = chosen;
    rt.ndevices = n;
}

static aclError discover(void) {
    if (rt.discovered) {
        return ACL_SUCCESS;
    }
    const char *direct = getenv("FLEXNPU_DIRECT");
    const char *phase = getenv("FLEXNPU_PHASE");
    rt.direct = direct && *direct;
    rt.phase = !phase ? 0 : !strcmp(phase, "prefill") ? 1 : !strcmp(phase, "decode") ? 2 : 0;
    const char *explicit = getenv("FLEXNPU_DEVICES");
    if (explicit && *explicit) {
        char *copy = strdup(explicit), *save = NULL;
        for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
            while (*item == ' ') {
                item++;
            }
            if (*item) {
                push(&rt.devices, &rt.ndevices, strdup(item));
            }
        }
        free(copy);
    } else if (rt.direct) {
        aclError ret = fnpu_direct_names(&rt.devices, &rt.ndevices);
        if (ret != ACL_SUCCESS) {
            return ret;
        }
    } else {
        numbered("/dev", 1, &rt.devices, &rt.ndevices);
        if (!rt.ndevices) {
            const char *mount = getenv("FLEXNPU_MOUNT");
            numbered(mount && *mount ? mount : "/dev/flexnpu", 0, &rt.devices, &rt.ndevices);
        }
    }
    visible();
    rt.opened = calloc(rt.ndevices ? rt.ndevices : 1, sizeof *rt.opened);
    rt.discovered = 1;
    return ACL_SUCCESS;
}

static aclError check_device(int device) {
    aclError ret = discover();
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    if (device < 0 || device >= rt.ndevices) {
        if (!rt.ndevices) {
            return fnpu_fail(ACL_ERROR_RT_INVALID_DEVICEID,
                             "device %d does not exist (this process sees none: is vdevfsd running (vdevctl ls)? "
                             "in a container, is a FlexNPU file bound at /dev/davinciN?)",
                             device);
        }
        return fnpu_fail(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist (this process sees 0-%d)", device,
                         rt.ndevices - 1);
    }
    return ACL_SUCCESS;
}

static aclError connect_device(int device, struct fnpu_session **out) {
    struct fnpu_transport *t;
    aclError ret = rt.direct ? fnpu_direct_open(rt.devices[device], &t) : fnpu_file_open(rt.devices[device], &t);
    return ret != ACL_SUCCESS ? ret : fnpu_session_open(t, rt.phase, out);
}

/* -- init ------------------------------------------------------------------------------------------------- */

aclError aclInit(const char *configPath) {
    (void)configPath;
    pthread_mutex_lock(&rt.lock);
    aclError ret = rt.initialized ? fnpu_fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit called twice") : ACL_SUCCESS;
    rt.initialized = 1;
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

static aclError close_device(int device);

aclError aclFinalize(void) {
    pthread_mutex_lock(&rt.lock);
    aclError ret = ACL_SUCCESS;
    if (!rt.initialized) {
        ret = fnpu_fail(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize without aclInit (or called twice)");
    } else {
        for (int d = 0; d < rt.ndevices; d++) {
            if (rt.opened[d].session) {
                aclError closed = close_device(d);
                ret = ret != ACL_SUCCESS ? ret : closed;
            }
        }
        rt.initialized = 0;
    }
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

aclError aclrtGetVersion(int32_t *majorVersion, int32_t *minorVersion, int32_t *patchVersion) {
    if (!majorVersion || !minorVersion || !patchVersion) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetVersion: an output pointer is NULL");
    }
    *majorVersion = ACL_MAJOR_VERSION;
    *minorVersion = ACL_MINOR_VERSION;
    *patchVersion = ACL_PATCH_VERSION;
    return ACL_SUCCESS;
}

/* -- devices and contexts --------------------------------------------------------------------------------- */

static aclError set_device_locked(int device) {
    aclError ret = check_device(device);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    struct opened *o = &rt.opened[device];
    if (!o->session) {
        struct fnpu_session *s;
        ret = connect_device(device, &s);
        if (ret != ACL_SUCCESS) {
            return ret;
        }
        struct fnpu_context_create_rep rep;
        struct fnpu_out out = {&rep, sizeof rep, 0};
        ret = fnpu_call(s, FNPU_CMD_CONTEXT_CREATE, NULL, 0, NULL, 0, &out);
        if (ret != ACL_SUCCESS) {
            fnpu_session_close(s);
            return ret;
        }
        *o = (struct opened){s, 0, rep.handle};
        fnpu_map_put(&rt.owner, rep.handle, (uint64_t)device);
    }
    o->refs++;
    tl_device = device;
    tl_context = o->default_context;
    return ACL_SUCCESS;
}

aclError aclrtSetDevice(int32_t deviceId) {
    pthread_mutex_lock(&rt.lock);
    aclError ret = set_device_locked(deviceId);
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

static void forget_device(int device) {
    for (size_t i = 0; i < rt.owner.cap; i++) {
        if (rt.owner.keys[i] && DEVICE_OF(rt.owner.values[i]) == device) {
            fnpu_map_del(&rt.owner, rt.owner.keys[i]);
            i--; /* a later key may have shifted into this slot */
        }
    }
    for (size_t i = 0; i < rt.nconstants;) {
        if (rt.constants[i].device == device) {
            free(rt.constants[i].data);
            rt.constants[i] = rt.constants[--rt.nconstants];
        } else {
            i++;
        }
    }
}

static aclError close_device(int device) {
    struct opened *o = &rt.opened[device];
    aclError ret = fnpu_call(o->session, FNPU_CMD_DEVICE_SYNC, NULL, 0, NULL, 0, NULL);
    fnpu_session_close(o->session); /* closing the session frees everything it held */
    *o = (struct opened){0};
    forget_device(device);
    if (tl_device == device) {
        tl_device = -1;
        tl_context = 0;
    }
    return ret;
}

static aclError reset(int32_t device, int force) {
    pthread_mutex_lock(&rt.lock);
    aclError ret = check_device(device);
    if (ret == ACL_SUCCESS && !rt.opened[device].session) {
        ret = fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtResetDevice(%d): the device was not set", device);
    }
    if (ret == ACL_SUCCESS && (force || --rt.opened[device].refs <= 0)) {
        ret = close_device(device);
    }
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

aclError aclrtResetDevice(int32_t deviceId) { return reset(deviceId, 0); }
aclError aclrtResetDeviceForce(int32_t deviceId) { return reset(deviceId, 1); }

aclError aclrtGetDeviceCount(uint32_t *count) {
    if (!count) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: count is NULL");
    }
    pthread_mutex_lock(&rt.lock);
    aclError ret = discover();
    *count = ret == ACL_SUCCESS ? (uint32_t)rt.ndevices : 0;
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

aclError fnpu_current_device(int *device) {
    if (tl_device < 0) {
        return fnpu_fail(ACL_ERROR_RT_CONTEXT_NULL, "no current device: call aclrtSetDevice first");
    }
    *device = tl_device;
    return ACL_SUCCESS;
}

aclError aclrtGetDevice(int32_t *deviceId) {
    int device = -1;
    aclError ret = deviceId ? fnpu_current_device(&device)
                            : fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: deviceId is NULL");
    if (deviceId) {
        *deviceId = device;
    }
    return ret;
}

aclError aclrtGetRunMode(aclrtRunMode *runMode) {
    if (!runMode) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetRunMode: runMode is NULL");
    }
    *runMode = ACL_HOST; /* the application runs on the host, the NPU is a device behind it */
    return ACL_SUCCESS;
}

/* The device a handle belongs to, else the current device (handle 0: the default stream). Lock held. */
static aclError route_locked(uint64_t handle, int *device) {
    uint64_t *owner = handle ? fnpu_map_get(&rt.owner, handle) : NULL;
    int d = owner ? DEVICE_OF(*owner) : tl_device;
    if (d < 0) {
        return fnpu_fail(ACL_ERROR_RT_CONTEXT_NULL, "no current device: call aclrtSetDevice first");
    }
    if (d >= rt.ndevices || !rt.opened[d].session) {
        return fnpu_fail(ACL_ERROR_RT_CONTEXT_NULL, "device %d is not set: call aclrtSetDevice(%d)", d, d);
    }
    *device = d;
    return ACL_SUCCESS;
}

aclError fnpu_session_of(uint64_t handle, struct fnpu_session **out) {
    pthread_mutex_lock(&rt.lock);
    int device;
    aclError ret = route_locked(handle, &device);
    if (ret == ACL_SUCCESS) {
        *out = rt.opened[device].session;
    }
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

aclError fnpu_create(uint32_t cmd, uint64_t route, const void *fixed, size_t fixed_len, uint64_t *handle) {
    pthread_mutex_lock(&rt.lock);
    int device;
    aclError ret = route_locked(route, &device);
    struct fnpu_session *s = ret == ACL_SUCCESS ? rt.opened[device].session : NULL;
    pthread_mutex_unlock(&rt.lock);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    struct fnpu_context_create_rep rep; /* every create replies with one handle */
    struct fnpu_out out = {&rep, sizeof rep, 0};
    ret = fnpu_call(s, cmd, fixed, fixed_len, NULL, 0, &out);
    if (ret == ACL_SUCCESS) {
        pthread_mutex_lock(&rt.lock);
        fnpu_map_put(&rt.owner, rep.handle, (uint64_t)device);
        pthread_mutex_unlock(&rt.lock);
        *handle = rep.handle;
    }
    return ret;
}

void fnpu_adopt(uint64_t handle, uint64_t like) {
    pthread_mutex_lock(&rt.lock);
    uint64_t *owner = like ? fnpu_map_get(&rt.owner, like) : NULL;
    fnpu_map_put(&rt.owner, handle, owner ? (uint64_t)DEVICE_OF(*owner) : (uint64_t)tl_device);
    pthread_mutex_unlock(&rt.lock);
}

aclError fnpu_destroy(uint32_t cmd, uint64_t handle) {
    struct fnpu_session *s;
    aclError ret = fnpu_session_of(handle, &s);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    ret = fnpu_call(s, cmd, &handle, sizeof handle, NULL, 0, NULL);
    if (ret == ACL_SUCCESS) {
        pthread_mutex_lock(&rt.lock);
        fnpu_map_del(&rt.owner, handle);
        pthread_mutex_unlock(&rt.lock);
        if (tl_context == handle) {
            tl_context = 0;
        }
    }
    return ret;
}

aclError fnpu_rt_call(uint32_t cmd, uint64_t route, const void *fixed, size_t fixed_len, struct fnpu_out *reply) {
    struct fnpu_session *s;
    aclError ret = fnpu_session_of(route, &s);
    return ret != ACL_SUCCESS ? ret : fnpu_call(s, cmd, fixed, fixed_len, NULL, 0, reply);
}

aclError fnpu_rt_submit(uint32_t cmd, uint64_t route, uint64_t stream, const void *fixed, size_t fixed_len) {
    struct fnpu_session *s;
    aclError ret = fnpu_session_of(route, &s);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    fnpu_hold(stream, 0);
    return fnpu_submit(s, cmd, fixed, fixed_len, NULL, 0, NULL, 0);
}

aclError aclrtCreateContext(aclrtContext *context, int32_t deviceId) {
    if (!context) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateContext: context is NULL");
    }
    aclError ret = aclrtSetDevice(deviceId); /* as aclrtCreateContext, this opens the device if needed */
    uint64_t handle = 0;
    if (ret == ACL_SUCCESS) {
        ret = fnpu_create(FNPU_CMD_CONTEXT_CREATE, 0, NULL, 0, &handle);
    }
    if (ret == ACL_SUCCESS) {
        tl_context = handle;
    }
    *context = (aclrtContext)(uintptr_t)handle;
    return ret;
}

aclError aclrtDestroyContext(aclrtContext context) {
    return fnpu_destroy(FNPU_CMD_CONTEXT_DESTROY, (uint64_t)(uintptr_t)context);
}

aclError aclrtSetCurrentContext(aclrtContext context) {
    uint64_t handle = (uint64_t)(uintptr_t)context;
    pthread_mutex_lock(&rt.lock);
    uint64_t *owner = handle ? fnpu_map_get(&rt.owner, handle) : NULL;
    aclError ret = ACL_SUCCESS;
    if (!owner) {
        ret = fnpu_fail(ACL_ERROR_RT_INVALID_HANDLE, "context 0x%llx does not exist", (unsigned long long)handle);
    } else {
        tl_device = DEVICE_OF(*owner);
        tl_context = handle;
    }
    pthread_mutex_unlock(&rt.lock);
    return ret;
}

aclError aclrtGetCurrentContext(aclrtContext *context) {
    if (!context) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetCurrentContext: context is NULL");
    }
    *context = (aclrtContext)(uintptr_t)tl_context;
    if (!tl_context) {
        return fnpu_fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context: call aclrtSetDevice or aclrtCreateContext");
    }
    return ACL_SUCCESS;
}

/* The current device's work, then the host callbacks queued on its streams, are done. */
aclError aclrtSynchronizeDevice(void) {
    aclError ret = fnpu_rt_call(FNPU_CMD_DEVICE_SYNC, 0, NULL, 0, NULL);
    if (ret == ACL_SUCCESS) {
        fnpu_hold_device(tl_device);
    }
    return ret;
}

int fnpu_device_of(uint64_t stream) {
    pthread_mutex_lock(&rt.lock);
    uint64_t *owner = stream ? fnpu_map_get(&rt.owner, stream) : NULL;
    int device = owner ? DEVICE_OF(*owner) : tl_device;
    pthread_mutex_unlock(&rt.lock);
    return device;
}

const char *aclrtGetSocName(void) {
    static __thread char name[300];
    struct fnpu_session *s = NULL;
    pthread_mutex_lock(&rt.lock);
    int device;
    if (route_locked(0, &device) == ACL_SUCCESS) {
        s = rt.opened[device].session;
        snprintf(name, sizeof name, "Ascend%s", s->chip);
    } else if (check_device(0) == ACL_SUCCESS && connect_device(0, &s) == ACL_SUCCESS) {
        snprintf(name, sizeof name, "Ascend%s", s->chip); /* asked over a session of its own */
        fnpu_session_close(s);
    }
    pthread_mutex_unlock(&rt.lock);
    return s ? name : NULL;
}

/* -- streams and events ----------------------------------------------------------------------------------- */

aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag) {
    if (!stream) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: stream is NULL");
    }
    struct fnpu_stream_create_req req = {priority, flag};
    uint64_t handle = 0;
    aclError ret = fnpu_create(FNPU_CMD_STREAM_CREATE, 0, &req, sizeof req, &handle);
    *stream = (aclrtStream)(uintptr_t)handle;
    return ret;
}

aclError aclrtCreateStream(aclrtStream *stream) { return aclrtCreateStreamWithConfig(stream, 0, 0); }

aclError aclrtDestroyStream(aclrtStream stream) {
    return fnpu_destroy(FNPU_CMD_STREAM_DESTROY, (uint64_t)(uintptr_t)stream);
}

/* The stream's work, then the host callbacks queued on it, are done. */
aclError aclrtSynchronizeStream(aclrtStream stream) {
    uint64_t handle = (uint64_t)(uintptr_t)stream;
    aclError ret = fnpu_rt_call(FNPU_CMD_STREAM_SYNC, handle, &handle, sizeof handle, NULL);
    if (ret == ACL_SUCCESS) {
        fnpu_hold(handle, 1);
    }
    return ret;
}

static aclError create_event(aclrtEvent *event) {
    if (!event) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateEvent: event is NULL");
    }
    uint64_t handle = 0;
    aclError ret = fnpu_create(FNPU_CMD_EVENT_CREATE, 0, NULL, 0, &handle);
    *event = (aclrtEvent)(uintptr_t)handle;
    return ret;
}

/* Every event here can be waited on, timed and queried, so the flags change nothing. */
aclError aclrtCreateEvent(aclrtEvent *event) { return create_event(event); }
aclError aclrtCreateEventWithFlag(aclrtEvent *event, uint32_t flag) {
    (void)flag;
    return create_event(event);
}
aclError aclrtCreateEventExWithFlag(aclrtEvent *event, uint32_t flag) {
    (void)flag;
    return create_event(event);
}

aclError aclrtDestroyEvent(aclrtEvent event) {
    return fnpu_destroy(FNPU_CMD_EVENT_DESTROY, (uint64_t)(uintptr_t)event);
}

static void flag(uint64_t handle, uint64_t bit, int on) {
    pthread_mutex_lock(&rt.lock);
    uint64_t *owner = handle ? fnpu_map_get(&rt.owner, handle) : NULL;
    if (owner) {
        *owner = on ? *owner | bit : *owner & ~bit;
    }
    pthread_mutex_unlock(&rt.lock);
}

static int flagged(uint64_t handle, uint64_t bit) {
    pthread_mutex_lock(&rt.lock);
    uint64_t *owner = handle ? fnpu_map_get(&rt.owner, handle) : NULL;
    int on = owner && (*owner & bit);
    pthread_mutex_unlock(&rt.lock);
    return on;
}

void fnpu_set_capturing(uint64_t stream, int capturing) { flag(stream, CAPTURING, capturing); }
int fnpu_capturing(uint64_t stream) { return flagged(stream, CAPTURING); }

static aclError event_on_stream(uint32_t cmd, aclrtEvent event, aclrtStream stream) {
    struct fnpu_event_record_req req = {(uint64_t)(uintptr_t)event, (uint64_t)(uintptr_t)stream};
    return fnpu_rt_submit(cmd, req.event, req.stream, &req, sizeof req);
}

aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream) {
    aclError ret = event_on_stream(FNPU_CMD_EVENT_RECORD, event, stream);
    if (ret == ACL_SUCCESS) {
        flag((uint64_t)(uintptr_t)event, RECORDED, 1);
    }
    return ret;
}

aclError aclrtResetEvent(aclrtEvent event, aclrtStream stream) {
    aclError ret = event_on_stream(FNPU_CMD_EVENT_RESET, event, stream);
    if (ret == ACL_SUCCESS) {
        flag((uint64_t)(uintptr_t)event, RECORDED, 0);
    }
    return ret;
}

aclError aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event) {
    return event_on_stream(FNPU_CMD_EVENT_WAIT, event, stream);
}

aclError aclrtSynchronizeEvent(aclrtEvent event) {
    uint64_t handle = (uint64_t)(uintptr_t)event;
    return fnpu_rt_call(FNPU_CMD_EVENT_SYNC, handle, &handle, sizeof handle, NULL);
}

static aclError completed(aclrtEvent event, int *done) {
    uint64_t handle = (uint64_t)(uintptr_t)event;
    struct fnpu_event_query_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_EVENT_QUERY, handle, &handle, sizeof handle, &out);
    *done = rep.completed;
    return ret;
}

aclError aclrtQueryEvent(aclrtEvent event, aclrtEventStatus *status) {
    int done = 0;
    aclError ret = status ? completed(event, &done) : fnpu_fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    if (status) {
        *status = done ? ACL_EVENT_STATUS_COMPLETE : ACL_EVENT_STATUS_NOT_READY;
    }
    return ret;
}

/* Has the work before the event's record completed? An event never recorded is NOT_READY. */
aclError aclrtQueryEventStatus(aclrtEvent event, aclrtEventRecordedStatus *status) {
    int done = 0;
    aclError ret = status ? completed(event, &done) : fnpu_fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    if (status) {
        int recorded = flagged((uint64_t)(uintptr_t)event, RECORDED);
        *status = done && recorded ? ACL_EVENT_RECORDED_STATUS_COMPLETE : ACL_EVENT_RECORDED_STATUS_NOT_READY;
    }
    return ret;
}

aclError aclrtQueryEventWaitStatus(aclrtEvent event, aclrtEventWaitStatus *status) {
    int done = 0;
    aclError ret = status ? completed(event, &done) : fnpu_fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    if (status) {
        *status = done ? ACL_EVENT_WAIT_STATUS_COMPLETE : ACL_EVENT_WAIT_STATUS_NOT_READY;
    }
    return ret;
}

aclError aclrtEventElapsedTime(float *ms, aclrtEvent startEvent, aclrtEvent endEvent) {
    if (!ms) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtEventElapsedTime: ms is NULL");
    }
    struct fnpu_event_elapsed_req req = {(uint64_t)(uintptr_t)startEvent, (uint64_t)(uintptr_t)endEvent};
    struct fnpu_event_elapsed_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_EVENT_ELAPSED, req.start, &req, sizeof req, &out);
    *ms = (float)(rep.ns / 1e6);
    return ret;
}

/* -- memory ----------------------------------------------------------------------------------------------- */

aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy) {
    if (!devPtr) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: devPtr is NULL");
    }
    struct fnpu_malloc_req req = {size, (uint32_t)policy};
    struct fnpu_malloc_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_MALLOC, 0, &req, sizeof req, &out);
    *devPtr = (void *)(uintptr_t)rep.ptr;
    return ret;
}

aclError aclrtFree(void *devPtr) {
    struct fnpu_free_req req = {(uint64_t)(uintptr_t)devPtr};
    return fnpu_rt_call(FNPU_CMD_FREE, 0, &req, sizeof req, NULL);
}

aclError aclrtMallocHost(void **hostPtr, size_t size) {
    if (!hostPtr || !size) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: needs an output pointer and a size > 0");
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, size) != 0) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "aclrtMallocHost: no host memory for %zu bytes", size);
    }
    pthread_mutex_lock(&rt.lock);
    fnpu_map_put(&rt.host, (uint64_t)(uintptr_t)p, size);
    pthread_mutex_unlock(&rt.lock);
    *hostPtr = p;
    return ACL_SUCCESS;
}

aclError aclrtFreeHost(void *hostPtr) {
    pthread_mutex_lock(&rt.lock);
    int known = fnpu_map_del(&rt.host, (uint64_t)(uintptr_t)hostPtr);
    pthread_mutex_unlock(&rt.lock);
    if (!known) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost(%p): not a pointer aclrtMallocHost returned (or "
                         "already freed)", hostPtr);
    }
    free(hostPtr);
    return ACL_SUCCESS;
}

/* Host-side work queued on a stream runs after everything before it: wait for the stream here. */
static aclError host_in_order(const uint64_t *stream) {
    if (!stream) {
        return ACL_SUCCESS;
    }
    fnpu_hold(*stream, 0);
    return fnpu_rt_call(FNPU_CMD_STREAM_SYNC, *stream, stream, sizeof *stream, NULL);
}

enum { H2H, H2D, D2H, D2D };

static aclError copy_chunk(uint64_t dst, uint64_t src, size_t n, int kind, const uint64_t *stream) {
    struct fnpu_session *s;
    aclError ret = fnpu_session_of(stream ? *stream : 0, &s);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    if (!stream) { /* blocking: host bytes are read in place, and land in place */
        struct fnpu_memcpy_h2d_req req = {dst, src, n};
        if (kind == H2D) {
            return fnpu_call(s, FNPU_CMD_MEMCPY_H2D, &req, sizeof req, (const void *)(uintptr_t)src, n, NULL);
        }
        if (kind == D2H) {
            struct fnpu_out out = {(void *)(uintptr_t)dst, n, 0};
            return fnpu_call(s, FNPU_CMD_MEMCPY_D2H, &req, sizeof req, NULL, 0, &out);
        }
        return fnpu_call(s, FNPU_CMD_MEMCPY_D2D, &req, sizeof req, NULL, 0, NULL);
    }
    /* asynchronous: the record waits in a batch, so it carries a snapshot of the host bytes */
    struct fnpu_memcpy_h2d_async_req req = {*stream, dst, src, n};
    fnpu_hold(*stream, 0);
    if (kind == H2D) {
        return fnpu_submit(s, FNPU_CMD_MEMCPY_H2D_ASYNC, &req, sizeof req, (const void *)(uintptr_t)src, n, NULL, 0);
    }
    if (kind == D2H) {
        return fnpu_submit(s, FNPU_CMD_MEMCPY_D2H_ASYNC, &req, sizeof req, NULL, 0, (void *)(uintptr_t)dst, n);
    }
    return fnpu_submit(s, FNPU_CMD_MEMCPY_D2D_ASYNC, &req, sizeof req, NULL, 0, NULL, 0);
}

/* On current CANN `kind` is a reserved argument: the direction comes from the two addresses. */
static aclError memcpy_any(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind,
                           const uint64_t *stream) {
    if (count > destMax) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "memcpy count %zu exceeds destMax %zu", count, destMax);
    }
    if ((unsigned)kind > 7) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "memcpy kind %d is not an aclrtMemcpyKind (0-7)", (int)kind);
    }
    int direction = (fnpu_is_device(src) ? 2 : 0) + (fnpu_is_device(dst) ? 1 : 0);
    direction = (int[]){H2H, H2D, D2H, D2D}[direction];
    if (direction == H2H) {
        aclError ret = host_in_order(stream);
        if (ret == ACL_SUCCESS) {
            memmove(dst, src, count);
        }
        return ret;
    }
    size_t offset = 0;
    do {
        size_t n = count - offset < FNPU_MEMCPY_CHUNK ? count - offset : FNPU_MEMCPY_CHUNK;
        aclError ret = copy_chunk((uint64_t)(uintptr_t)dst + offset, (uint64_t)(uintptr_t)src + offset, n, direction,
                                  stream);
        if (ret != ACL_SUCCESS) {
            return ret;
        }
        offset += n;
    } while (offset < count);
    return ACL_SUCCESS;
}

aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind) {
    return memcpy_any(dst, destMax, src, count, kind, NULL);
}

aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind,
                          aclrtStream stream) {
    uint64_t handle = (uint64_t)(uintptr_t)stream;
    return memcpy_any(dst, destMax, src, count, kind, &handle);
}

/* Device memory is set by the daemon; host memory here, in stream order. */
static aclError memset_any(void *devPtr, size_t maxCount, int32_t value, size_t count, const uint64_t *stream) {
    if (count > maxCount) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "memset count %zu exceeds maxCount %zu", count, maxCount);
    }
    if (!fnpu_is_device(devPtr)) {
        if (value < 0 || value > 0xff) {
            return fnpu_fail(ACL_ERROR_INVALID_PARAM, "memset value %d is not a byte (0-255)", value);
        }
        aclError ret = host_in_order(stream);
        if (ret == ACL_SUCCESS) {
            memset(devPtr, value, count);
        }
        return ret;
    }
    if (!stream) {
        struct fnpu_memset_req req = {(uint64_t)(uintptr_t)devPtr, (uint32_t)value, count};
        return fnpu_rt_call(FNPU_CMD_MEMSET, 0, &req, sizeof req, NULL);
    }
    struct fnpu_memset_async_req req = {*stream, (uint64_t)(uintptr_t)devPtr, (uint32_t)value, count};
    return fnpu_rt_submit(FNPU_CMD_MEMSET_ASYNC, *stream, *stream, &req, sizeof req);
}

aclError aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count) {
    return memset_any(devPtr, maxCount, value, count, NULL);
}

aclError aclrtMemsetAsync(void *devPtr, size_t maxCount, int32_t value, size_t count, aclrtStream stream) {
    uint64_t handle = (uint64_t)(uintptr_t)stream;
    return memset_any(devPtr, maxCount, value, count, &handle);
}

aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free, size_t *total) {
    if (!free || !total) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetMemInfo: free or total is NULL");
    }
    struct fnpu_mem_info_req req = {(uint32_t)attr};
    struct fnpu_mem_info_rep rep = {0, 0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_MEM_INFO, 0, &req, sizeof req, &out);
    *free = rep.free;
    *total = rep.total;
    return ret;
}

/* The device address of a constant operand (aclSetTensorConst), uploaded once per device and session. */
aclError fnpu_constant(const void *data, size_t len, uint64_t *ptr) {
    int device = -1;
    aclError ret = fnpu_current_device(&device);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    pthread_mutex_lock(&rt.lock);
    for (size_t i = 0; i < rt.nconstants; i++) {
        struct constant *c = &rt.constants[i];
        if (c->device == device && c->len == len && memcmp(c->data, data, len) == 0) {
            *ptr = c->ptr;
            pthread_mutex_unlock(&rt.lock);
            return ACL_SUCCESS;
        }
    }
    pthread_mutex_unlock(&rt.lock);
    void *dev;
    ret = aclrtMalloc(&dev, len, ACL_MEM_MALLOC_HUGE_FIRST);
    if (ret == ACL_SUCCESS) {
        ret = aclrtMemcpy(dev, len, data, len, ACL_MEMCPY_HOST_TO_DEVICE);
    }
    uint8_t *copy = ret == ACL_SUCCESS ? malloc(len) : NULL;
    if (ret == ACL_SUCCESS && !copy) {
        ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a constant operand");
    }
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    memcpy(copy, data, len);
    pthread_mutex_lock(&rt.lock);
    struct constant *grown = realloc(rt.constants, (rt.nconstants + 1) * sizeof *grown);
    if (grown) {
        rt.constants = grown;
        rt.constants[rt.nconstants++] = (struct constant){device, copy, len, (uint64_t)(uintptr_t)dev};
    } else {
        free(copy);
    }
    pthread_mutex_unlock(&rt.lock);
    *ptr = (uint64_t)(uintptr_t)dev;
    return ACL_SUCCESS;
}

/* -- core limits ------------------------------------------------------------------------------------------ */

aclError aclrtSetStreamResLimit(aclrtStream stream, aclrtDevResLimitType type, uint32_t value) {
    struct fnpu_stream_limit_set_req req = {(uint64_t)(uintptr_t)stream, (uint32_t)type, value};
    return fnpu_rt_call(FNPU_CMD_STREAM_LIMIT_SET, req.stream, &req, sizeof req, NULL);
}

aclError aclrtGetStreamResLimit(aclrtStream stream, aclrtDevResLimitType type, uint32_t *value) {
    if (!value) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetStreamResLimit: value is NULL");
    }
    struct fnpu_stream_limit_get_req req = {(uint64_t)(uintptr_t)stream, (uint32_t)type};
    struct fnpu_stream_limit_get_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_STREAM_LIMIT_GET, req.stream, &req, sizeof req, &out);
    *value = rep.value;
    return ret;
}

/* Operators launched from this thread take `stream`'s core limits, whatever stream they go on. */
aclError aclrtUseStreamResInCurrentThread(aclrtStream stream) {
    struct fnpu_session *s;
    aclError ret = fnpu_session_of((uint64_t)(uintptr_t)stream, &s); /* a stream of a device this process set */
    if (ret == ACL_SUCCESS) {
        tl_limits = (uint64_t)(uintptr_t)stream;
    }
    return ret;
}

aclError aclrtUnuseStreamResInCurrentThread(aclrtStream stream) {
    (void)stream;
    tl_limits = FNPU_OWN_LIMITS;
    return ACL_SUCCESS;
}

uint64_t fnpu_thread_limits(void) {
    if (tl_limits != FNPU_OWN_LIMITS && tl_limits) {
        pthread_mutex_lock(&rt.lock);
        int alive = fnpu_map_get(&rt.owner, tl_limits) != NULL;
        pthread_mutex_unlock(&rt.lock);
        if (!alive) {
            tl_limits = FNPU_OWN_LIMITS; /* its stream went with its session */
        }
    }
    return tl_limits;
}

/* A call about a device as a whole: it must be set. */
static aclError device_call(int32_t device, uint32_t cmd, const void *fixed, size_t fixed_len,
                            struct fnpu_out *reply) {
    pthread_mutex_lock(&rt.lock);
    aclError ret = check_device(device);
    struct fnpu_session *s = ret == ACL_SUCCESS ? rt.opened[device].session : NULL;
    pthread_mutex_unlock(&rt.lock);
    if (ret == ACL_SUCCESS && !s) {
        ret = fnpu_fail(ACL_ERROR_RT_CONTEXT_NULL, "device %d is not set: call aclrtSetDevice(%d)", device, device);
    }
    return ret != ACL_SUCCESS ? ret : fnpu_call(s, cmd, fixed, fixed_len, NULL, 0, reply);
}

aclError aclrtSetDeviceResLimit(int32_t deviceId, aclrtDevResLimitType type, uint32_t value) {
    struct fnpu_device_limit_set_req req = {(uint32_t)type, value};
    return device_call(deviceId, FNPU_CMD_DEVICE_LIMIT_SET, &req, sizeof req, NULL);
}

aclError aclrtGetDeviceResLimit(int32_t deviceId, aclrtDevResLimitType type, uint32_t *value) {
    if (!value) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceResLimit: value is NULL");
    }
    struct fnpu_device_limit_get_req req = {(uint32_t)type};
    struct fnpu_device_limit_get_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = device_call(deviceId, FNPU_CMD_DEVICE_LIMIT_GET, &req, sizeof req, &out);
    *value = rep.value;
    return ret;
}

/* -- IPC memory ------------------------------------------------------------------------------------------- */

static aclError ipc_key(const char *key, uint8_t out[64]) {
    if (!key || strnlen(key, 65) != 64) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM,
                         "IPC memory key %.20s: a key is the 64-character string aclrtIpcMemGetExportKey gave",
                         key ? key : "(NULL)");
    }
    memcpy(out, key, 64);
    return ACL_SUCCESS;
}

aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len, uint64_t flags) {
    if (!key || len < 65) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: key needs 65 bytes, got %zu", len);
    }
    struct fnpu_ipc_export_req req = {(uint64_t)(uintptr_t)devPtr, size, flags};
    struct fnpu_ipc_export_rep rep;
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_IPC_EXPORT, 0, &req, sizeof req, &out);
    if (ret == ACL_SUCCESS) {
        memcpy(key, rep.key, 64);
        key[64] = 0;
    }
    return ret;
}

aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num) {
    struct fnpu_ipc_allow_req req;
    aclError ret = ipc_key(key, req.key);
    struct fnpu_session *s;
    if (ret == ACL_SUCCESS) {
        ret = fnpu_session_of(0, &s);
    }
    return ret != ACL_SUCCESS ? ret : fnpu_call(s, FNPU_CMD_IPC_ALLOW, &req, sizeof req, pid, num * sizeof *pid, NULL);
}

aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags) {
    if (!devPtr) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: devPtr is NULL");
    }
    struct fnpu_ipc_import_req req = {.flags = flags};
    struct fnpu_ipc_import_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = ipc_key(key, req.key);
    if (ret == ACL_SUCCESS) {
        ret = fnpu_rt_call(FNPU_CMD_IPC_IMPORT, 0, &req, sizeof req, &out);
    }
    *devPtr = (void *)(uintptr_t)rep.ptr;
    return ret;
}

aclError aclrtIpcMemClose(const char *key) {
    struct fnpu_ipc_close_req req;
    aclError ret = ipc_key(key, req.key);
    return ret != ACL_SUCCESS ? ret : fnpu_rt_call(FNPU_CMD_IPC_CLOSE, 0, &req, sizeof req, NULL);
}

/* The pid the daemon knows this process by (across container pid namespaces): what allow-lists hold. */
aclError aclrtDeviceGetBareTgid(int32_t *pid) {
    if (!pid) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtDeviceGetBareTgid: pid is NULL");
    }
    struct fnpu_bare_tgid_rep rep = {0};
    struct fnpu_out out = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(FNPU_CMD_BARE_TGID, 0, NULL, 0, &out);
    *pid = (int32_t)rep.pid;
    return ret;
}
