/* A device lost under a running program: it sets device 0 and holds memory, says "ready", waits for a line on
 * stdin, then calls again and prints what that call returned: "error CODE MESSAGE", or "intact". */
#include <string.h>

#include "check.h"

int main(void) {
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    void *held;
    CHECK(aclrtMalloc(&held, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    void *more;
    aclError ret = aclrtMalloc(&more, 4096, ACL_MEM_MALLOC_HUGE_FIRST);
    const char *why = aclGetRecentErrMsg();
    if (ret == ACL_SUCCESS) {
        printf("intact\n");
    } else {
        printf("error %d %s\n", ret, why ? why : "");
    }
    return 0;
}
