/* What every test program shares: a failed call ends the program, naming the call, its code and the library's
 * message (aclGetRecentErrMsg). */
#ifndef FLEXNPU_TESTS_C_CHECK_H
#define FLEXNPU_TESTS_C_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "acl/acl.h"

#define CHECK(call)                                                                                      \
    do {                                                                                                 \
        aclError check_ret_ = (call);                                                                    \
        if (check_ret_ != ACL_SUCCESS) {                                                                 \
            const char *check_msg_ = aclGetRecentErrMsg();                                               \
            fprintf(stderr, "%s:%d: %s failed: %d (%s)\n", __FILE__, __LINE__, #call, check_ret_,        \
                    check_msg_ ? check_msg_ : "no message");                                             \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

#define EXPECT(cond, ...)                                                                                \
    do {                                                                                                 \
        if (!(cond)) {                                                                                   \
            fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond);                          \
            fprintf(stderr, __VA_ARGS__);                                                                \
            fprintf(stderr, "\n");                                                                       \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

#endif
