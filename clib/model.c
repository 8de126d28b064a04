/* Offline models, as interposer/shim/acl/_models.py: a FlexNPU `.om` (flexnpu-atc; read as flexnpu_client/om.py
 * reads it, docs/om-format.md) loaded onto the current device — the weight blob in one allocation, a workspace
 * for the intermediates — and executed as its nodes' operator launches on one stream: asynchronous records the
 * client sends together, no round trip per node. One model's executions never overlap (they share the
 * workspace): a lock orders them among threads, an event on the device across streams.
 *
 * The checks are om.py's, so a model that loads runs without further checks on its structure. A model with batch
 * gears (--dynamic_batch_size) has one graph per batch size and an extra last input, ACL_DYNAMIC_TENSOR_NAME, as
 * ATC's models do; aclmdlSetDynamicBatchSize picks the gear for the input dataset it is given. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "fnpu.h"
#include "json.h"

#define ALIGN 512 /* intermediates start at this alignment in the workspace (_models.py ALIGN) */
#define DYNAMIC_NAME ACL_DYNAMIC_TENSOR_NAME

struct tensor {
    char *name;
    aclTensorDesc *desc;
    size_t nbytes;
    int ndims;
    int64_t dims[FNPU_OM_MAX_DIMS];
    aclDataType dtype;
    aclFormat format;
    enum { INTERMEDIATE, INPUT, OUTPUT, WEIGHT } role;
    size_t io;     /* its index among the inputs or outputs */
    size_t offset; /* in the blob (weights) or the workspace (intermediates) */
};

struct node {
    char *op;
    int nin, nout;
    size_t *operands; /* tensor indices: inputs, then outputs */
    const aclTensorDesc **descs;
    aclopAttr *attr;
};

/* One graph of the model: a static model has one; a model with batch gears one per batch size, ascending. */
struct gear {
    int64_t batch; /* 0 for a static model */
    struct tensor *tensors;
    size_t ntensors;
    struct node *nodes;
    size_t nnodes;
    size_t *inputs, *outputs; /* tensor indices */
    size_t ninputs, noutputs;
    size_t workspace; /* bytes its intermediates need */
};

struct model {
    struct gear *gears;
    size_t ngears;
    size_t ninputs, noutputs; /* the model's own, without the dynamic-batch input */
    int dynamic;
    int current; /* the gear aclmdlSetDynamicBatchSize chose last; -1: none */
    uint64_t weights, workspace;
    uint64_t done; /* an event recorded after the last execution's launches; 0 before the first */
    pthread_mutex_t lock;
};

struct aclmdlDesc {
    uint32_t model; /* 0: empty */
};

struct aclmdlDataset {
    aclDataBuffer **buffers;
    size_t n;
    int64_t batch; /* the gear aclmdlSetDynamicBatchSize chose for it; 0: none */
};

static pthread_mutex_t registry = PTHREAD_MUTEX_INITIALIZER;
static struct model **models; /* id - 1 -> model, NULL once unloaded: ids are never reused */
static uint32_t nmodels;

/* -- reading the header ----------------------------------------------------------------------------------- */

struct reading {
    char err[512];
    char where[32]; /* "graph N", the gear being read */
};

static int bad(struct reading *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(struct reading *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof r->err, fmt, ap);
    va_end(ap);
    return -1;
}

static const struct json *field(struct reading *r, const struct json *object, const char *where, const char *name,
                                enum json_type type) {
    static const char *types[] = {"null", "bool", "number", "string", "list", "dict"};
    const struct json *v = json_get(object, name);
    if (!v) {
        bad(r, "%s: field '%s' is missing", where, name);
    } else if (v->type != type || (type == JSON_NUMBER && !v->is_int)) {
        bad(r, "%s: field '%s' should be a%s %s", where, name, type == JSON_NUMBER ? "n" : "",
            type == JSON_NUMBER ? "int" : types[type]);
        v = NULL;
    }
    return v;
}

static int known_format(int64_t f) {
#define FORMAT(code) || f == code
    return 0 FNPU_OM_FORMATS(FORMAT);
#undef FORMAT
}

static ssize_t find(const struct gear *m, const char *name) {
    for (size_t i = 0; i < m->ntensors; i++) {
        if (strcmp(m->tensors[i].name, name) == 0) {
            return (ssize_t)i;
        }
    }
    return -1;
}

