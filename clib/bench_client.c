/* The C client's side of `vdevctl bench ops` and `vdevctl bench rt` (tools/bench_ops.py, tools/bench_rt.py): the
 * same measurements as their Python client, through whichever transport the environment chooses (a device file
 * under `vdevctl run`, or direct mode). Prints one JSON object.
 *   bench_client ops LAUNCHES REPLAYS   eager Add launches (float16[16]) and a 300-op captured graph's replays
 *   bench_client rt CALLS               synchronous round trips (aclrtGetMemInfo) and asynchronous records */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "acl/acl.h"

#define GRAPH_OPS 300
#define ROUNDS 25

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        aclError ret_ = (call);                                                                     \
        if (ret_ != ACL_SUCCESS) {                                                                  \
            const char *why_ = aclGetRecentErrMsg();                                                \
            fprintf(stderr, "%s failed: %d (%s)\n", #call, ret_, why_ ? why_ : "");                \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static aclrtStream stream;
static aclTensorDesc *desc[3];
static aclDataBuffer *buf[3];

static void add(void) { CHECK(aclopExecuteV2("Add", 2, desc, buf, 1, desc + 2, buf + 2, NULL, stream)); }

static void ops(int launches, int replays) {
    void *x;
    CHECK(aclrtMalloc(&x, 64, ACL_MEM_MALLOC_HUGE_FIRST));
    int64_t dims[] = {16};
    for (int i = 0; i < 3; i++) {
        desc[i] = aclCreateTensorDesc(ACL_FLOAT16, 1, dims, ACL_FORMAT_ND);
        buf[i] = aclCreateDataBuffer(x, 32);
    }
    add();
    CHECK(aclrtSynchronizeStream(stream)); /* the template is sent once, before timing */
    double issue[3], total[3];
    for (int r = 0; r < 3; r++) {
        double t = now();
        for (int i = 0; i < launches; i++) {
            add();
        }
        double issued = now();
        CHECK(aclrtSynchronizeStream(stream));
        issue[r] = (issued - t) / launches * 1e6;
        total[r] = now() - t;
    }
    CHECK(aclmdlRICaptureBegin(stream, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL));
    for (int i = 0; i < GRAPH_OPS; i++) {
        add();
    }
    aclmdlRI graph;
    CHECK(aclmdlRICaptureEnd(stream, &graph));
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    CHECK(aclrtSynchronizeStream(stream));
    double t = now();
    for (int i = 0; i < replays; i++) {
        CHECK(aclmdlRIExecuteAsync(graph, stream));
    }
    CHECK(aclrtSynchronizeStream(stream));
    double replay = (now() - t) / replays;
    double eager = median(total, 3);
    printf("{\"eager_issue_us_per_launch\": %.4f, \"eager_launches_per_s\": %.1f, \"eager_us_per_launch\": %.4f, "
           "\"graph_ops\": %d, \"graph_replay_us\": %.3f, \"graph_us_per_op\": %.4f, \"graph_ops_per_s\": %.1f}\n",
           median(issue, 3), launches / eager, eager / launches * 1e6, GRAPH_OPS, replay * 1e6,
           replay / GRAPH_OPS * 1e6, GRAPH_OPS / replay);
    CHECK(aclmdlRIDestroy(graph));
}

/* As bench_rt.py: each figure the median over rounds of the mean time per call. */
static void rt(int calls) {
    int per = calls / ROUNDS > 0 ? calls / ROUNDS : 1;
    double round_trip[ROUNDS], record[ROUNDS];
    size_t free_bytes, total;
    aclrtEvent event;
    CHECK(aclrtCreateEvent(&event));
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free_bytes, &total)); /* warm up */
    for (int r = 0; r < ROUNDS; r++) {
        double t = now();
        for (int i = 0; i < per; i++) {
            CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free_bytes, &total));
        }
        round_trip[r] = (now() - t) / per * 1e6;
        t = now();
        for (int i = 0; i < per; i++) {
            CHECK(aclrtRecordEvent(event, NULL));
        }
        record[r] = (now() - t) / per * 1e6;
        CHECK(aclrtSynchronizeDevice());
    }
    printf("{\"round_trip_us\": %.3f, \"async_encode_us_per_record\": %.4f}\n", median(round_trip, ROUNDS),
           median(record, ROUNDS));
    CHECK(aclrtDestroyEvent(event));
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "ops") && strcmp(argv[1], "rt"))) {
        fprintf(stderr, "usage: %s ops LAUNCHES REPLAYS | rt CALLS\n", argv[0]);
        return 2;
    }
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&stream));
    if (strcmp(argv[1], "ops") == 0) {
        ops(atoi(argv[2]), argc > 3 ? atoi(argv[3]) : 10);
    } else {
        rt(atoi(argv[2]));
    }
    CHECK(aclrtDestroyStream(stream));
    CHECK(aclrtResetDeviceForce(0));
    CHECK(aclFinalize());
    return 0;
}
