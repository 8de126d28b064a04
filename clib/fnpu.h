/* FlexNPU's C client: what its parts share. The same frames as the Python client (interposer/shim/
 * flexnpu_client), laid out by wire_layouts.h (generated from interposer/wire.py), over one of two transports:
 * a virtual device file (the daemon) or the translator in this process (direct mode, an embedded Python). */
#ifndef FLEXNPU_CLIB_FNPU_H
#define FLEXNPU_CLIB_FNPU_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "acl/acl.h"
#include "wire_layouts.h"

#define FNPU_HIDDEN __attribute__((visibility("hidden")))

/* -- errors (errors.c): a failed call records its message for this thread's aclGetRecentErrMsg ---------- */
FNPU_HIDDEN aclError fnpu_fail(aclError code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* -- growable byte buffers -------------------------------------------------------------------------------- */
struct fnpu_buf {
    uint8_t *data;
    size_t len, cap;
};
FNPU_HIDDEN aclError fnpu_buf_reserve(struct fnpu_buf *b, size_t more);
FNPU_HIDDEN aclError fnpu_buf_put(struct fnpu_buf *b, const void *data, size_t n);

/* -- transports: a frame out (iovecs starting with the frame header), the reply frame's body back -------- */
struct fnpu_transport {
    /* A frame of asynchronous records only: no reply. */
    aclError (*send)(struct fnpu_transport *t, const struct iovec *iov, int n);
    /* A frame ending in a synchronous record: the reply body, valid until the next call on `t`. */
    aclError (*call)(struct fnpu_transport *t, const struct iovec *iov, int n, const uint8_t **body, size_t *len);
    void (*close)(struct fnpu_transport *t);
    char name[256];
};
FNPU_HIDDEN aclError fnpu_file_open(const char *path, struct fnpu_transport **out);
FNPU_HIDDEN aclError fnpu_direct_names(char ***names, int *count);
FNPU_HIDDEN aclError fnpu_direct_open(const char *name, struct fnpu_transport **out);

/* -- sessions (session.c): one per set device; batching, replies, landing of async device-to-host bytes --- */
struct fnpu_landing {
    uint32_t seq;
    void *host;
    size_t count;
};

struct fnpu_template {
    uint64_t hash;
    uint8_t *desc;
    size_t len;
    uint32_t id;
};

struct fnpu_session {
    pthread_mutex_t lock;
    struct fnpu_transport *transport;
    uint32_t seq;
    struct fnpu_buf batch;
    uint32_t batch_records;
    size_t batch_bytes;
    struct fnpu_landing *landing;
    size_t nlanding, caplanding;
    struct fnpu_template *templates;
    size_t ntemplates, captemplates;
    uint64_t total_memory;
    char name[256], chip[256];
};

/* Where a synchronous call's reply payload goes: `cap` bytes at `out` (the rest is dropped); `len` gets the
 * payload's length. A fixed reply is a struct; a blocking device-to-host copy lands straight in its dst. */
struct fnpu_out {
    void *out;
    size_t cap;
    size_t len;
};

FNPU_HIDDEN aclError fnpu_session_open(struct fnpu_transport *t, int phase, struct fnpu_session **out);
FNPU_HIDDEN void fnpu_session_close(struct fnpu_session *s);
FNPU_HIDDEN aclError fnpu_submit(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len,
                                 const void *data, size_t data_len, void *landing, size_t landing_count);
FNPU_HIDDEN aclError fnpu_call(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len,
                               const void *data, size_t data_len, struct fnpu_out *reply);
FNPU_HIDDEN aclError fnpu_launch(struct fnpu_session *s, const uint8_t *desc, size_t desc_len,
                                 const struct fnpu_op_launch_req *launch, const uint64_t *addresses);
FNPU_HIDDEN uint64_t fnpu_records_sent(struct fnpu_session *s);

/* -- the runtime (runtime.c): devices, the current device and context per thread, handle owners --------- */
FNPU_HIDDEN aclError fnpu_session_of(uint64_t handle, struct fnpu_session **out);
FNPU_HIDDEN aclError fnpu_current_device(int *device);
FNPU_HIDDEN int fnpu_device_of(uint64_t stream);
FNPU_HIDDEN aclError fnpu_create(uint32_t cmd, uint64_t route, const void *fixed, size_t fixed_len,
                                 uint64_t *handle);
FNPU_HIDDEN void fnpu_adopt(uint64_t handle, uint64_t like);
FNPU_HIDDEN aclError fnpu_destroy(uint32_t cmd, uint64_t handle);
FNPU_HIDDEN aclError fnpu_rt_call(uint32_t cmd, uint64_t route, const void *fixed, size_t fixed_len,
                                  struct fnpu_out *reply);
FNPU_HIDDEN aclError fnpu_rt_submit(uint32_t cmd, uint64_t route, uint64_t stream, const void *fixed,
                                    size_t fixed_len);
FNPU_HIDDEN uint64_t fnpu_thread_limits(void);
FNPU_HIDDEN aclError fnpu_constant(const void *data, size_t len, uint64_t *ptr);
FNPU_HIDDEN int fnpu_is_device(const void *ptr);
FNPU_HIDDEN void fnpu_set_capturing(uint64_t stream, int capturing);
FNPU_HIDDEN int fnpu_capturing(uint64_t stream);

/* -- operators (op.c), for offline models (model.c) ------------------------------------------------------ */
/* Launch with the operands' device addresses given (inputs then outputs). */
FNPU_HIDDEN aclError fnpu_op_launch(const char *op_type, int nin, const aclTensorDesc *const ins[], int nout,
                                    const aclTensorDesc *const outs[], const uint64_t *addresses,
                                    const aclopAttr *attr, aclrtStream stream);
/* Set attribute `name` to a value already in its wire encoding (wire.Attribute). */
FNPU_HIDDEN aclError fnpu_attr_set(aclopAttr *attr, const char *name, uint8_t kind, const void *value, size_t len);

/* -- host callbacks (report.c) ---------------------------------------------------------------------------- */
/* Wait until the callbacks queued on `stream` that hold it (every one: all != 0) have returned. */
FNPU_HIDDEN void fnpu_hold(uint64_t stream, int all);
FNPU_HIDDEN void fnpu_hold_device(int device);

#endif
