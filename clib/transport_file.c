/* The daemon's transport: write() frames to a virtual device file, read() the replies (client.py FileTransport).
 * Errors keep the Python client's codes and wording: a daemon gone or a virtual NPU destroyed is the device
 * lost (ACL_ERROR_RT_SOCKET_CLOSE, 507901, "hdc disconnect" in CANN's rt_error_codes.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fnpu.h"

#define FIRST_READ (64 << 10)

struct file_transport {
    struct fnpu_transport base;
    int fd;
    struct fnpu_buf body;
    char npu[64]; /* the physical NPU whose process serves it, or "" (vdevfsd's davinciN links into .npu/<npu>/) */
};

/* The physical NPU whose process serves `path`: its real path ends in .npu/<npu>/<node> (vdevfs/front.py). */
static void served_by(const char *path, char *npu, size_t size) {
    npu[0] = 0;
    char *real = realpath(path, NULL);
    if (!real) {
        return;
    }
    char *node = strrchr(real, '/');
    if (node && node != real) {
        *node = 0;
        char *dir = strrchr(real, '/');
        if (dir && dir - real >= 5 && strncmp(dir - 5, "/.npu", 5) == 0) {
            snprintf(npu, size, "%s", dir + 1);
        }
    }
    free(real);
}

static aclError lost(struct file_transport *t, const char *what, int err) {
    const char *path = t->base.name;
    if ((err == ENOTCONN || err == ECONNABORTED) && t->npu[0]) {
        return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE,
                         "%s: the FlexNPU process serving physical NPU %s is gone (%s): this virtual device was "
                         "lost, as on a device reset, with its memory, streams and queued work; vdevfsd restarts "
                         "that process within seconds (`vdevctl ls` shows it): set the device again",
                         path, t->npu, strerror(err));
    }
    if (err == ENOTCONN || err == ECONNABORTED) {
        return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE,
                         "%s: the FlexNPU daemon is gone (%s): this virtual device was lost, as on a device reset, "
                         "with its memory, streams and queued work; restart the daemon (`vdevfsd mount`) and set "
                         "the device again",
                         path, strerror(err));
    }
    if (err == ENODEV) {
        return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE,
                         "%s: this virtual NPU was destroyed by the operator (vdevctl vnpu destroy --force): the "
                         "device was lost, with its memory, streams and queued work; set another device",
                         path);
    }
    return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE, "%s: %s: %s", path, what, strerror(err));
}

/* The daemon answers a frame it cannot decode with EINVAL and leaves the reason in a reply. */
static aclError refusal(struct file_transport *t) {
    uint8_t buf[4096];
    ssize_t n = read(t->fd, buf, sizeof buf);
    size_t head = sizeof(struct fnpu_frame_header) + sizeof(struct fnpu_reply_header);
    if (n >= (ssize_t)head) {
        struct fnpu_reply_header r;
        memcpy(&r, buf + sizeof(struct fnpu_frame_header), sizeof r);
        size_t len = r.length < (size_t)n - head ? r.length : (size_t)n - head;
        return fnpu_fail((aclError)r.status, "%s: daemon refused a frame: %.*s", t->base.name, (int)len,
                         (const char *)buf + head);
    }
    return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: daemon refused a frame (EINVAL)", t->base.name);
}

static aclError file_send(struct fnpu_transport *base, const struct iovec *iov, int n) {
    struct file_transport *t = (struct file_transport *)base;
    struct iovec local[8];
    memcpy(local, iov, n * sizeof *iov);
    struct iovec *v = local;
    while (n > 0) {
        ssize_t done = writev(t->fd, v, n);
        if (done < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno == EINVAL ? refusal(t) : lost(t, "the daemon refused a frame", errno);
        }
        while (n > 0 && (size_t)done >= v->iov_len) {
            done -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (uint8_t *)v->iov_base + done;
            v->iov_len -= (size_t)done;
        }
    }
    return ACL_SUCCESS;
}

/* Headers first (small reads are cheap), then the rest of the body into one reused buffer. */
static aclError file_call(struct fnpu_transport *base, const struct iovec *iov, int n, const uint8_t **body,
                          size_t *len) {
    struct file_transport *t = (struct file_transport *)base;
    aclError ret = file_send(base, iov, n);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    t->body.len = 0;
    if (fnpu_buf_reserve(&t->body, FIRST_READ) != ACL_SUCCESS) {
        return ACL_ERROR_BAD_ALLOC;
    }
    ssize_t got;
    do {
        got = read(t->fd, t->body.data, FIRST_READ);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        return lost(t, "reading the reply failed", errno);
    }
    if ((size_t)got < sizeof(struct fnpu_frame_header)) {
        return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE, "%s: the daemon sent no (whole) reply", t->base.name);
    }
    struct fnpu_frame_header f;
    memcpy(&f, t->body.data, sizeof f);
    if (memcmp(f.magic, FNPU_MAGIC, 4) != 0 || f.version != FNPU_PROTOCOL_VERSION) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM,
                         "%s: the daemon answered with protocol v%u, this client speaks v%d: use a libascendcl.so "
                         "from the same FlexNPU release as the daemon",
                         t->base.name, f.version, FNPU_PROTOCOL_VERSION);
    }
    size_t total = sizeof f + f.length;
    if (fnpu_buf_reserve(&t->body, total) != ACL_SUCCESS) {
        return ACL_ERROR_BAD_ALLOC;
    }
    size_t have = (size_t)got;
    while (have < total) {
        got = read(t->fd, t->body.data + have, total - have);
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got < 0) {
            return lost(t, "reading the reply failed", errno);
        }
        if (got == 0) {
            return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE, "%s: the reply was cut short", t->base.name);
        }
        have += (size_t)got;
    }
    *body = t->body.data + sizeof f;
    *len = f.length;
    return ACL_SUCCESS;
}

static void file_close(struct fnpu_transport *base) {
    struct file_transport *t = (struct file_transport *)base;
    close(t->fd);
    free(t->body.data);
    free(t);
}

aclError fnpu_file_open(const char *path, struct fnpu_transport **out) {
    char npu[64];
    served_by(path, npu, sizeof npu);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENODEV && npu[0]) {
        return fnpu_fail(ACL_ERROR_RT_NO_DEVICE,
                         "%s: its physical NPU's process (%s) is restarting; try again in a few seconds (see "
                         "`vdevctl ls`)",
                         path, npu);
    }
    if (fd < 0) {
        if (errno == EUSERS || errno == ENFILE) {
            return fnpu_fail(ACL_ERROR_RT_OVER_LIMIT,
                             "%s: the daemon refused a new session (%s): %s; each open device file (each process "
                             "with a device set) is one: close some",
                             path, strerror(errno),
                             errno == EUSERS ? "this user holds as many sessions as the daemon allows one user"
                                             : "the daemon serves as many sessions as it allows");
        }
        return fnpu_fail(ACL_ERROR_RT_NO_DEVICE,
                         "%s: cannot open the virtual device (%s); is vdevfsd running? see `vdevctl ls`", path,
                         strerror(errno));
    }
    struct file_transport *t = calloc(1, sizeof *t);
    if (!t) {
        close(fd);
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a transport");
    }
    t->base.send = file_send;
    t->base.call = file_call;
    t->base.close = file_close;
    snprintf(t->base.name, sizeof t->base.name, "%s", path);
    snprintf(t->npu, sizeof t->npu, "%s", npu);
    t->fd = fd;
    *out = &t->base;
    return ACL_SUCCESS;
}
