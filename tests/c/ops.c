/* Single operators and graphs through the C API: attributes of every kind the wire carries, operator handles,
 * aclopCast, constant operands, an operator's error at the next synchronisation, and stream capture replayed
 * as one graph, and task groups updated after capture. */
#include <math.h>
#include <string.h>

#include "check.h"

static aclrtStream stream;

static void *device_copy(const void *host, size_t bytes) {
    void *dev;
    CHECK(aclrtMalloc(&dev, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(dev, bytes, host, bytes, ACL_MEMCPY_HOST_TO_DEVICE));
    return dev;
}

static void fetch(void *host, const void *dev, size_t bytes) {
    CHECK(aclrtSynchronizeStream(stream));
    CHECK(aclrtMemcpy(host, bytes, dev, bytes, ACL_MEMCPY_DEVICE_TO_HOST));
}

/* One input, one output: y = op(x) with `attr`. */
static void unary(const char *op, aclTensorDesc *in, void *x, aclTensorDesc *out, void *y, aclopAttr *attr) {
    aclDataBuffer *bx = aclCreateDataBuffer(x, aclGetTensorDescSize(in));
    aclDataBuffer *by = aclCreateDataBuffer(y, aclGetTensorDescSize(out));
    CHECK(aclopExecuteV2(op, 1, &in, &bx, 1, &out, &by, attr, stream));
    CHECK(aclDestroyDataBuffer(bx));
    CHECK(aclDestroyDataBuffer(by));
}

static void attributes(void) {
    /* list of ints: Transpose perm */
    float m[6] = {1, 2, 3, 4, 5, 6}, t[6];
    int64_t dims23[] = {2, 3}, dims32[] = {3, 2}, perm[] = {1, 0};
    aclTensorDesc *d23 = aclCreateTensorDesc(ACL_FLOAT, 2, dims23, ACL_FORMAT_ND);
    aclTensorDesc *d32 = aclCreateTensorDesc(ACL_FLOAT, 2, dims32, ACL_FORMAT_ND);
    void *x = device_copy(m, sizeof m), *y = device_copy(m, sizeof m);
    aclopAttr *attr = aclopCreateAttr();
    CHECK(aclopSetAttrListInt(attr, "perm", 2, perm));
    unary("Transpose", d23, x, d32, y, attr);
    fetch(t, y, sizeof t);
    EXPECT(t[1] == 4 && t[2] == 2, "transposed [%g %g %g ...]", t[0], t[1], t[2]);
    aclopDestroyAttr(attr);

    /* float: Muls value */
    attr = aclopCreateAttr();
    CHECK(aclopSetAttrFloat(attr, "value", 2.5f));
    unary("Muls", d23, x, d23, y, attr);
    fetch(t, y, sizeof t);
    EXPECT(t[5] == 15.0f, "6 * 2.5 = %g", t[5]);
    aclopDestroyAttr(attr);

    /* bool: MatMul transpose_x2, x (2x3) @ x^T (3x2) */
    int64_t dims22[] = {2, 2};
    aclTensorDesc *d22 = aclCreateTensorDesc(ACL_FLOAT, 2, dims22, ACL_FORMAT_ND);
    aclTensorDesc *ins[2] = {d23, d23};
    aclDataBuffer *bins[2] = {aclCreateDataBuffer(x, sizeof m), aclCreateDataBuffer(x, sizeof m)};
    aclDataBuffer *bout = aclCreateDataBuffer(y, 16);
    attr = aclopCreateAttr();
    CHECK(aclopSetAttrBool(attr, "transpose_x1", 0));
    CHECK(aclopSetAttrBool(attr, "transpose_x2", 1));
    CHECK(aclopExecuteV2("MatMul", 2, ins, bins, 1, &d22, &bout, attr, stream));
    fetch(t, y, 16);
    EXPECT(t[0] == 14 && t[1] == 32 && t[3] == 77, "x x^T = [%g %g; %g %g]", t[0], t[1], t[2], t[3]);
    aclopDestroyAttr(attr);

    /* string: GeluV2 approximate; a value it does not know is the operator's error, at the synchronisation */
    attr = aclopCreateAttr();
    CHECK(aclopSetAttrString(attr, "approximate", "tanh"));
    unary("GeluV2", d23, x, d23, y, attr);
    fetch(t, y, sizeof t);
    EXPECT(fabsf(t[0] - 0.8412f) < 1e-3f, "gelu(1) = %g", t[0]);
    CHECK(aclopSetAttrString(attr, "approximate", "cubic"));
    unary("GeluV2", d23, x, d23, y, attr);
    aclError late = aclrtSynchronizeStream(stream);
    const char *why = aclGetRecentErrMsg();
    EXPECT(late != ACL_SUCCESS && why && strstr(why, "approximate"), "the refused operator is reported: %d %s", late,
           why ? why : "(NULL)");
    aclopDestroyAttr(attr);

    /* operator handles: the description fixed once */
    attr = aclopCreateAttr();
    CHECK(aclopSetAttrFloat(attr, "value", -1.0f));
    aclopHandle *handle;
    const aclTensorDesc *in[1] = {d23}, *out[1] = {d23};
    CHECK(aclopCreateHandle("Muls", 1, in, 1, out, attr, &handle));
    aclopDestroyAttr(attr); /* the handle keeps its own copy */
    aclDataBuffer *hx = aclCreateDataBuffer(x, sizeof m), *hy = aclCreateDataBuffer(y, sizeof m);
    const aclDataBuffer *hin[1] = {hx};
    aclDataBuffer *hout[1] = {hy};
    CHECK(aclopExecWithHandle(handle, 1, hin, 1, hout, stream));
    fetch(t, y, sizeof t);
    EXPECT(t[2] == -3.0f, "-1 * 3 = %g", t[2]);
    aclopDestroyHandle(handle);

    /* aclopCast to float16 */
    aclTensorDesc *h23 = aclCreateTensorDesc(ACL_FLOAT16, 2, dims23, ACL_FORMAT_ND);
    aclDataBuffer *half = aclCreateDataBuffer(y, 12);
    CHECK(aclopCast(d23, hx, h23, half, 0, stream));
    aclFloat16 h[6];
    fetch(h, y, sizeof h);
    EXPECT(aclFloat16ToFloat(h[4]) == 5.0f && h[4] == aclFloatToFloat16(5.0f), "cast 5 -> %g", aclFloat16ToFloat(h[4]));

    /* a constant operand: its bytes travel once, from the descriptor */
    float ones[6] = {1, 1, 1, 1, 1, 1};
    aclTensorDesc *k = aclCreateTensorDesc(ACL_FLOAT, 2, dims23, ACL_FORMAT_ND);
    CHECK(aclSetTensorConst(k, ones, sizeof ones));
    aclTensorDesc *addin[2] = {d23, k};
    aclDataBuffer *addbuf[2] = {hx, aclCreateDataBuffer(NULL, 0)};
    CHECK(aclopExecuteV2("Add", 2, addin, addbuf, 1, &d23, &hy, NULL, stream));
    fetch(t, y, sizeof t);
    EXPECT(t[0] == 2.0f && t[5] == 7.0f, "x + 1 = [%g ... %g]", t[0], t[5]);

    aclDestroyTensorDesc(d23);
    aclDestroyTensorDesc(d32);
    aclDestroyTensorDesc(d22);
    aclDestroyTensorDesc(h23);
    aclDestroyTensorDesc(k);
    CHECK(aclrtFree(x));
    CHECK(aclrtFree(y));
}

/* y = 2 * x; x = x + y, captured once and replayed: each replay triples x. */
static void graphs(void) {
    float host[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int64_t n = 8;
    aclTensorDesc *d = aclCreateTensorDesc(ACL_FLOAT, 1, &n, ACL_FORMAT_ND);
    void *x = device_copy(host, sizeof host), *y = device_copy(host, sizeof host);
    aclDataBuffer *bx = aclCreateDataBuffer(x, sizeof host), *by = aclCreateDataBuffer(y, sizeof host);
    aclopAttr *twice = aclopCreateAttr();
    CHECK(aclopSetAttrFloat(twice, "value", 2.0f));
    CHECK(aclmdlRICaptureBegin(stream, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL));
    aclmdlRICaptureStatus status;
    CHECK(aclmdlRICaptureGetInfo(stream, &status, NULL));
    EXPECT(status == ACL_MODEL_RI_CAPTURE_STATUS_ACTIVE, "capturing");
    CHECK(aclopExecuteV2("Muls", 1, &d, &bx, 1, &d, &by, twice, stream));
    aclTensorDesc *ins[2] = {d, d};
    aclDataBuffer *bins[2] = {bx, by};
    CHECK(aclopExecuteV2("Add", 2, ins, bins, 1, &d, &bx, NULL, stream));
    aclmdlRI graph;
    CHECK(aclmdlRICaptureEnd(stream, &graph));
    CHECK(aclmdlRICaptureGetInfo(stream, &status, NULL));
    EXPECT(status == ACL_MODEL_RI_CAPTURE_STATUS_NONE, "capture over");
    fetch(host, x, sizeof host);
    EXPECT(host[1] == 2.0f, "capturing runs nothing: x[1] = %g", host[1]);
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    fetch(host, x, sizeof host);
    EXPECT(host[1] == 18.0f, "two replays triple x twice: x[1] = %g", host[1]);
    CHECK(aclmdlRIDestroy(graph));
    aclopDestroyAttr(twice);
    aclDestroyTensorDesc(d);
    CHECK(aclrtFree(x));
    CHECK(aclrtFree(y));
}

/* A captured task group replaced by an update: the same operator on other operands; a mismatched update is
 * refused at the stream's next synchronisation and changes nothing. */
static void task_groups(void) {
    float a[4] = {0, 1, 2, 3}, b[4] = {0.5f, 0.5f, 0.5f, 0.5f}, out[4];
    int64_t n = 4;
    aclTensorDesc *d = aclCreateTensorDesc(ACL_FLOAT, 1, &n, ACL_FORMAT_ND);
    void *da = device_copy(a, sizeof a), *db = device_copy(b, sizeof b), *dout = device_copy(a, sizeof a);
    aclDataBuffer *ba = aclCreateDataBuffer(da, sizeof a), *bb = aclCreateDataBuffer(db, sizeof b);
    aclDataBuffer *bout = aclCreateDataBuffer(dout, sizeof out);
    aclTensorDesc *ins[2] = {d, d};
    aclDataBuffer *a_b[2] = {ba, bb}, *a_a[2] = {ba, ba};
    CHECK(aclmdlRICaptureBegin(stream, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL));
    CHECK(aclmdlRICaptureTaskGrpBegin(stream));
    CHECK(aclopExecuteV2("Add", 2, ins, a_b, 1, &d, &bout, NULL, stream));
    aclrtTaskGrp group;
    CHECK(aclmdlRICaptureTaskGrpEnd(stream, &group));
    aclmdlRI graph;
    CHECK(aclmdlRICaptureEnd(stream, &graph));
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    fetch(out, dout, sizeof out);
    EXPECT(out[3] == 3.5f, "a + b: %g", out[3]);
    CHECK(aclmdlRICaptureTaskUpdateBegin(stream, group));
    CHECK(aclopExecuteV2("Add", 2, ins, a_a, 1, &d, &bout, NULL, stream));
    CHECK(aclmdlRICaptureTaskUpdateEnd(stream));
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    fetch(out, dout, sizeof out);
    EXPECT(out[3] == 6.0f, "updated to a + a: %g", out[3]);
    CHECK(aclmdlRICaptureTaskUpdateBegin(stream, group));
    CHECK(aclopExecuteV2("Add", 2, ins, a_b, 1, &d, &bout, NULL, stream));
    CHECK(aclopExecuteV2("Add", 2, ins, a_b, 1, &d, &bout, NULL, stream)); /* two tasks for a group of one */
    CHECK(aclmdlRICaptureTaskUpdateEnd(stream));
    EXPECT(aclrtSynchronizeStream(stream) == ACL_ERROR_INVALID_PARAM, "the refused update is reported");
    const char *why = aclGetRecentErrMsg();
    EXPECT(why && strstr(why, "same operators"), "the message says why: %s", why ? why : "(NULL)");
    CHECK(aclmdlRIExecuteAsync(graph, stream));
    fetch(out, dout, sizeof out);
    EXPECT(out[3] == 6.0f, "a refused update changes nothing: %g", out[3]);
    CHECK(aclmdlRIDestroy(graph));
    aclDestroyTensorDesc(d);
    CHECK(aclrtFree(da));
    CHECK(aclrtFree(db));
    CHECK(aclrtFree(dout));
}

int main(void) {
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&stream));
    EXPECT(aclopSetModelDir("/nonexistent-flexnpu") == ACL_ERROR_INVALID_FILE, "a missing model dir");
    const char *soc = aclrtGetSocName();
    EXPECT(soc && strncmp(soc, "Ascend", 6) == 0, "SoC name %s", soc ? soc : "(NULL)");
    attributes();
    graphs();
    task_groups();
    CHECK(aclrtDestroyStream(stream));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    printf("ops ok\n");
    return 0;
}
