/* A converted model run as the CANN classification sample runs one (tests/programs/classify.py is its pyACL
 * twin): load, a buffer for every input and output sized from the model's description, the input copied in, the
 * batch's gear chosen where the model has gears, aclmdlExecute, and the first output's current dims copied out.
 * Arguments: MODEL.om INPUT OUTPUT [BATCH] (raw bytes; BATCH for a model with gears). */
#include <sys/stat.h>

#include "check.h"

static aclmdlDataset *buffers(aclmdlDesc *desc, size_t count, size_t (*size_of)(aclmdlDesc *, size_t)) {
    aclmdlDataset *dataset = aclmdlCreateDataset();
    for (size_t i = 0; i < count; i++) {
        void *dev;
        size_t size = size_of(desc, i);
        CHECK(aclrtMalloc(&dev, size, ACL_MEM_MALLOC_HUGE_FIRST));
        CHECK(aclmdlAddDatasetBuffer(dataset, aclCreateDataBuffer(dev, size)));
    }
    return dataset;
}

static void release(aclmdlDataset *dataset) {
    for (size_t i = 0; i < aclmdlGetDatasetNumBuffers(dataset); i++) {
        aclDataBuffer *b = aclmdlGetDatasetBuffer(dataset, i);
        CHECK(aclrtFree(aclGetDataBufferAddr(b)));
        CHECK(aclDestroyDataBuffer(b));
    }
    CHECK(aclmdlDestroyDataset(dataset));
}

int main(int argc, char **argv) {
    EXPECT(argc == 4 || argc == 5, "usage: classify MODEL.om INPUT OUTPUT [BATCH]");
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    uint32_t id;
    CHECK(aclmdlLoadFromFile(argv[1], &id));
    aclmdlDesc *desc = aclmdlCreateDesc();
    CHECK(aclmdlGetDesc(desc, id));
    aclmdlDataset *in = buffers(desc, aclmdlGetNumInputs(desc), aclmdlGetInputSizeByIndex);
    aclmdlDataset *out = buffers(desc, aclmdlGetNumOutputs(desc), aclmdlGetOutputSizeByIndex);

    struct stat st;
    EXPECT(stat(argv[2], &st) == 0 && (size_t)st.st_size <= aclmdlGetInputSizeByIndex(desc, 0), "%s fits", argv[2]);
    size_t in_size = (size_t)st.st_size;
    void *host;
    CHECK(aclrtMallocHost(&host, in_size));
    FILE *f = fopen(argv[2], "rb");
    EXPECT(f && fread(host, 1, in_size, f) == in_size, "read %s", argv[2]);
    fclose(f);
    void *dev_in = aclGetDataBufferAddr(aclmdlGetDatasetBuffer(in, 0));
    CHECK(aclrtMemcpy(dev_in, in_size, host, in_size, ACL_MEMCPY_HOST_TO_DEVICE));
    CHECK(aclrtFreeHost(host));

    aclmdlBatch gears;
    CHECK(aclmdlGetDynamicBatch(desc, &gears));
    EXPECT((gears.batchCount > 0) == (argc == 5), "BATCH is given exactly when the model has gears");
    if (gears.batchCount) {
        size_t index;
        CHECK(aclmdlGetInputIndexByName(desc, ACL_DYNAMIC_TENSOR_NAME, &index));
        CHECK(aclmdlSetDynamicBatchSize(id, in, index, (uint64_t)atoi(argv[4])));
    }
    CHECK(aclmdlExecute(id, in, out));

    aclmdlIODims dims;
    CHECK(aclmdlGetCurOutputDims(desc, 0, &dims));
    size_t used = aclDataTypeSize(aclmdlGetOutputDataType(desc, 0)); /* a gear uses the front of the buffer */
    for (size_t i = 0; i < dims.dimCount; i++) {
        used *= (size_t)dims.dims[i];
    }
    CHECK(aclrtMallocHost(&host, used));
    CHECK(aclrtMemcpy(host, used, aclGetDataBufferAddr(aclmdlGetDatasetBuffer(out, 0)), used,
                      ACL_MEMCPY_DEVICE_TO_HOST));
    f = fopen(argv[3], "wb");
    EXPECT(f && fwrite(host, 1, used, f) == used, "wrote %s", argv[3]);
    fclose(f);
    CHECK(aclrtFreeHost(host));
    release(in);
    release(out);
    CHECK(aclmdlDestroyDesc(desc));
    CHECK(aclmdlUnload(id));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    return 0;
}
