/* Direct mode (FLEXNPU_DIRECT=1): the same frames go to FlexNPU's translator in this process, through an
 * embedded Python (libflexnpu_direct.so beside this library, loaded only here), as direct.py does for the
 * Python client: the passthrough baseline C clients' overhead is measured against. FLEXNPU_PYTHON names the
 * interpreter whose packages hold FlexNPU (`vdevctl run --direct` sets it); FLEXNPU_CONFIG the topology. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "direct_abi.h"
#include "fnpu.h"

static struct {
    pthread_once_t once;
    aclError status;
    char message[FNPU_DIRECT_ERR];
    fnpu_direct_names_fn names;
    fnpu_direct_open_fn open;
    fnpu_direct_call_fn call;
    fnpu_direct_close_fn close;
} plugin = {.once = PTHREAD_ONCE_INIT};

struct direct_transport {
    struct fnpu_transport base;
    void *translator;
};

static void load(void) {
    Dl_info self;
    char path[4096];
    const char *given = getenv("FLEXNPU_DIRECT_LIB");
    if (given && *given) {
        snprintf(path, sizeof path, "%s", given);
    } else if (dladdr((void *)load, &self) && self.dli_fname) {
        char here[4096];
        snprintf(here, sizeof here, "%s", self.dli_fname);
        snprintf(path, sizeof path, "%s/libflexnpu_direct.so", dirname(here));
    }
    /* RTLD_GLOBAL: Python's extension modules find libpython's symbols in the global scope. */
    void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        plugin.status = ACL_ERROR_RT_NO_DEVICE;
        snprintf(plugin.message, sizeof plugin.message,
                 "direct mode (FLEXNPU_DIRECT=1) needs %s, built with the library from a Python with shared "
                 "libpython (make -C clib): %s; unset FLEXNPU_DIRECT to use a daemon's device files",
                 path, dlerror());
        return;
    }
    fnpu_direct_init_fn init = (fnpu_direct_init_fn)dlsym(lib, "fnpu_direct_init");
    plugin.names = (fnpu_direct_names_fn)dlsym(lib, "fnpu_direct_names");
    plugin.open = (fnpu_direct_open_fn)dlsym(lib, "fnpu_direct_open");
    plugin.call = (fnpu_direct_call_fn)dlsym(lib, "fnpu_direct_call");
    plugin.close = (fnpu_direct_close_fn)dlsym(lib, "fnpu_direct_close");
    if (!init || !plugin.names || !plugin.open || !plugin.call || !plugin.close) {
        plugin.status = ACL_ERROR_RT_NO_DEVICE;
        snprintf(plugin.message, sizeof plugin.message, "%s: not a FlexNPU direct-mode plugin of this release", path);
        return;
    }
    plugin.status = (aclError)init(getenv("FLEXNPU_PYTHON"), getenv("FLEXNPU_CONFIG"), plugin.message);
}

static aclError loaded(void) {
    pthread_once(&plugin.once, load);
    return plugin.status ? fnpu_fail(plugin.status, "%s", plugin.message) : ACL_SUCCESS;
}

aclError fnpu_direct_names(char ***names, int *count) {
    aclError ret = loaded();
    char err[FNPU_DIRECT_ERR], list[8192];
    if (ret == ACL_SUCCESS && (ret = (aclError)plugin.names(list, sizeof list, err)) != ACL_SUCCESS) {
        return fnpu_fail(ret, "%s", err);
    }
    char *save = NULL;
    for (char *name = strtok_r(list, ",", &save); ret == ACL_SUCCESS && name; name = strtok_r(NULL, ",", &save)) {
        char **grown = realloc(*names, (*count + 1) * sizeof **names);
        if (!grown) {
            return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for the device list");
        }
        *names = grown;
        (*names)[(*count)++] = strdup(name);
    }
    return ret;
}

static aclError direct_call(struct fnpu_transport *base, const struct iovec *iov, int n, const uint8_t **body,
                            size_t *len) {
    struct direct_transport *t = (struct direct_transport *)base;
    char err[FNPU_DIRECT_ERR];
    aclError ret = (aclError)plugin.call(t->translator, iov, n, body, len, err);
    return ret == ACL_SUCCESS ? ret : fnpu_fail(ret, "%s: %s", t->base.name, err);
}

static aclError direct_send(struct fnpu_transport *base, const struct iovec *iov, int n) {
    const uint8_t *body;
    size_t len;
    return direct_call(base, iov, n, &body, &len);
}

static void direct_close(struct fnpu_transport *base) {
    struct direct_transport *t = (struct direct_transport *)base;
    plugin.close(t->translator);
    free(t);
}

aclError fnpu_direct_open(const char *name, struct fnpu_transport **out) {
    aclError ret = loaded();
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    struct direct_transport *t = calloc(1, sizeof *t);
    if (!t) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a transport");
    }
    char err[FNPU_DIRECT_ERR];
    ret = (aclError)plugin.open(name, &t->translator, err);
    if (ret != ACL_SUCCESS) {
        free(t);
        return fnpu_fail(ret, "%s", err);
    }
    t->base.send = direct_send;
    t->base.call = direct_call;
    t->base.close = direct_close;
    snprintf(t->base.name, sizeof t->base.name, "%s (direct)", name);
    *out = &t->base;
    return ACL_SUCCESS;
}
