/* The check, written against acl/acl.h only, as a CANN sample is: device memory, copies both ways, a
 * stream, and an Add through aclopExecuteV2, whose result is checked on the host. */
#include <string.h>

#include "check.h"

#define N 1024

int main(void) {
    CHECK(aclInit(NULL));
    uint32_t count = 0;
    CHECK(aclrtGetDeviceCount(&count));
    EXPECT(count >= 1, "at least one device, saw %u", count);
    CHECK(aclrtSetDevice(0));
    aclrtStream stream;
    CHECK(aclrtCreateStream(&stream));

    size_t bytes = N * sizeof(float);
    float *host_a, *host_b, *host_c;
    CHECK(aclrtMallocHost((void **)&host_a, bytes));
    CHECK(aclrtMallocHost((void **)&host_b, bytes));
    CHECK(aclrtMallocHost((void **)&host_c, bytes));
    for (int i = 0; i < N; i++) {
        host_a[i] = (float)i;
        host_b[i] = 0.5f * (float)i;
    }
    void *a, *b, *c;
    CHECK(aclrtMalloc(&a, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&b, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&c, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(a, bytes, host_a, bytes, ACL_MEMCPY_HOST_TO_DEVICE));
    CHECK(aclrtMemcpyAsync(b, bytes, host_b, bytes, ACL_MEMCPY_HOST_TO_DEVICE, stream));

    int64_t dims[] = {N};
    aclTensorDesc *desc[3];
    aclDataBuffer *buf[3];
    void *dev[3] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        desc[i] = aclCreateTensorDesc(ACL_FLOAT, 1, dims, ACL_FORMAT_ND);
        buf[i] = aclCreateDataBuffer(dev[i], bytes);
    }
    EXPECT(aclGetTensorDescSize(desc[0]) == bytes, "descriptor size %zu", aclGetTensorDescSize(desc[0]));
    CHECK(aclopExecuteV2("Add", 2, desc, buf, 1, desc + 2, buf + 2, NULL, stream));
    CHECK(aclrtSynchronizeStream(stream));
    CHECK(aclrtMemcpy(host_c, bytes, c, bytes, ACL_MEMCPY_DEVICE_TO_HOST));
    for (int i = 0; i < N; i++) {
        EXPECT(host_c[i] == 1.5f * (float)i, "c[%d] = %g", i, host_c[i]);
    }

    for (int i = 0; i < 3; i++) {
        CHECK(aclDestroyDataBuffer(buf[i]));
        aclDestroyTensorDesc(desc[i]);
        CHECK(aclrtFree(dev[i]));
    }
    CHECK(aclrtFreeHost(host_a));
    CHECK(aclrtFreeHost(host_b));
    CHECK(aclrtFreeHost(host_c));
    CHECK(aclrtDestroyStream(stream));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    printf("add ok\n");
    return 0;
}
