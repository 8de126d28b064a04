/* A u64 -> u64 hash map (open addressing, linear probing, backward-shift deletion): the runtime's handle
 * owners and host allocations, looked up on every launch. Key 0 marks an empty slot: no handle or pointer is 0. */
#ifndef FLEXNPU_CLIB_MAP_H
#define FLEXNPU_CLIB_MAP_H

#include <stdint.h>
#include <stdlib.h>

struct fnpu_map {
    uint64_t *keys, *values;
    size_t cap, len; /* cap: a power of two */
};

static inline size_t fnpu_map_slot(const struct fnpu_map *m, uint64_t key) {
    uint64_t h = key * 0x9e3779b97f4a7c15ull;
    return (size_t)(h >> 17) & (m->cap - 1);
}

static inline uint64_t *fnpu_map_get(const struct fnpu_map *m, uint64_t key) {
    if (!m->cap || !key) {
        return NULL;
    }
    for (size_t i = fnpu_map_slot(m, key);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key) {
            return &m->values[i];
        }
        if (!m->keys[i]) {
            return NULL;
        }
    }
}

static inline int fnpu_map_put(struct fnpu_map *m, uint64_t key, uint64_t value) {
    if (2 * (m->len + 1) > m->cap) {
        struct fnpu_map bigger = {0};
        bigger.cap = m->cap ? 2 * m->cap : 64;
        bigger.keys = calloc(bigger.cap, sizeof(uint64_t));
        bigger.values = calloc(bigger.cap, sizeof(uint64_t));
        if (!bigger.keys || !bigger.values) {
            free(bigger.keys);
            free(bigger.values);
            return -1;
        }
        for (size_t i = 0; i < m->cap; i++) {
            if (m->keys[i]) {
                fnpu_map_put(&bigger, m->keys[i], m->values[i]);
            }
        }
        free(m->keys);
        free(m->values);
        *m = bigger;
    }
    size_t i = fnpu_map_slot(m, key);
    while (m->keys[i] && m->keys[i] != key) {
        i = (i + 1) & (m->cap - 1);
    }
    if (!m->keys[i]) {
        m->len++;
    }
    m->keys[i] = key;
    m->values[i] = value;
    return 0;
}

static inline int fnpu_map_del(struct fnpu_map *m, uint64_t key) {
    if (!fnpu_map_get(m, key)) {
        return 0;
    }
    size_t i = fnpu_map_slot(m, key);
    while (m->keys[i] != key) {
        i = (i + 1) & (m->cap - 1);
    }
    /* Shift later members of the probe run back, so no lookup stops early at the hole. */
    for (size_t j = (i + 1) & (m->cap - 1); m->keys[j]; j = (j + 1) & (m->cap - 1)) {
        size_t home = fnpu_map_slot(m, m->keys[j]);
        if (((j - home) & (m->cap - 1)) >= ((j - i) & (m->cap - 1))) {
            m->keys[i] = m->keys[j];
            m->values[i] = m->values[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->len--;
    return 1;
}

#endif
