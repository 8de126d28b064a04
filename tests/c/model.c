/* An offline model (a FlexNPU .om) through the C API: load from a file and from memory, describe, run with
 * datasets, both blocking and on a stream; a file that is no model is refused with ACL_ERROR_PARSE_MODEL.
 * Arguments: MODEL.om NOT_A_MODEL. The model: y = (x + w) * 2 for x, w, y float32[4], w = 1, 2, 3, 4. */
#include <string.h>

#include "check.h"

static void run(uint32_t id, aclrtStream stream) {
    float x[4] = {10, 20, 30, 40}, y[4] = {0};
    void *dx, *dy;
    CHECK(aclrtMalloc(&dx, sizeof x, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dy, sizeof y, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(dx, sizeof x, x, sizeof x, ACL_MEMCPY_HOST_TO_DEVICE));
    aclmdlDataset *in = aclmdlCreateDataset(), *out = aclmdlCreateDataset();
    aclDataBuffer *bx = aclCreateDataBuffer(dx, sizeof x), *by = aclCreateDataBuffer(dy, sizeof y);
    CHECK(aclmdlAddDatasetBuffer(in, bx));
    CHECK(aclmdlAddDatasetBuffer(out, by));
    EXPECT(aclmdlGetDatasetNumBuffers(in) == 1 && aclmdlGetDatasetBuffer(out, 0) == by, "datasets hold the buffers");
    if (stream) {
        CHECK(aclmdlExecuteAsync(id, in, out, stream));
        CHECK(aclrtSynchronizeStream(stream));
    } else {
        CHECK(aclmdlExecute(id, in, out));
    }
    CHECK(aclrtMemcpy(y, sizeof y, dy, sizeof y, ACL_MEMCPY_DEVICE_TO_HOST));
    for (int i = 0; i < 4; i++) {
        EXPECT(y[i] == (x[i] + (float)(i + 1)) * 2, "y[%d] = %g", i, y[i]);
    }
    EXPECT(aclmdlExecute(id, out, out) == ACL_SUCCESS, "a dataset of the right sizes runs");
    aclmdlDataset *empty = aclmdlCreateDataset();
    EXPECT(aclmdlExecute(id, empty, out) == ACL_ERROR_INVALID_PARAM, "an input dataset without buffers");
    CHECK(aclmdlDestroyDataset(empty));
    CHECK(aclmdlDestroyDataset(in));
    CHECK(aclmdlDestroyDataset(out));
    CHECK(aclDestroyDataBuffer(bx));
    CHECK(aclDestroyDataBuffer(by));
    CHECK(aclrtFree(dx));
    CHECK(aclrtFree(dy));
}

int main(int argc, char **argv) {
    EXPECT(argc == 3, "usage: model MODEL.om NOT_A_MODEL");
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    uint32_t id;
    CHECK(aclmdlLoadFromFile(argv[1], &id));
    aclmdlDesc *desc = aclmdlCreateDesc();
    CHECK(aclmdlGetDesc(desc, id));
    EXPECT(aclmdlGetNumInputs(desc) == 1 && aclmdlGetNumOutputs(desc) == 1, "one input, one output");
    EXPECT(aclmdlGetInputSizeByIndex(desc, 0) == 16 && aclmdlGetOutputSizeByIndex(desc, 0) == 16, "16 bytes each");
    EXPECT(strcmp(aclmdlGetInputNameByIndex(desc, 0), "x") == 0, "input x: %s", aclmdlGetInputNameByIndex(desc, 0));
    EXPECT(aclmdlGetOutputDataType(desc, 0) == ACL_FLOAT && aclmdlGetInputFormat(desc, 0) == ACL_FORMAT_ND, "types");
    aclmdlIODims dims;
    CHECK(aclmdlGetOutputDims(desc, 0, &dims));
    EXPECT(dims.dimCount == 1 && dims.dims[0] == 4 && strcmp(dims.name, "y") == 0, "y: [4]");
    EXPECT(aclmdlGetInputDims(desc, 1, &dims) == ACL_ERROR_INVALID_PARAM, "no input 1");
    aclrtStream stream;
    CHECK(aclrtCreateStream(&stream));
    run(id, NULL);
    run(id, stream);

    FILE *f = fopen(argv[1], "rb");
    static unsigned char bytes[1 << 16];
    size_t n = fread(bytes, 1, sizeof bytes, f);
    fclose(f);
    uint32_t again;
    CHECK(aclmdlLoadFromMem(bytes, n, &again));
    EXPECT(again != id, "a second load is a second model");
    run(again, stream);
    CHECK(aclmdlUnload(again));
    EXPECT(aclmdlUnload(again) == ACL_ERROR_INVALID_MODEL_ID, "unloaded once");

    EXPECT(aclmdlLoadFromFile(argv[2], &again) == ACL_ERROR_PARSE_MODEL, "not a model");
    const char *why = aclGetRecentErrMsg();
    EXPECT(why && strstr(why, "FlexNPU .om"), "the message says so: %s", why ? why : "(NULL)");
    EXPECT(aclmdlLoadFromFile("/nonexistent.om", &again) == ACL_ERROR_READ_MODEL_FAILURE, "no such file");

    CHECK(aclmdlDestroyDesc(desc));
    CHECK(aclmdlUnload(id));
    CHECK(aclrtDestroyStream(stream));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    printf("model ok\n");
    return 0;
}
