/* See json.h. Recursive descent, depth-limited. */
#include "json.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

struct reader {
    const char *p, *start, *end;
    char *err;
    size_t errlen;
};

static int fail(struct reader *r, const char *what) {
    snprintf(r->err, r->errlen, "%s at byte %zu", what, (size_t)(r->p - r->start));
    return -1;
}

static void skip(struct reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) {
        r->p++;
    }
}

static int literal(struct reader *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) {
        return 0;
    }
    r->p += n;
    return 1;
}

static void put_utf8(char **out, uint32_t c) {
    char *o = *out;
    if (c < 0x80) {
        *o++ = (char)c;
    } else if (c < 0x800) {
        *o++ = (char)(0xc0 | (c >> 6));
        *o++ = (char)(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
        *o++ = (char)(0xe0 | (c >> 12));
        *o++ = (char)(0x80 | ((c >> 6) & 0x3f));
        *o++ = (char)(0x80 | (c & 0x3f));
    } else {
        *o++ = (char)(0xf0 | (c >> 18));
        *o++ = (char)(0x80 | ((c >> 12) & 0x3f));
        *o++ = (char)(0x80 | ((c >> 6) & 0x3f));
        *o++ = (char)(0x80 | (c & 0x3f));
    }
    *out = o;
}

static int hex4(struct reader *r, uint32_t *c) {
    if (r->end - r->p < 4) {
        return fail(r, "a truncated \\u escape");
    }
    *c = 0;
    for (int i = 0; i < 4; i++) {
        char h = *r->p++;
        int v = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
        if (v < 0) {
            return fail(r, "a bad \\u escape");
        }
        *c = *c << 4 | (uint32_t)v;
    }
    return 0;
}

static int string(struct reader *r, char **out) {
    r->p++; /* the opening quote */
    const char *from = r->p;
    while (r->p < r->end && *r->p != '"') {
        r->p += *r->p == '\\' ? 2 : 1;
    }
    if (r->p >= r->end) {
        return fail(r, "an unterminated string");
    }
    /* escapes only shrink (a \u escape's 6 bytes give at most 4) */
    char *s = malloc((size_t)(r->p - from) + 1), *o = s;
    if (!s) {
        return fail(r, "out of memory");
    }
    const char *end = r->p;
    r->p = from;
    while (r->p < end) {
        char c = *r->p++;
        if (c != '\\') {
            *o++ = c;
            continue;
        }
        char e = *r->p++;
        const char *plain = strchr("\"\\/bfnrt", e);
        if (plain && e) {
            *o++ = "\"\\/\b\f\n\r\t"[plain - "\"\\/bfnrt"];
        } else if (e == 'u') {
            uint32_t cp, low;
            if (hex4(r, &cp) != 0) {
                free(s);
                return -1;
            }
            if (cp >= 0xd800 && cp < 0xdc00 && end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                r->p += 2;
                if (hex4(r, &low) != 0) {
                    free(s);
                    return -1;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            }
            put_utf8(&o, cp);
        } else {
            free(s);
            return fail(r, "a bad escape");
        }
    }
    *o = 0;
    r->p = end + 1;
    *out = s;
    return 0;
}

static int value(struct reader *r, struct json *v, int depth);

static int push(struct json *v, struct json *item, char *key) {
    struct json *items = realloc(v->items, (v->count + 1) * sizeof *items);
    if (!items) {
        return -1;
    }
    v->items = items;
    if (v->type == JSON_OBJECT) {
        char **keys = realloc(v->keys, (v->count + 1) * sizeof *keys);
        if (!keys) {
            return -1;
        }
        v->keys = keys;
        keys[v->count] = key;
    }
    items[v->count++] = *item;
    return 0;
}

static int container(struct reader *r, struct json *v, int depth, char close) {
    r->p++;
    skip(r);
    if (r->p < r->end && *r->p == close) {
        r->p++;
        return 0;
    }
    for (;;) {
        char *key = NULL;
        skip(r);
        if (v->type == JSON_OBJECT) {
            if (r->p >= r->end || *r->p != '"') {
                return fail(r, "an object key is not a string");
            }
            if (string(r, &key) != 0) {
                return -1;
            }
            skip(r);
            if (r->p >= r->end || *r->p != ':') {
                free(key);
                return fail(r, "no ':' after an object key");
            }
            r->p++;
        }
        struct json item = {0};
        if (value(r, &item, depth + 1) != 0 || push(v, &item, key) != 0) {
            json_free(&item);
            free(key);
            return -1;
        }
        skip(r);
        if (r->p < r->end && *r->p == ',') {
            r->p++;
        } else if (r->p < r->end && *r->p == close) {
            r->p++;
            return 0;
        } else {
            return fail(r, "expected ',' or the end of an array or object");
        }
    }
}

static int number(struct reader *r, struct json *v) {
    const char *from = r->p;
    int integral = 1;
    while (r->p < r->end && strchr("+-0123456789.eE", *r->p)) {
        integral &= *r->p != '.' && *r->p != 'e' && *r->p != 'E';
        r->p++;
    }
    char text[64];
    size_t n = (size_t)(r->p - from);
    if (!n || n >= sizeof text) {
        return fail(r, "a malformed number");
    }
    memcpy(text, from, n);
    text[n] = 0;
    char *end;
    v->type = JSON_NUMBER;
    v->number = strtod(text, &end);
    if (*end) {
        return fail(r, "a malformed number");
    }
    if (integral) {
        errno = 0;
        v->integer = strtoll(text, &end, 10);
        v->is_int = errno == 0 && !*end;
    }
    return 0;
}

static int value(struct reader *r, struct json *v, int depth) {
    if (depth > MAX_DEPTH) {
        return fail(r, "nesting too deep");
    }
    skip(r);
    if (r->p >= r->end) {
        return fail(r, "a missing value");
    }
    switch (*r->p) {
    case '{':
        v->type = JSON_OBJECT;
        return container(r, v, depth, '}');
    case '[':
        v->type = JSON_ARRAY;
        return container(r, v, depth, ']');
    case '"':
        v->type = JSON_STRING;
        return string(r, &v->string);
    default:
        break;
    }
    if (literal(r, "true") || literal(r, "false")) {
        v->type = JSON_BOOL;
        v->boolean = r->p[-1] == 'e' && r->p[-2] == 'u';
        return 0;
    }
    if (literal(r, "null")) {
        v->type = JSON_NULL;
        return 0;
    }
    double special = literal(r, "NaN") ? NAN : literal(r, "Infinity") ? INFINITY : literal(r, "-Infinity") ? -INFINITY : 0;
    if (special != 0 || isnan(special)) {
        v->type = JSON_NUMBER;
        v->number = special;
        return 0;
    }
    return number(r, v);
}

int json_parse(const char *text, size_t len, struct json *out, char *err, size_t errlen) {
    struct reader r = {text, text, text + len, err, errlen};
    memset(out, 0, sizeof *out);
    if (value(&r, out, 0) != 0) {
        json_free(out);
        return -1;
    }
    skip(&r);
    if (r.p != r.end) {
        json_free(out);
        return fail(&r, "text after the value");
    }
    return 0;
}

void json_free(struct json *v) {
    for (size_t i = 0; i < v->count; i++) {
        json_free(&v->items[i]);
        if (v->keys) {
            free(v->keys[i]);
        }
    }
    free(v->items);
    free(v->keys);
    free(v->string);
    memset(v, 0, sizeof *v);
}

const struct json *json_get(const struct json *object, const char *key) {
    for (size_t i = 0; object->type == JSON_OBJECT && i < object->count; i++) {
        if (strcmp(object->keys[i], key) == 0) {
            return &object->items[i];
        }
    }
    return NULL;
}