static int tensor(struct reading *r, struct gear *m, const struct json *t) {
    const struct json *name, *dtype, *shape, *format;
    char where[48];
    snprintf(where, sizeof where, "%s tensor", r->where);
    if (t->type != JSON_OBJECT) {
        return bad(r, "%s: expected a JSON dict", where);
    }
    if (!(name = field(r, t, where, "name", JSON_STRING)) || !(dtype = field(r, t, where, "dtype", JSON_NUMBER)) ||
        !(shape = field(r, t, where, "shape", JSON_ARRAY)) || !(format = field(r, t, where, "format", JSON_NUMBER))) {
        return -1;
    }
    struct tensor *x = &m->tensors[m->ntensors];
    size_t size = aclDataTypeSize((aclDataType)dtype->integer);
    if (!size) {
        return bad(r, "%s tensor '%s': unknown aclDataType %lld", r->where, name->string, (long long)dtype->integer);
    }
    if (!known_format(format->integer)) {
        return bad(r, "%s tensor '%s': unknown aclFormat %lld", r->where, name->string, (long long)format->integer);
    }
    if (shape->count > FNPU_OM_MAX_DIMS) {
        return bad(r, "%s tensor '%s': more than %d dims", r->where, name->string, FNPU_OM_MAX_DIMS);
    }
    double bytes = (double)size;
    for (size_t i = 0; i < shape->count; i++) {
        const struct json *d = &shape->items[i];
        if (d->type != JSON_NUMBER || !d->is_int || d->integer < 0) {
            return bad(r, "%s tensor '%s': its shape is not a list of non-negative integers", r->where, name->string);
        }
        x->dims[i] = d->integer;
        bytes *= (double)d->integer;
    }
    if (bytes > (double)FNPU_OM_MAX_TENSOR_BYTES) {
        return bad(r, "%s tensor '%s': larger than any device (%llu bytes)", r->where, name->string,
                   (unsigned long long)FNPU_OM_MAX_TENSOR_BYTES);
    }
    if (find(m, name->string) >= 0) {
        return bad(r, "%s: tensor '%s' is listed twice", r->where, name->string);
    }
    x->name = strdup(name->string);
    x->ndims = (int)shape->count;
    x->nbytes = (size_t)bytes;
    x->dtype = (aclDataType)dtype->integer;
    x->format = (aclFormat)format->integer;
    x->desc = aclCreateTensorDesc(x->dtype, x->ndims, x->dims, x->format);
    m->ntensors++;
    return x->name && x->desc ? 0 : bad(r, "out of host memory");
}

/* A node's attribute [kind, value] in its wire encoding (wire.Attribute's value). */
static int attribute(struct reading *r, struct node *n, const char *name, const struct json *raw) {
    static const char *kinds[] = {"int", "float", "bool", "string", "list_int", "list_float", "list_bool"};
    if (raw->type != JSON_ARRAY || raw->count != 2 || raw->items[0].type != JSON_STRING) {
        return bad(r, "node %s attr '%s': expected [kind, value]", n->op, name);
    }
    int kind = -1;
    for (int k = 0; k < 7; k++) {
        kind = strcmp(raw->items[0].string, kinds[k]) == 0 ? k : kind;
    }
    if (kind < 0) {
        return bad(r, "node %s attr '%s': unknown kind '%s'", n->op, name, raw->items[0].string);
    }
    const struct json *v = &raw->items[1];
    int list = kind >= FNPU_ATTR_LIST_INT;
    int scalar = list ? kind - FNPU_ATTR_LIST_INT : kind; /* int, float, bool */
    size_t count = list ? v->count : 1;
    if ((list && (v->type != JSON_ARRAY || count > 0xffff)) || (kind == FNPU_ATTR_STRING && v->type != JSON_STRING)) {
        return bad(r, "node %s attr '%s': its value is not of kind %s", n->op, name, kinds[kind]);
    }
    struct fnpu_buf b = {0};
    if (kind == FNPU_ATTR_STRING) {
        uint16_t len = (uint16_t)strlen(v->string);
        fnpu_buf_put(&b, &len, 2);
        fnpu_buf_put(&b, v->string, len);
    } else {
        uint16_t n16 = (uint16_t)count;
        if (list) {
            fnpu_buf_put(&b, &n16, 2);
        }
        for (size_t i = 0; i < count; i++) {
            const struct json *x = list ? &v->items[i] : v;
            int ok = scalar == FNPU_ATTR_BOOL ? x->type == JSON_BOOL
                                               : x->type == JSON_NUMBER && (scalar == FNPU_ATTR_FLOAT || x->is_int);
            if (!ok) {
                free(b.data);
                return bad(r, "node %s attr '%s': its value is not of kind %s", n->op, name, kinds[kind]);
            }
            int64_t i64 = x->integer;
            double f64 = x->is_int ? (double)x->integer : x->number;
            uint8_t flag = (uint8_t)x->boolean;
            fnpu_buf_put(&b, scalar == FNPU_ATTR_INT ? (void *)&i64 : scalar == FNPU_ATTR_FLOAT ? (void *)&f64 : &flag,
                         scalar == FNPU_ATTR_BOOL ? 1 : 8);
        }
    }
    aclError ret = fnpu_attr_set(n->attr, name, (uint8_t)kind, b.data, b.len);
    free(b.data);
    return ret == ACL_SUCCESS ? 0 : bad(r, "node %s attr '%s': %s", n->op, name, aclGetRecentErrMsg());
}

