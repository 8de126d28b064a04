/* The client end of a session, as flexnpu_client/client.py: asynchronous records wait in a batch that goes out
 * with the next synchronous call (or once FNPU_FLUSH_RECORDS / FNPU_FLUSH_BYTES are reached); replies come back
 * in order, with the bytes of completed asynchronous device-to-host copies, which land here. One lock per
 * session: calls from several threads are serialised, as one channel requires. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fnpu.h"

aclError fnpu_buf_reserve(struct fnpu_buf *b, size_t more) {
    if (b->len + more <= b->cap) {
        return ACL_SUCCESS;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        cap *= 2;
    }
    uint8_t *data = realloc(b->data, cap);
    if (!data) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a %zu-byte client buffer", cap);
    }
    b->data = data;
    b->cap = cap;
    return ACL_SUCCESS;
}

aclError fnpu_buf_put(struct fnpu_buf *b, const void *data, size_t n) {
    aclError ret = fnpu_buf_reserve(b, n);
    if (ret == ACL_SUCCESS && n) {
        memcpy(b->data + b->len, data, n);
        b->len += n;
    }
    return ret;
}

/* A record into the batch: header, fixed part, then `data` (copied: the batch is a snapshot). Lock held. */
static aclError queue(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len, const void *data,
                      size_t data_len) {
    struct fnpu_record_header h = {cmd, s->seq + 1, (uint32_t)(fixed_len + data_len)};
    aclError ret = fnpu_buf_reserve(&s->batch, sizeof h + fixed_len + data_len);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    fnpu_buf_put(&s->batch, &h, sizeof h);
    fnpu_buf_put(&s->batch, fixed, fixed_len);
    fnpu_buf_put(&s->batch, data, data_len);
    s->seq++;
    s->batch_records++;
    s->batch_bytes += data_len;
    return ACL_SUCCESS;
}

static struct fnpu_frame_header frame_header(uint32_t count, size_t length) {
    struct fnpu_frame_header f = {{0}, FNPU_PROTOCOL_VERSION, 0, count, (uint32_t)length};
    memcpy(f.magic, FNPU_MAGIC, 4);
    return f;
}

static void clear(struct fnpu_session *s) {
    s->batch.len = 0;
    s->batch_records = 0;
    s->batch_bytes = 0;
}

static aclError flush(struct fnpu_session *s) {
    if (!s->batch_records) {
        return ACL_SUCCESS;
    }
    struct fnpu_frame_header f = frame_header(s->batch_records, s->batch.len);
    struct iovec iov[2] = {{&f, sizeof f}, {s->batch.data, s->batch.len}};
    clear(s);
    return s->transport->send(s->transport, iov, 2);
}

static aclError remember_landing(struct fnpu_session *s, uint32_t seq, void *host, size_t count) {
    if (s->nlanding == s->caplanding) {
        size_t cap = s->caplanding ? 2 * s->caplanding : 16;
        struct fnpu_landing *l = realloc(s->landing, cap * sizeof *l);
        if (!l) {
            return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to track an asynchronous copy");
        }
        s->landing = l;
        s->caplanding = cap;
    }
    s->landing[s->nlanding++] = (struct fnpu_landing){seq, host, count};
    return ACL_SUCCESS;
}

static void land(struct fnpu_session *s, uint32_t seq, const uint8_t *payload, size_t len) {
    for (size_t i = 0; i < s->nlanding; i++) {
        if (s->landing[i].seq == seq) {
            size_t n = len < s->landing[i].count ? len : s->landing[i].count;
            memcpy(s->landing[i].host, payload, n);
            s->landing[i] = s->landing[--s->nlanding];
            return;
        }
    }
}

