/* Error messages per thread (aclGetRecentErrMsg) and the CANN-style log line of a failure, as the pyACL shim
 * writes it (interposer/shim/acl/_log.py): silent unless ASCEND_SLOG_PRINT_TO_STDOUT=1, then errors (level 3)
 * go to stdout when ASCEND_GLOBAL_LOG_LEVEL (default 3) lets them. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "fnpu.h"

static __thread char message[1024];
static __thread int has_message;

static void log_error(aclError code) {
    const char *print = getenv("ASCEND_SLOG_PRINT_TO_STDOUT");
    const char *level = getenv("ASCEND_GLOBAL_LOG_LEVEL");
    if (!print || strcmp(print, "1") != 0 || (level && atoi(level) > 3)) {
        return;
    }
    struct timeval now;
    gettimeofday(&now, NULL);
    struct tm local;
    localtime_r(&now.tv_sec, &local);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%d-%H:%M:%S", &local);
    extern char *program_invocation_short_name;
    printf("[ERROR] ACL(%d,%s):%s.%06ld %s (error code %d)\n", (int)getpid(), program_invocation_short_name, stamp,
           (long)now.tv_usec, message, code);
    fflush(stdout);
}

aclError fnpu_fail(aclError code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    has_message = 1;
    log_error(code);
    return code;
}

const char *aclGetRecentErrMsg(void) { return has_message ? message : NULL; }
