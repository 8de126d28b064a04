/* A small JSON reader for the offline model header (docs/om-format.md): what Python's json.dumps writes,
 * including NaN and Infinity (allow_nan). Values are a tree freed with json_free. */
#ifndef FLEXNPU_CLIB_JSON_H
#define FLEXNPU_CLIB_JSON_H

#include <stddef.h>
#include <stdint.h>

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json {
    enum json_type type;
    int boolean;
    int is_int; /* a number written without fraction or exponent that fits an int64 */
    int64_t integer;
    double number;
    char *string; /* NUL-terminated UTF-8 */
    size_t count; /* items of an array or object */
    struct json *items;
    char **keys; /* an object's, in order */
};

/* 0 on success; else -1 with a message naming the byte offset in `err`. */
int json_parse(const char *text, size_t len, struct json *out, char *err, size_t errlen);
void json_free(struct json *v);
const struct json *json_get(const struct json *object, const char *key);

#endif
