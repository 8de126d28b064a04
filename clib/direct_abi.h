/* The functions libflexnpu_direct.so (direct_plugin.c) exports to libascendcl.so (transport_direct.c), which
 * loads it only in direct mode: the C library itself never links Python. Each returns an aclError and leaves
 * a message in `err` on failure. */
#ifndef FLEXNPU_CLIB_DIRECT_ABI_H
#define FLEXNPU_CLIB_DIRECT_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define FNPU_DIRECT_ERR 1024

/* Start (or join) the interpreter `python` names (a venv's bin/python, so its site-packages are found) and
 * build the topology of `config` (NULL: the built-in one). */
typedef int (*fnpu_direct_init_fn)(const char *python, const char *config, char *err);
/* The virtual NPUs' names, comma-separated. */
typedef int (*fnpu_direct_names_fn)(char *out, size_t cap, char *err);
/* A session's translator for virtual NPU `name`. */
typedef int (*fnpu_direct_open_fn)(const char *name, void **transport, char *err);
/* One frame in; the reply frame's body out (empty for asynchronous frames), valid until the next call. */
typedef int (*fnpu_direct_call_fn)(void *transport, const struct iovec *iov, int n, const uint8_t **body,
                                   size_t *len, char *err);
typedef void (*fnpu_direct_close_fn)(void *transport);

#endif
