/* Host callbacks in stream order (aclrtSubscribeReport, aclrtLaunchCallback, aclrtProcessReport), as
 * flexnpu_client/reports.py: a launch records an event on the stream where the callback stands; the thread
 * subscribed to that stream, in aclrtProcessReport, takes its next callback, waits for the event (so everything
 * queued before it has run) and calls it. A callback launched with ACL_CALLBACK_BLOCK holds the stream's later
 * work: whoever queues work on that stream after it waits until it has returned; synchronising the stream waits
 * for every callback queued on it. */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "fnpu.h"

struct pending {
    uint64_t thread, stream, event;
    aclrtCallback fn;
    void *user_data;
    int block, taken;
    struct pending *next;
};

struct subscriber {
    uint64_t stream, thread;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static struct pending *queue; /* in launch order */
static int queued;             /* its length, read without the lock on every launch: is any callback pending? */
static struct subscriber *subscribers;
static size_t nsubscribers;

static struct subscriber *subscriber_of(uint64_t stream) {
    for (size_t i = 0; i < nsubscribers; i++) {
        if (subscribers[i].stream == stream) {
            return &subscribers[i];
        }
    }
    return NULL;
}

aclError aclrtSubscribeReport(uint64_t threadId, aclrtStream stream) {
    uint64_t s = (uint64_t)(uintptr_t)stream;
    pthread_mutex_lock(&lock);
    struct subscriber *have = subscriber_of(s);
    aclError ret = ACL_SUCCESS;
    if (have) {
        ret = fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtSubscribeReport: stream %p already reports to thread %llu",
                        stream, (unsigned long long)have->thread);
    } else {
        struct subscriber *grown = realloc(subscribers, (nsubscribers + 1) * sizeof *grown);
        if (!grown) {
            ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to subscribe a thread");
        } else {
            subscribers = grown;
            subscribers[nsubscribers++] = (struct subscriber){s, threadId};
        }
    }
    pthread_mutex_unlock(&lock);
    return ret;
}

aclError aclrtUnSubscribeReport(uint64_t threadId, aclrtStream stream) {
    pthread_mutex_lock(&lock);
    struct subscriber *have = subscriber_of((uint64_t)(uintptr_t)stream);
    aclError ret = ACL_SUCCESS;
    if (!have || have->thread != threadId) {
        ret = fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtUnSubscribeReport: stream %p does not report to thread %llu",
                        stream, (unsigned long long)threadId);
    } else {
        *have = subscribers[--nsubscribers];
    }
    pthread_mutex_unlock(&lock);
    return ret;
}

aclError aclrtLaunchCallback(aclrtCallback fn, void *userData, aclrtCallbackBlockType blockType,
                             aclrtStream stream) {
    uint64_t s = (uint64_t)(uintptr_t)stream;
    pthread_mutex_lock(&lock);
    struct subscriber *have = subscriber_of(s);
    uint64_t thread = have ? have->thread : 0;
    pthread_mutex_unlock(&lock);
    if (!have) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM,
                         "aclrtLaunchCallback: stream %p has no subscribed thread; call aclrtSubscribeReport first",
                         stream);
    }
    if (!fn) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclrtLaunchCallback: fn is NULL");
    }
    uint64_t event;
    aclError ret = fnpu_create(FNPU_CMD_EVENT_CREATE, s, NULL, 0, &event);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    struct fnpu_event_record_req req = {event, s};
    ret = fnpu_rt_submit(FNPU_CMD_EVENT_RECORD, event, s, &req, sizeof req);
    struct pending *p = ret == ACL_SUCCESS ? calloc(1, sizeof *p) : NULL;
    if (ret == ACL_SUCCESS && !p) {
        ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a callback");
    }
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    *p = (struct pending){thread, s, event, fn, userData, blockType == ACL_CALLBACK_BLOCK, 0, NULL};
    pthread_mutex_lock(&lock);
    struct pending **tail = &queue;
    while (*tail) {
        tail = &(*tail)->next;
    }
    *tail = p;
    __atomic_add_fetch(&queued, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    return ACL_SUCCESS;
}

static int holding(uint64_t stream, int all) {
    for (struct pending *p = queue; p; p = p->next) {
        if (p->stream == stream && (p->block || all)) {
            return 1;
        }
    }
    return 0;
}

void fnpu_hold(uint64_t stream, int all) {
    if (!__atomic_load_n(&queued, __ATOMIC_ACQUIRE)) { /* the common case: no callbacks anywhere */
        return;
    }
    pthread_mutex_lock(&lock);
    while (holding(stream, all)) {
        pthread_cond_wait(&changed, &lock);
    }
    pthread_mutex_unlock(&lock);
}

void fnpu_hold_device(int device) {
    for (;;) {
        uint64_t stream = 0;
        int found = 0;
        pthread_mutex_lock(&lock);
        for (struct pending *p = queue; p && !found; p = p->next) {
            if (fnpu_device_of(p->stream) == device) {
                stream = p->stream;
                found = 1;
            }
        }
        pthread_mutex_unlock(&lock);
        if (!found) {
            return;
        }
        fnpu_hold(stream, 1);
    }
}

aclError aclrtProcessReport(int32_t timeout) {
    uint64_t self = (uint64_t)pthread_self();
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout / 1000;
    deadline.tv_nsec += (long)(timeout % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&lock);
    struct pending *mine = NULL;
    for (;;) {
        for (mine = queue; mine && (mine->thread != self || mine->taken); mine = mine->next) {
        }
        if (mine) {
            break;
        }
        int waited = timeout < 0 ? pthread_cond_wait(&changed, &lock)
                                 : pthread_cond_timedwait(&changed, &lock, &deadline);
        if (waited == ETIMEDOUT) {
            pthread_mutex_unlock(&lock);
            return fnpu_fail(ACL_ERROR_RT_WAIT_TIMEOUT, "aclrtProcessReport: no callback within %d ms", timeout);
        }
    }
    mine->taken = 1;
    pthread_mutex_unlock(&lock);
    aclError ret = fnpu_rt_call(FNPU_CMD_EVENT_SYNC, mine->event, &mine->event, sizeof mine->event, NULL);
    if (ret == ACL_SUCCESS) {
        ret = fnpu_destroy(FNPU_CMD_EVENT_DESTROY, mine->event);
    }
    if (ret == ACL_SUCCESS) {
        mine->fn(mine->user_data);
    }
    pthread_mutex_lock(&lock);
    for (struct pending **p = &queue; *p; p = &(*p)->next) {
        if (*p == mine) {
            *p = mine->next;
            __atomic_sub_fetch(&queued, 1, __ATOMIC_RELEASE);
            break;
        }
    }
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    free(mine);
    return ret;
}