static int node(struct reading *r, struct gear *m, const struct json *raw, size_t index) {
    const struct json *op, *ins, *outs, *attrs;
    char where[64];
    snprintf(where, sizeof where, "%s node %zu", r->where, index);
    if (raw->type != JSON_OBJECT) {
        return bad(r, "%s: expected a JSON dict", where);
    }
    if (!(op = field(r, raw, where, "op", JSON_STRING)) || !(ins = field(r, raw, where, "inputs", JSON_ARRAY)) ||
        !(outs = field(r, raw, where, "outputs", JSON_ARRAY)) || !(attrs = field(r, raw, where, "attrs", JSON_OBJECT))) {
        return -1;
    }
    struct node *n = &m->nodes[m->nnodes++];
    n->op = strdup(op->string);
    n->nin = (int)ins->count;
    n->nout = (int)outs->count;
    n->operands = calloc(ins->count + outs->count + 1, sizeof *n->operands);
    n->descs = calloc(ins->count + outs->count + 1, sizeof *n->descs);
    n->attr = aclopCreateAttr();
    if (!n->op || !n->operands || !n->descs || !n->attr) {
        return bad(r, "out of host memory");
    }
    for (size_t i = 0; i < ins->count + outs->count; i++) {
        const struct json *name = i < ins->count ? &ins->items[i] : &outs->items[i - ins->count];
        ssize_t t = name->type == JSON_STRING ? find(m, name->string) : -1;
        if (t < 0) {
            return bad(r, "%s (%s): an operand is not among the graph's tensors", where, n->op);
        }
        n->operands[i] = (size_t)t;
        n->descs[i] = m->tensors[t].desc;
    }
    for (size_t i = 0; i < attrs->count; i++) {
        if (attribute(r, n, attrs->keys[i], &attrs->items[i]) != 0) {
            return -1;
        }
    }
    return 0;
}

/* The model's inputs or outputs: names of graph tensors, which take that role. */
static int io(struct reading *r, struct gear *m, const struct json *names, const char *what, int role,
              size_t **out, size_t *count) {
    *out = calloc(names->count + 1, sizeof **out);
    if (!*out) {
        return bad(r, "out of host memory");
    }
    for (size_t i = 0; i < names->count; i++) {
        ssize_t t = names->items[i].type == JSON_STRING ? find(m, names->items[i].string) : -1;
        if (t < 0) {
            return bad(r, "%s: model %s %zu is not among its tensors", r->where, what, i);
        }
        m->tensors[t].role = role;
        m->tensors[t].io = i;
        (*out)[(*count)++] = (size_t)t;
    }
    return 0;
}

/* Nodes read only what exists by then, never write an input or a weight, and write every output. */
static int check_order(struct reading *r, struct gear *m) {
    char *written = calloc(m->ntensors + 1, 1);
    if (!written) {
        return bad(r, "out of host memory");
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        written[i] = m->tensors[i].role == INPUT || m->tensors[i].role == WEIGHT;
    }
    int ret = 0;
    for (size_t i = 0; i < m->nnodes && !ret; i++) {
        struct node *n = &m->nodes[i];
        for (int k = 0; k < n->nin + n->nout && !ret; k++) {
            struct tensor *t = &m->tensors[n->operands[k]];
            if (k < n->nin && !written[n->operands[k]]) {
                ret = bad(r, "%s node %zu (%s): reads '%s' before any node writes it", r->where, i, n->op, t->name);
            } else if (k >= n->nin && (t->role == INPUT || t->role == WEIGHT)) {
                ret = bad(r, "%s node %zu (%s): writes '%s', a model input or weight", r->where, i, n->op, t->name);
            }
            written[n->operands[k]] |= k >= n->nin;
        }
    }
    for (size_t i = 0; i < m->noutputs && !ret; i++) {
        if (!written[m->outputs[i]]) {
            ret = bad(r, "%s: output '%s' is written by no node", r->where, m->tensors[m->outputs[i]].name);
        }
    }
    free(written);
    return ret;
}

/* One graph: its tensors, the model's inputs and outputs among them, the weights it holds, the workspace
 * offsets of its intermediates, its nodes, their order. */
static int gear(struct reading *r, struct gear *m, const struct json *g, const struct json *inputs,
                const struct json *outputs, const struct json *weights) {
    const struct json *batch, *tensors, *nodes;
    if (g->type != JSON_OBJECT) {
        return bad(r, "%s: expected a JSON dict", r->where);
    }
    if (!(batch = field(r, g, r->where, "batch", JSON_NUMBER)) ||
        !(tensors = field(r, g, r->where, "tensors", JSON_ARRAY)) ||
        !(nodes = field(r, g, r->where, "nodes", JSON_ARRAY))) {
        return -1;
    }
    if (batch->integer < 0) {
        return bad(r, "%s: negative batch %lld", r->where, (long long)batch->integer);
    }
    m->batch = batch->integer;
    m->tensors = calloc(tensors->count + 1, sizeof *m->tensors);
    m->nodes = calloc(nodes->count + 1, sizeof *m->nodes);
    if (!m->tensors || !m->nodes) {
        return bad(r, "out of host memory");
    }
    for (size_t i = 0; i < tensors->count; i++) {
        if (tensor(r, m, &tensors->items[i]) != 0) {
            return -1;
        }
    }
    if (io(r, m, inputs, "input", INPUT, &m->inputs, &m->ninputs) != 0 ||
        io(r, m, outputs, "output", OUTPUT, &m->outputs, &m->noutputs) != 0) {
        return -1;
    }
    for (size_t i = 0; i < weights->count; i++) { /* a weight one gear computed differently is in that gear only */
        ssize_t t = find(m, weights->keys[i]);
        const struct json *span = &weights->items[i];
        size_t size = (size_t)span->items[1].integer;
        if (t >= 0 && m->tensors[t].nbytes != size) {
            return bad(r, "%s: weight '%s' has %zu bytes in the blob, its tensor needs %zu", r->where,
                       weights->keys[i], size, m->tensors[t].nbytes);
        }
        if (t >= 0) {
            m->tensors[t].role = WEIGHT;
            m->tensors[t].offset = (size_t)span->items[0].integer;
        }
    }
    for (size_t i = 0; i < m->ntensors; i++) { /* the intermediates' places in the workspace */
        if (m->tensors[i].role == INTERMEDIATE) {
            m->tensors[i].offset = m->workspace;
            m->workspace += (m->tensors[i].nbytes + ALIGN - 1) / ALIGN * ALIGN;
        }
    }
    for (size_t i = 0; i < nodes->count; i++) {
        if (node(r, m, &nodes->items[i], i) != 0) {
            return -1;
        }
    }
    return check_order(r, m);
}

