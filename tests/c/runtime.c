/* The runtime groups of the C API through one virtual NPU (two for IPC memory): errors and their messages,
 * contexts per thread, events, memset and asynchronous copies, host callbacks, core limits, IPC memory, and
 * several threads launching at once. Arguments: none. Devices 0 and 1 must share a physical NPU. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#define N 256

static aclTensorDesc *vector(int64_t n) { return aclCreateTensorDesc(ACL_FLOAT, 1, &n, ACL_FORMAT_ND); }

/* c = a + b on `stream` with n floats at each device address */
static void add(void *a, void *b, void *c, int64_t n, aclrtStream stream) {
    aclTensorDesc *desc[3] = {vector(n), vector(n), vector(n)};
    aclDataBuffer *buf[3] = {aclCreateDataBuffer(a, n * 4), aclCreateDataBuffer(b, n * 4), aclCreateDataBuffer(c, n * 4)};
    CHECK(aclopExecuteV2("Add", 2, desc, buf, 1, desc + 2, buf + 2, NULL, stream));
    for (int i = 0; i < 3; i++) {
        aclDestroyTensorDesc(desc[i]);
        CHECK(aclDestroyDataBuffer(buf[i]));
    }
}

static void *upload(const float *host, size_t n) {
    void *dev;
    CHECK(aclrtMalloc(&dev, n * 4, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(dev, n * 4, host, n * 4, ACL_MEMCPY_HOST_TO_DEVICE));
    return dev;
}

static void errors(void) {
    int32_t device = 7;
    EXPECT(aclrtGetDevice(&device) == ACL_ERROR_RT_CONTEXT_NULL, "no current device before aclrtSetDevice");
    EXPECT(aclrtSetDevice(99) == ACL_ERROR_RT_INVALID_DEVICEID, "device 99 does not exist");
    const char *why = aclGetRecentErrMsg();
    EXPECT(why && strstr(why, "device 99"), "the message names the device: %s", why ? why : "(NULL)");
    EXPECT(aclInit(NULL) == ACL_ERROR_REPEAT_INITIALIZE, "aclInit twice");
}

static void contexts(void) {
    aclrtContext own, current;
    CHECK(aclrtCreateContext(&own, 0));
    CHECK(aclrtGetCurrentContext(&current));
    EXPECT(own == current, "aclrtCreateContext makes its context current");
    int32_t device = -1;
    CHECK(aclrtGetDevice(&device));
    EXPECT(device == 0, "device %d", device);
    CHECK(aclrtSetCurrentContext(own));
    CHECK(aclrtDestroyContext(own));
    EXPECT(aclrtSetCurrentContext(own) == ACL_ERROR_RT_INVALID_HANDLE, "a destroyed context is gone");
}

static void events_and_copies(aclrtStream stream) {
    aclrtEvent start, end;
    CHECK(aclrtCreateEvent(&start));
    CHECK(aclrtCreateEventWithFlag(&end, ACL_EVENT_TIME_LINE));
    aclrtEventRecordedStatus recorded;
    CHECK(aclrtQueryEventStatus(end, &recorded));
    EXPECT(recorded == ACL_EVENT_RECORDED_STATUS_NOT_READY, "an event never recorded is not ready");
    void *dev;
    CHECK(aclrtMalloc(&dev, N, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemset(dev, N, 0x11, N));
    CHECK(aclrtRecordEvent(start, stream));
    CHECK(aclrtMemsetAsync(dev, N, 0x5a, N / 2, stream));
    unsigned char back[N];
    memset(back, 0, sizeof back);
    CHECK(aclrtMemcpyAsync(back, N, dev, N, ACL_MEMCPY_DEVICE_TO_HOST, stream));
    CHECK(aclrtRecordEvent(end, stream));
    CHECK(aclrtSynchronizeEvent(end));
    CHECK(aclrtQueryEventStatus(end, &recorded));
    EXPECT(recorded == ACL_EVENT_RECORDED_STATUS_COMPLETE, "recorded and done");
    aclrtEventStatus status;
    CHECK(aclrtQueryEvent(end, &status));
    EXPECT(status == ACL_EVENT_STATUS_COMPLETE, "complete");
    float ms = -1;
    CHECK(aclrtEventElapsedTime(&ms, start, end));
    EXPECT(ms >= 0, "elapsed %g ms", ms);
    CHECK(aclrtSynchronizeStream(stream)); /* the asynchronous copy's bytes have landed */
    for (int i = 0; i < N; i++) {
        EXPECT(back[i] == (i < N / 2 ? 0x5a : 0x11), "byte %d is 0x%x", i, back[i]);
    }
    void *other;
    CHECK(aclrtMalloc(&other, N, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(other, N, dev, N, ACL_MEMCPY_DEVICE_TO_DEVICE));
    unsigned char host_copy[N];
    CHECK(aclrtMemcpy(host_copy, N, back, N, ACL_MEMCPY_HOST_TO_HOST));
    CHECK(aclrtMemcpy(back, N, other, N, ACL_MEMCPY_DEVICE_TO_HOST));
    EXPECT(memcmp(back, host_copy, N) == 0, "device-to-device copy");
    EXPECT(aclrtMemcpy(back, N / 2, other, N, ACL_MEMCPY_DEVICE_TO_HOST) == ACL_ERROR_INVALID_PARAM, "count > max");
    size_t free_bytes = 0, total = 0;
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free_bytes, &total));
    EXPECT(total > 0 && free_bytes <= total, "free %zu of %zu", free_bytes, total);
    CHECK(aclrtFree(dev));
    CHECK(aclrtFree(other));
    CHECK(aclrtDestroyEvent(start));
    CHECK(aclrtDestroyEvent(end));
}

static int stop_reports, called; /* stop_reports: read by the reporting thread */

static void *reporter(void *unused) {
    (void)unused;
    while (!__atomic_load_n(&stop_reports, __ATOMIC_ACQUIRE)) {
        aclError ret = aclrtProcessReport(100);
        EXPECT(ret == ACL_SUCCESS || ret == ACL_ERROR_RT_WAIT_TIMEOUT, "aclrtProcessReport: %d", ret);
    }
    return NULL;
}

static void on_done(void *user_data) { called += *(int *)user_data; }

static void callbacks(aclrtStream stream) {
    pthread_t thread;
    pthread_create(&thread, NULL, reporter, NULL);
    CHECK(aclrtSubscribeReport((uint64_t)thread, stream));
    static int one = 1, ten = 10;
    CHECK(aclrtLaunchCallback(on_done, &one, ACL_CALLBACK_NO_BLOCK, stream));
    CHECK(aclrtLaunchCallback(on_done, &ten, ACL_CALLBACK_BLOCK, stream));
    CHECK(aclrtSynchronizeStream(stream)); /* waits for the callbacks queued on it */
    EXPECT(called == 11, "both callbacks ran before the stream synchronised (%d)", called);
    CHECK(aclrtUnSubscribeReport((uint64_t)thread, stream));
    __atomic_store_n(&stop_reports, 1, __ATOMIC_RELEASE);
    pthread_join(thread, NULL);
}

static void limits(aclrtStream stream) {
    uint32_t value = 0;
    CHECK(aclrtSetStreamResLimit(stream, ACL_RT_DEV_RES_CUBE_CORE, 4));
    CHECK(aclrtGetStreamResLimit(stream, ACL_RT_DEV_RES_CUBE_CORE, &value));
    EXPECT(value == 4, "stream cube limit %u", value);
    CHECK(aclrtSetDeviceResLimit(0, ACL_RT_DEV_RES_VECTOR_CORE, 8));
    CHECK(aclrtGetDeviceResLimit(0, ACL_RT_DEV_RES_VECTOR_CORE, &value));
    EXPECT(value == 8, "device vector limit %u", value);
    CHECK(aclrtUseStreamResInCurrentThread(stream));
    float host[N];
    for (int i = 0; i < N; i++) {
        host[i] = (float)i;
    }
    void *x = upload(host, N);
    add(x, x, x, N, NULL); /* on the default stream, with `stream`'s limits */
    CHECK(aclrtUnuseStreamResInCurrentThread(stream));
    CHECK(aclrtSynchronizeDevice());
    CHECK(aclrtMemcpy(host, sizeof host, x, sizeof host, ACL_MEMCPY_DEVICE_TO_HOST));
    EXPECT(host[3] == 6.0f, "x + x = %g", host[3]);
    CHECK(aclrtFree(x));
}

struct worker {
    aclrtContext context;
    float scale;
    int ok;
};

/* Each thread: its own current context (set here), its own stream, 20 launches. */
static void *work(void *arg) {
    struct worker *w = arg;
    CHECK(aclrtSetCurrentContext(w->context));
    aclrtStream stream;
    CHECK(aclrtCreateStream(&stream));
    float host[N];
    for (int i = 0; i < N; i++) {
        host[i] = w->scale * (float)i;
    }
    void *x = upload(host, N), *acc = upload(host, N);
    for (int k = 0; k < 20; k++) {
        add(acc, x, acc, N, stream);
    }
    CHECK(aclrtSynchronizeStream(stream));
    CHECK(aclrtMemcpy(host, sizeof host, acc, sizeof host, ACL_MEMCPY_DEVICE_TO_HOST));
    w->ok = host[5] == 21 * w->scale * 5;
    CHECK(aclrtFree(x));
    CHECK(aclrtFree(acc));
    CHECK(aclrtDestroyStream(stream));
    return NULL;
}

static void threads(void) {
    aclrtContext context;
    CHECK(aclrtGetCurrentContext(&context));
    struct worker w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct worker){context, (float)(i + 1), 0};
        pthread_create(&t[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        EXPECT(w[i].ok, "thread %d computed its sum", i);
    }
}

/* Device memory exported on device 0, imported on device 1 (the same physical NPU) of this process. */
static void ipc(void) {
    unsigned char pattern[N];
    for (int i = 0; i < N; i++) {
        pattern[i] = (unsigned char)(i * 7);
    }
    CHECK(aclrtSetDevice(0));
    void *mine;
    CHECK(aclrtMalloc(&mine, N, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(mine, N, pattern, N, ACL_MEMCPY_HOST_TO_DEVICE));
    char key[65];
    CHECK(aclrtIpcMemGetExportKey(mine, N, key, sizeof key, ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT));
    int32_t pid = 0;
    CHECK(aclrtDeviceGetBareTgid(&pid));
    EXPECT(pid > 0, "bare tgid %d", pid);
    CHECK(aclrtIpcMemSetImportPid(key, &pid, 1));
    CHECK(aclrtSetDevice(1));
    void *theirs;
    CHECK(aclrtIpcMemImportByKey(&theirs, key, ACL_RT_IPC_MEM_IMPORT_FLAG_DEFAULT));
    unsigned char back[N];
    CHECK(aclrtMemcpy(back, N, theirs, N, ACL_MEMCPY_DEVICE_TO_HOST));
    EXPECT(memcmp(back, pattern, N) == 0, "the imported memory holds the exporter's bytes");
    CHECK(aclrtIpcMemClose(key));
    CHECK(aclrtResetDevice(1));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtFree(mine));
    CHECK(aclrtResetDevice(0));
}

int main(void) {
    CHECK(aclInit(NULL));
    errors();
    CHECK(aclrtSetDevice(0));
    aclrtContext context;
    CHECK(aclrtGetCurrentContext(&context));
    EXPECT(context != NULL, "aclrtSetDevice makes a default context current");
    contexts();
    CHECK(aclrtSetCurrentContext(context));
    aclrtStream stream;
    CHECK(aclrtCreateStreamWithConfig(&stream, 0, 0));
    events_and_copies(stream);
    callbacks(stream);
    limits(stream);
    threads();
    CHECK(aclrtDestroyStream(stream));
    ipc();
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    printf("runtime ok\n");
    return 0;
}