aclError fnpu_submit(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len, const void *data,
                     size_t data_len, void *landing, size_t landing_count) {
    pthread_mutex_lock(&s->lock);
    aclError ret = queue(s, cmd, fixed, fixed_len, data, data_len);
    if (ret == ACL_SUCCESS && landing) {
        ret = remember_landing(s, s->seq, landing, landing_count);
    }
    if (ret == ACL_SUCCESS && (s->batch_records >= FNPU_FLUSH_RECORDS || s->batch_bytes >= FNPU_FLUSH_BYTES)) {
        ret = flush(s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* The batch plus one synchronous record; the record's bulk data travels as its own iovec, not copied. */
static aclError call_locked(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len,
                            const void *data, size_t data_len, struct fnpu_out *reply) {
    uint32_t seq = s->seq + 1;
    struct fnpu_record_header h = {cmd, seq, (uint32_t)(fixed_len + data_len)};
    size_t length = s->batch.len + sizeof h + fixed_len + data_len;
    struct fnpu_frame_header f = frame_header(s->batch_records + 1, length);
    struct iovec iov[5] = {{&f, sizeof f}, {s->batch.data, s->batch.len}, {&h, sizeof h}, {(void *)fixed, fixed_len},
                           {(void *)data, data_len}};
    s->seq = seq;
    clear(s);
    const uint8_t *body;
    size_t len;
    aclError ret = s->transport->call(s->transport, iov, data_len ? 5 : 4, &body, &len);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    int found = 0;
    for (size_t offset = 0; offset + sizeof(struct fnpu_reply_header) <= len;) {
        struct fnpu_reply_header r;
        memcpy(&r, body + offset, sizeof r);
        offset += sizeof r;
        if (r.length > len - offset) {
            return fnpu_fail(ACL_ERROR_RT_SOCKET_CLOSE, "%s: a reply was cut short", s->transport->name);
        }
        const uint8_t *payload = body + offset;
        offset += r.length;
        if (r.seq != seq) {
            land(s, r.seq, payload, r.length);
            continue;
        }
        found = 1;
        if (r.status != ACL_SUCCESS) {
            ret = fnpu_fail((aclError)r.status, "%.*s", (int)r.length, (const char *)payload);
        } else if (reply) {
            size_t n = r.length < reply->cap ? r.length : reply->cap;
            if (n) {
                memcpy(reply->out, payload, n);
            }
            reply->len = r.length;
        }
    }
    if (!found) {
        return fnpu_fail(ACL_ERROR_INTERNAL_ERROR, "%s: no reply to record seq %u", s->transport->name, seq);
    }
    return ret;
}

aclError fnpu_call(struct fnpu_session *s, uint32_t cmd, const void *fixed, size_t fixed_len, const void *data,
                   size_t data_len, struct fnpu_out *reply) {
    pthread_mutex_lock(&s->lock);
    aclError ret = call_locked(s, cmd, fixed, fixed_len, data, data_len, reply);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 1099511628211ull;
    }
    return h;
}

/* An operator's description travels once per session (OP_TEMPLATE); launches name it by id. Both are queued
 * under the session lock, so no thread can launch a template before the daemon has its description. */
aclError fnpu_launch(struct fnpu_session *s, const uint8_t *desc, size_t desc_len,
                     const struct fnpu_op_launch_req *launch, const uint64_t *addresses) {
    uint64_t hash = fnv1a(desc, desc_len);
    pthread_mutex_lock(&s->lock);
    aclError ret = ACL_SUCCESS;
    uint32_t id = 0;
    for (size_t i = 0; i < s->ntemplates; i++) {
        struct fnpu_template *t = &s->templates[i];
        if (t->hash == hash && t->len == desc_len && memcmp(t->desc, desc, desc_len) == 0) {
            id = t->id;
            break;
        }
    }
    if (!id) {
        if (s->ntemplates == s->captemplates) {
            size_t cap = s->captemplates ? 2 * s->captemplates : 16;
            struct fnpu_template *t = realloc(s->templates, cap * sizeof *t);
            if (!t) {
                ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for an operator template");
                goto out;
            }
            s->templates = t;
            s->captemplates = cap;
        }
        uint8_t *copy = malloc(desc_len);
        if (!copy) {
            ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for an operator template");
            goto out;
        }
        memcpy(copy, desc, desc_len);
        id = (uint32_t)s->ntemplates + 1;
        struct fnpu_op_template_req req = {id};
        ret = queue(s, FNPU_CMD_OP_TEMPLATE, &req, sizeof req, desc, desc_len);
        if (ret != ACL_SUCCESS) {
            free(copy);
            goto out;
        }
        s->templates[s->ntemplates++] = (struct fnpu_template){hash, copy, desc_len, id};
    }
    struct fnpu_op_launch_req req = *launch;
    req.template = id;
    ret = queue(s, FNPU_CMD_OP_LAUNCH, &req, sizeof req, addresses, launch->count * sizeof(uint64_t));
    if (ret == ACL_SUCCESS && (s->batch_records >= FNPU_FLUSH_RECORDS || s->batch_bytes >= FNPU_FLUSH_BYTES)) {
        ret = flush(s);
    }
out:
    pthread_mutex_unlock(&s->lock);
    return ret;
}

uint64_t fnpu_records_sent(struct fnpu_session *s) {
    pthread_mutex_lock(&s->lock);
    uint64_t n = s->seq;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* The handshake's reply (wire COMMANDS[HELLO].reply): version u16, total memory u64, two u8-prefixed strings. */
static aclError hello(struct fnpu_session *s, int phase) {
    struct fnpu_hello_req req = {FNPU_PROTOCOL_VERSION, (uint8_t)phase, FNPU_HELLO_REQ_PAD, (uint32_t)getpid()};
    uint8_t payload[2 + 8 + 2 * 256];
    struct fnpu_out out = {payload, sizeof payload, 0};
    aclError ret = call_locked(s, FNPU_CMD_HELLO, &req, sizeof req, NULL, 0, &out);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    if (out.len < 12 || out.len > sizeof payload) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: a malformed handshake reply", s->transport->name);
    }
    memcpy(&s->total_memory, payload + 2, 8);
    size_t offset = 10;
    char *strings[2] = {s->name, s->chip};
    for (int i = 0; i < 2; i++) {
        size_t n = payload[offset];
        if (offset + 1 + n > out.len) {
            return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: a malformed handshake reply", s->transport->name);
        }
        memcpy(strings[i], payload + offset + 1, n);
        strings[i][n] = 0;
        offset += 1 + n;
    }
    return ACL_SUCCESS;
}

aclError fnpu_session_open(struct fnpu_transport *t, int phase, struct fnpu_session **out) {
    struct fnpu_session *s = calloc(1, sizeof *s);
    if (!s) {
        t->close(t);
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a session");
    }
    pthread_mutex_init(&s->lock, NULL);
    s->transport = t;
    aclError ret = hello(s, phase);
    if (ret != ACL_SUCCESS) {
        fnpu_session_close(s);
        return ret;
    }
    *out = s;
    return ACL_SUCCESS;
}

/* Closing the session frees everything it held on the daemon's side. */
void fnpu_session_close(struct fnpu_session *s) {
    s->transport->close(s->transport);
    for (size_t i = 0; i < s->ntemplates; i++) {
        free(s->templates[i].desc);
    }
    free(s->templates);
    free(s->landing);
    free(s->batch.data);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