static int parse(struct reading *r, struct model *m, const struct json *h, size_t blob_len, char *soc, size_t cap) {
    const struct json *s, *inputs, *outputs, *weights, *blob_bytes, *graphs;
    if (h->type != JSON_OBJECT) {
        return bad(r, "header: expected a JSON dict");
    }
    if (!(s = field(r, h, "header", "soc", JSON_STRING)) || !(inputs = field(r, h, "header", "inputs", JSON_ARRAY)) ||
        !(outputs = field(r, h, "header", "outputs", JSON_ARRAY)) ||
        !(weights = field(r, h, "header", "weights", JSON_OBJECT)) ||
        !(blob_bytes = field(r, h, "header", "blob_bytes", JSON_NUMBER)) ||
        !(graphs = field(r, h, "header", "graphs", JSON_ARRAY)) || !field(r, h, "header", "source", JSON_OBJECT)) {
        return -1;
    }
    snprintf(soc, cap, "%s", s->string);
    if ((size_t)blob_bytes->integer != blob_len) {
        return bad(r, "truncated: the weight blob has %zu bytes, the header says %lld", blob_len,
                   (long long)blob_bytes->integer);
    }
    for (size_t i = 0; i < weights->count; i++) {
        const struct json *span = &weights->items[i];
        if (span->type != JSON_ARRAY || span->count != 2 || !span->items[0].is_int || !span->items[1].is_int ||
            span->items[0].integer < 0 || span->items[1].integer < 0) {
            return bad(r, "weight '%s': expected [offset, nbytes]", weights->keys[i]);
        }
        size_t offset = (size_t)span->items[0].integer, size = (size_t)span->items[1].integer;
        if (offset > blob_len || size > blob_len - offset) {
            return bad(r, "weight '%s': bytes %zu..%zu lie outside the %zu-byte blob", weights->keys[i], offset,
                       offset + size, blob_len);
        }
    }
    if (!graphs->count) {
        return bad(r, "the model has no graph");
    }
    m->ninputs = inputs->count;
    m->noutputs = outputs->count;
    m->gears = calloc(graphs->count, sizeof *m->gears);
    if (!m->gears) {
        return bad(r, "out of host memory");
    }
    for (size_t i = 0; i < graphs->count; i++) {
        snprintf(r->where, sizeof r->where, "graph %zu", i);
        m->ngears++;
        if (gear(r, &m->gears[i], &graphs->items[i], inputs, outputs, weights) != 0) {
            return -1;
        }
        if (i && m->gears[i].batch <= m->gears[i - 1].batch) {
            return bad(r, "gears must have distinct positive batch sizes in ascending order");
        }
    }
    if (m->ngears > 1 && m->gears[0].batch == 0) {
        return bad(r, "gears must have distinct positive batch sizes in ascending order");
    }
    m->dynamic = m->ngears > 1 || m->gears[0].batch > 0;
    m->current = -1;
    for (size_t i = 0; i < m->ngears; i++) { /* one workspace, for the largest gear's intermediates */
        m->workspace = m->gears[i].workspace > m->workspace ? m->gears[i].workspace : m->workspace;
    }
    return 0;
}

static void free_model(struct model *m) {
    for (size_t g = 0; g < m->ngears; g++) {
        struct gear *x = &m->gears[g];
        for (size_t i = 0; i < x->ntensors; i++) {
            free(x->tensors[i].name);
            aclDestroyTensorDesc(x->tensors[i].desc);
        }
        for (size_t i = 0; i < x->nnodes; i++) {
            free(x->nodes[i].op);
            free(x->nodes[i].operands);
            free(x->nodes[i].descs);
            aclopDestroyAttr(x->nodes[i].attr);
        }
        free(x->tensors);
        free(x->nodes);
        free(x->inputs);
        free(x->outputs);
    }
    free(m->gears);
    free(m);
}

/* -- loading ---------------------------------------------------------------------------------------------- */

static aclError load(const uint8_t *data, size_t len, uint32_t *modelId) {
    if (!modelId) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "modelId is NULL");
    }
    size_t preamble = sizeof FNPU_OM_MAGIC - 1 + 4 + 8;
    if (len >= 4 && memcmp(data, "IMOD", 4) == 0) {
        return fnpu_fail(ACL_ERROR_PARSE_MODEL,
                         "this is a vendor .om made by CANN's ATC: such models run on real NPUs, not on the emulated "
                         "chip; convert the source model with flexnpu-atc");
    }
    if (len < preamble || memcmp(data, FNPU_OM_MAGIC, sizeof FNPU_OM_MAGIC - 1) != 0) {
        return fnpu_fail(ACL_ERROR_PARSE_MODEL, "not a FlexNPU .om (%zu bytes, no FLEXOM magic)", len);
    }
    uint32_t version;
    uint64_t header_len;
    memcpy(&version, data + 8, 4);
    memcpy(&header_len, data + 12, 8);
    if (version != FNPU_OM_VERSION) {
        return fnpu_fail(ACL_ERROR_PARSE_MODEL,
                         "format version %u is not supported (this reader knows version %d); convert the model "
                         "again with this release's flexnpu-atc",
                         version, FNPU_OM_VERSION);
    }
    if (header_len > len - preamble) {
        return fnpu_fail(ACL_ERROR_PARSE_MODEL, "truncated: the header needs %llu bytes, the file has %zu",
                         (unsigned long long)header_len, len - preamble);
    }
    struct reading r;
    memset(&r, 0, sizeof r);
    struct json header;
    if (json_parse((const char *)data + preamble, header_len, &header, r.err, sizeof r.err) != 0) {
        return fnpu_fail(ACL_ERROR_PARSE_MODEL, "the header is not valid JSON: %s", r.err);
    }
    struct model *m = calloc(1, sizeof *m);
    char soc[128];
    const uint8_t *blob = data + preamble + header_len;
    size_t blob_len = len - preamble - header_len;
    int parsed = m ? parse(&r, m, &header, blob_len, soc, sizeof soc) : bad(&r, "out of host memory");
    json_free(&header);
    if (parsed != 0) {
        if (m) {
            free_model(m);
        }
        return fnpu_fail(ACL_ERROR_PARSE_MODEL, "%s", r.err);
    }
    const char *chip = aclrtGetSocName();
    const char *want = strncmp(soc, "Ascend", 6) == 0 ? soc + 6 : soc;
    if (!chip || strcmp(chip + 6, want) != 0) {
        free_model(m);
        return fnpu_fail(ACL_ERROR_PARSE_MODEL,
                         "the model was built for %s (flexnpu-atc --soc_version), this device is %s: convert it "
                         "again with --soc_version=%s",
                         soc, chip ? chip : "(none)", chip ? chip : "");
    }
    void *weights = NULL, *workspace = NULL;
    aclError ret = aclrtMalloc(&weights, blob_len ? blob_len : 1, ACL_MEM_MALLOC_HUGE_FIRST);
    if (ret == ACL_SUCCESS) {
        ret = aclrtMalloc(&workspace, m->workspace ? m->workspace : 1, ACL_MEM_MALLOC_HUGE_FIRST);
    }
    if (ret == ACL_SUCCESS && blob_len) {
        ret = aclrtMemcpy(weights, blob_len, blob, blob_len, ACL_MEMCPY_HOST_TO_DEVICE);
    }
    pthread_mutex_lock(&registry);
    struct model **grown = ret == ACL_SUCCESS ? realloc(models, (nmodels + 1) * sizeof *grown) : NULL;
    if (ret == ACL_SUCCESS && !grown) {
        ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for another model");
    }
    if (ret == ACL_SUCCESS) {
        m->weights = (uint64_t)(uintptr_t)weights;
        m->workspace = (uint64_t)(uintptr_t)workspace;
        pthread_mutex_init(&m->lock, NULL);
        models = grown;
        models[nmodels++] = m;
        *modelId = nmodels;
    }
    pthread_mutex_unlock(&registry);
    if (ret != ACL_SUCCESS) {
        aclError why = ret;
        if (weights) {
            aclrtFree(weights);
        }
        if (workspace) {
            aclrtFree(workspace);
        }
        free_model(m);
        return why;
    }
    return ACL_SUCCESS;
}

aclError aclmdlLoadFromMem(const void *model, size_t modelSize, uint32_t *modelId) {
    if (!model || !modelSize) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlLoadFromMem: needs host data and a size > 0");
    }
    return load(model, modelSize, modelId);
}

aclError aclmdlLoadFromFile(const char *modelPath, uint32_t *modelId) {
    FILE *f = modelPath ? fopen(modelPath, "rb") : NULL;
    if (!f) {
        return fnpu_fail(ACL_ERROR_READ_MODEL_FAILURE, "%s: cannot read the model (%s)",
                         modelPath ? modelPath : "(NULL)", strerror(modelPath ? errno : EINVAL));
    }
    struct fnpu_buf b = {0};
    uint8_t chunk[1 << 16];
    size_t n;
    aclError ret = ACL_SUCCESS;
    while (ret == ACL_SUCCESS && (n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        ret = fnpu_buf_put(&b, chunk, n);
    }
    if (ret == ACL_SUCCESS && ferror(f)) {
        ret = fnpu_fail(ACL_ERROR_READ_MODEL_FAILURE, "%s: cannot read the model", modelPath);
    }
    fclose(f);
    if (ret == ACL_SUCCESS) {
        ret = load(b.data, b.len, modelId);
    }
    free(b.data);
    return ret;
}

static aclError loaded(uint32_t id, struct model **out) {
    pthread_mutex_lock(&registry);
    struct model *m = id >= 1 && id <= nmodels ? models[id - 1] : NULL;
    pthread_mutex_unlock(&registry);
    if (!m) {
        return fnpu_fail(ACL_ERROR_INVALID_MODEL_ID, "model id %u is not loaded (aclmdlLoadFromFile gives one)", id);
    }
    *out = m;
    return ACL_SUCCESS;
}

aclError aclmdlUnload(uint32_t modelId) {
    struct model *m;
    aclError ret = loaded(modelId, &m);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    pthread_mutex_lock(&registry);
    models[modelId - 1] = NULL;
    pthread_mutex_unlock(&registry);
    ret = aclrtFree((void *)(uintptr_t)m->weights);
    aclError freed = aclrtFree((void *)(uintptr_t)m->workspace);
    if (m->done) {
        aclrtDestroyEvent((aclrtEvent)(uintptr_t)m->done);
    }
    pthread_mutex_destroy(&m->lock);
    free_model(m);
    return ret != ACL_SUCCESS ? ret : freed;
}

/* -- executing -------------------------------------------------------------------------------------------- */

/* Device addresses of the model's inputs (or outputs) from the dataset, each buffer checked for size. */
static aclError bind(const struct gear *g, const aclmdlDataset *d, const char *what, const size_t *names,
                     size_t count, uint64_t *where) {
    if (!d || d->n < count) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "the %s dataset has %zu buffers; the model has %zu %ss", what,
                         d ? d->n : 0, count, what);
    }
    for (size_t i = 0; i < count; i++) {
        const struct tensor *t = &g->tensors[names[i]];
        size_t size = aclGetDataBufferSizeV2(d->buffers[i]);
        if (size < t->nbytes) {
            return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s %zu (%s): its buffer holds %zu bytes, the tensor needs %zu",
                             what, i, t->name, size, t->nbytes);
        }
        where[names[i]] = (uint64_t)(uintptr_t)aclGetDataBufferAddr(d->buffers[i]);
    }
    return ACL_SUCCESS;
}

static aclError gear_of(const struct model *m, const aclmdlDataset *input, const struct gear **out) {
    if (!m->dynamic) {
        *out = &m->gears[0];
        return ACL_SUCCESS;
    }
    for (size_t i = 0; input && i < m->ngears; i++) {
        if (m->gears[i].batch == input->batch) {
            *out = &m->gears[i];
            return ACL_SUCCESS;
        }
    }
    return fnpu_fail(ACL_ERROR_INVALID_PARAM,
                     "the model has dynamic batch sizes: choose one with aclmdlSetDynamicBatchSize first");
}

aclError aclmdlExecuteAsync(uint32_t modelId, const aclmdlDataset *input, aclmdlDataset *output, aclrtStream stream) {
    struct model *m;
    const struct gear *g = NULL;
    aclError ret = loaded(modelId, &m);
    if (ret != ACL_SUCCESS || (ret = gear_of(m, input, &g)) != ACL_SUCCESS) {
        return ret;
    }
    uint64_t *where = calloc(g->ntensors + 1, sizeof *where), *addresses = NULL;
    if (!where) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to execute a model");
    }
    for (size_t i = 0; i < g->ntensors; i++) {
        const struct tensor *t = &g->tensors[i];
        where[i] = t->role == WEIGHT ? m->weights + t->offset : t->role == INTERMEDIATE ? m->workspace + t->offset : 0;
    }
    ret = bind(g, input, "input", g->inputs, m->ninputs, where);
    if (ret == ACL_SUCCESS) {
        ret = bind(g, output, "output", g->outputs, m->noutputs, where);
    }
    pthread_mutex_lock(&m->lock);
    if (ret == ACL_SUCCESS && !m->done) {
        aclrtEvent done;
        ret = aclrtCreateEvent(&done);
        m->done = (uint64_t)(uintptr_t)done;
    } else if (ret == ACL_SUCCESS) { /* after the previous execution, whichever stream it went on */
        ret = aclrtStreamWaitEvent(stream, (aclrtEvent)(uintptr_t)m->done);
    }
    for (size_t i = 0; i < g->nnodes && ret == ACL_SUCCESS; i++) {
        const struct node *n = &g->nodes[i];
        uint64_t *grown = realloc(addresses, (size_t)(n->nin + n->nout + 1) * sizeof *grown);
        if (!grown) {
            ret = fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to execute a model");
            break;
        }
        addresses = grown;
        for (int k = 0; k < n->nin + n->nout; k++) {
            addresses[k] = where[n->operands[k]];
        }
        ret = fnpu_op_launch(n->op, n->nin, n->descs, n->nout, n->descs + n->nin, addresses, n->attr, stream);
    }
    if (ret == ACL_SUCCESS) {
        ret = aclrtRecordEvent((aclrtEvent)(uintptr_t)m->done, stream);
    }
    pthread_mutex_unlock(&m->lock);
    free(addresses);
    free(where);
    return ret;
}

aclError aclmdlExecute(uint32_t modelId, const aclmdlDataset *input, aclmdlDataset *output) {
    aclError ret = aclmdlExecuteAsync(modelId, input, output, NULL);
    return ret != ACL_SUCCESS ? ret : aclrtSynchronizeStream(NULL);
}

aclError aclmdlSetDynamicBatchSize(uint32_t modelId, aclmdlDataset *dataset, size_t index, uint64_t batchSize) {
    struct model *m;
    aclError ret = loaded(modelId, &m);
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    if (!m->dynamic) {
        return fnpu_fail(ACL_ERROR_MODEL_NOT_DYNAMIC,
                         "the model has no dynamic batch (flexnpu-atc --dynamic_batch_size makes one)");
    }
    if (index != m->ninputs) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM,
                         "index %zu is not the dynamic-batch input (%zu: aclmdlGetInputIndexByName(desc, \"%s\"))",
                         index, m->ninputs, DYNAMIC_NAME);
    }
    for (size_t i = 0; dataset && i < m->ngears; i++) {
        if ((uint64_t)m->gears[i].batch == batchSize) {
            dataset->batch = (int64_t)batchSize;
            m->current = (int)i;
            return ACL_SUCCESS;
        }
    }
    return fnpu_fail(ACL_ERROR_INVALID_PARAM, "batch size %llu is not one of the model's gears (%zu of them)",
                     (unsigned long long)batchSize, m->ngears);
}

/* -- descriptions: of the largest gear, with the dynamic-batch input last where the model has gears -------- */

aclmdlDesc *aclmdlCreateDesc(void) { return calloc(1, sizeof(aclmdlDesc)); }

aclError aclmdlDestroyDesc(aclmdlDesc *modelDesc) {
    if (!modelDesc) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlDestroyDesc: modelDesc is NULL");
    }
    free(modelDesc);
    return ACL_SUCCESS;
}

aclError aclmdlGetDesc(aclmdlDesc *modelDesc, uint32_t modelId) {
    struct model *m;
    aclError ret = modelDesc ? loaded(modelId, &m) : fnpu_fail(ACL_ERROR_INVALID_PARAM, "modelDesc is NULL");
    if (ret == ACL_SUCCESS) {
        modelDesc->model = modelId;
    }
    return ret;
}

static struct model *model_of(const aclmdlDesc *d) {
    struct model *m = NULL;
    if (!d || !d->model) {
        fnpu_fail(ACL_ERROR_INVALID_PARAM, "the model description is empty: fill it with aclmdlGetDesc");
    } else {
        loaded(d->model, &m);
    }
    return m;
}

/* The dynamic-batch input as a tensor: int64[1], ND. */
static const struct tensor dynamic_input = {
    .name = DYNAMIC_NAME, .nbytes = 8, .ndims = 1, .dims = {1}, .dtype = ACL_INT64, .format = ACL_FORMAT_ND};

/* The input or output tensor `index` of the described model (its largest gear), or the dynamic input; NULL
 * (with the message kept) when there is none. `gear`: the gear to take it from, -1 for the largest. */
static const struct tensor *described(const aclmdlDesc *d, int output, size_t index, int gear) {
    struct model *m = model_of(d);
    if (!m) {
        return NULL;
    }
    size_t count = output ? m->noutputs : m->ninputs;
    if (!output && m->dynamic && index == count) {
        return &dynamic_input;
    }
    if (index >= count) {
        fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s index %zu is out of range: the model has %zu %ss",
                  output ? "output" : "input", index, count + (!output && m->dynamic), output ? "output" : "input");
        return NULL;
    }
    const struct gear *g = &m->gears[gear < 0 ? (int)m->ngears - 1 : gear];
    return &g->tensors[(output ? g->outputs : g->inputs)[index]];
}

size_t aclmdlGetNumInputs(aclmdlDesc *modelDesc) {
    struct model *m = model_of(modelDesc);
    return m ? m->ninputs + (size_t)m->dynamic : 0;
}

size_t aclmdlGetNumOutputs(aclmdlDesc *modelDesc) {
    struct model *m = model_of(modelDesc);
    return m ? m->noutputs : 0;
}

static size_t size_of(const aclmdlDesc *d, int output, size_t index) {
    const struct tensor *t = described(d, output, index, -1);
    return t ? t->nbytes : 0;
}

size_t aclmdlGetInputSizeByIndex(aclmdlDesc *modelDesc, size_t index) { return size_of(modelDesc, 0, index); }
size_t aclmdlGetOutputSizeByIndex(aclmdlDesc *modelDesc, size_t index) { return size_of(modelDesc, 1, index); }

static aclError dims_of(const aclmdlDesc *d, int output, size_t index, int gear, int free_batch, aclmdlIODims *dims) {
    if (!dims) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "dims is NULL");
    }
    const struct tensor *t = described(d, output, index, gear);
    if (!t) {
        return ACL_ERROR_INVALID_PARAM;
    }
    snprintf(dims->name, sizeof dims->name, "%s", t->name);
    dims->dimCount = (size_t)t->ndims;
    memcpy(dims->dims, t->dims, (size_t)t->ndims * sizeof *t->dims);
    if (free_batch && t != &dynamic_input && t->ndims) {
        dims->dims[0] = -1; /* a model with gears takes any of their batch sizes */
    }
    return ACL_SUCCESS;
}

aclError aclmdlGetInputDims(const aclmdlDesc *modelDesc, size_t index, aclmdlIODims *dims) {
    struct model *m = model_of(modelDesc);
    return dims_of(modelDesc, 0, index, -1, m && m->dynamic, dims);
}

aclError aclmdlGetOutputDims(const aclmdlDesc *modelDesc, size_t index, aclmdlIODims *dims) {
    return dims_of(modelDesc, 1, index, -1, 0, dims);
}

/* After aclmdlSetDynamicBatchSize, the chosen gear's dims; else the largest gear's. */
aclError aclmdlGetCurOutputDims(const aclmdlDesc *modelDesc, size_t index, aclmdlIODims *dims) {
    struct model *m = model_of(modelDesc);
    return dims_of(modelDesc, 1, index, m ? m->current : -1, 0, dims);
}

aclError aclmdlGetInputIndexByName(const aclmdlDesc *modelDesc, const char *name, size_t *index) {
    struct model *m = model_of(modelDesc);
    if (!m || !name || !index) {
        return m ? fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlGetInputIndexByName: name or index is NULL")
                 : ACL_ERROR_INVALID_PARAM;
    }
    for (size_t i = 0; i < m->ninputs + (size_t)m->dynamic; i++) {
        if (strcmp(described(modelDesc, 0, i, -1)->name, name) == 0) {
            *index = i;
            return ACL_SUCCESS;
        }
    }
    return fnpu_fail(ACL_ERROR_INVALID_PARAM, "the model has no input '%s'", name);
}

aclError aclmdlGetDynamicBatch(const aclmdlDesc *modelDesc, aclmdlBatch *batch) {
    struct model *m = model_of(modelDesc);
    if (!m || !batch) {
        return m ? fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlGetDynamicBatch: batch is NULL") : ACL_ERROR_INVALID_PARAM;
    }
    batch->batchCount = m->dynamic ? m->ngears : 0;
    for (size_t i = 0; i < batch->batchCount && i < ACL_MAX_BATCH_NUM; i++) {
        batch->batch[i] = (uint64_t)m->gears[i].batch;
    }
    return ACL_SUCCESS;
}

const char *aclmdlGetInputNameByIndex(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 0, index, -1);
    return t ? t->name : "";
}

const char *aclmdlGetOutputNameByIndex(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 1, index, -1);
    return t ? t->name : "";
}

aclDataType aclmdlGetInputDataType(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 0, index, -1);
    return t ? t->dtype : ACL_DT_UNDEFINED;
}

aclDataType aclmdlGetOutputDataType(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 1, index, -1);
    return t ? t->dtype : ACL_DT_UNDEFINED;
}

aclFormat aclmdlGetInputFormat(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 0, index, -1);
    return t ? t->format : ACL_FORMAT_UNDEFINED;
}

aclFormat aclmdlGetOutputFormat(const aclmdlDesc *modelDesc, size_t index) {
    const struct tensor *t = described(modelDesc, 1, index, -1);
    return t ? t->format : ACL_FORMAT_UNDEFINED;
}

/* -- datasets: host-side lists of data buffers ------------------------------------------------------------ */

aclmdlDataset *aclmdlCreateDataset(void) { return calloc(1, sizeof(aclmdlDataset)); }

aclError aclmdlDestroyDataset(const aclmdlDataset *dataset) {
    if (!dataset) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlDestroyDataset: dataset is NULL");
    }
    free(dataset->buffers);
    free((void *)dataset);
    return ACL_SUCCESS;
}

aclError aclmdlAddDatasetBuffer(aclmdlDataset *dataset, aclDataBuffer *dataBuffer) {
    if (!dataset || !dataBuffer) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlAddDatasetBuffer: needs a dataset and a data buffer");
    }
    aclDataBuffer **grown = realloc(dataset->buffers, (dataset->n + 1) * sizeof *grown);
    if (!grown) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for a dataset buffer");
    }
    dataset->buffers = grown;
    dataset->buffers[dataset->n++] = dataBuffer;
    return ACL_SUCCESS;
}

size_t aclmdlGetDatasetNumBuffers(const aclmdlDataset *dataset) { return dataset ? dataset->n : 0; }

aclDataBuffer *aclmdlGetDatasetBuffer(const aclmdlDataset *dataset, size_t index) {
    return dataset && index < dataset->n ? dataset->buffers[index] : NULL;
}
