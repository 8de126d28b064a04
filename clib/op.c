/* Single operators, as interposer/shim/acl/op.py and _tensors.py: tensor descriptors, data buffers and attributes
 * are host-side objects; a launch encodes the operator's description (wire.OpDescription) once per session and
 * then sends its template id and operand addresses (session.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fnpu.h"

struct aclTensorDesc {
    aclDataType dtype;
    aclFormat format;
    int ndims;
    int64_t *dims;
    uint8_t *constant; /* aclSetTensorConst: the operand's bytes, uploaded when an operator runs */
    size_t constant_len;
};

struct aclDataBuffer {
    void *data;
    size_t size;
};

struct attr {
    char *name;
    uint8_t kind;
    uint8_t *value; /* the value as the wire encodes it (wire.Attribute) */
    size_t len;
};

struct aclopAttr {
    struct attr *items;
    size_t n;
};

struct aclopHandle {
    char *op_type;
    int ninputs, noutputs;
    aclTensorDesc *descs; /* inputs then outputs, copied */
    const aclTensorDesc **order; /* pointers to them, as launch() takes them */
    aclopAttr attr;
};

/* -- data types ------------------------------------------------------------------------------------------- */

size_t aclDataTypeSize(aclDataType dataType) {
    switch ((int)dataType) {
#define SIZE(code, bytes) \
    case code:            \
        return bytes;
        FNPU_DTYPE_SIZES(SIZE)
#undef SIZE
    default:
        return 0;
    }
}

/* IEEE 754 half precision, round to nearest even. */
aclFloat16 aclFloatToFloat16(float value) {
    uint32_t x;
    memcpy(&x, &value, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
    if (exp == 0xff) {
        return (aclFloat16)(sign | 0x7c00 | (man ? 0x200 : 0));
    }
    int e = (int)exp - 127 + 15;
    if (e >= 31) {
        return (aclFloat16)(sign | 0x7c00);
    }
    if (e <= 0) {
        if (e < -10) {
            return (aclFloat16)sign;
        }
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        half += rest > mid || (rest == mid && (half & 1));
        return (aclFloat16)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rest = man & 0x1fff;
    half += rest > 0x1000 || (rest == 0x1000 && (half & 1));
    return (aclFloat16)(sign | half);
}

float aclFloat16ToFloat(aclFloat16 value) {
    uint32_t sign = (uint32_t)(value & 0x8000) << 16, exp = (value >> 10) & 0x1f, man = value & 0x3ff;
    float magnitude = exp == 0    ? ldexpf((float)man, -24)
                      : exp == 31 ? (man ? NAN : INFINITY)
                                  : ldexpf((float)(man | 0x400), (int)exp - 25);
    uint32_t x;
    memcpy(&x, &magnitude, 4);
    x |= sign;
    memcpy(&magnitude, &x, 4);
    return magnitude;
}

/* -- data buffers ----------------------------------------------------------------------------------------- */

aclDataBuffer *aclCreateDataBuffer(void *data, size_t size) {
    aclDataBuffer *b = malloc(sizeof *b);
    if (b) {
        *b = (aclDataBuffer){data, size};
    }
    return b;
}

aclError aclDestroyDataBuffer(const aclDataBuffer *dataBuffer) {
    if (!dataBuffer) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclDestroyDataBuffer: dataBuffer is NULL");
    }
    free((void *)dataBuffer);
    return ACL_SUCCESS;
}

aclError aclUpdateDataBuffer(aclDataBuffer *dataBuffer, void *data, size_t size) {
    if (!dataBuffer) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclUpdateDataBuffer: dataBuffer is NULL");
    }
    *dataBuffer = (aclDataBuffer){data, size};
    return ACL_SUCCESS;
}

void *aclGetDataBufferAddr(const aclDataBuffer *dataBuffer) { return dataBuffer ? dataBuffer->data : NULL; }
size_t aclGetDataBufferSizeV2(const aclDataBuffer *dataBuffer) { return dataBuffer ? dataBuffer->size : 0; }
uint32_t aclGetDataBufferSize(const aclDataBuffer *dataBuffer) { return (uint32_t)aclGetDataBufferSizeV2(dataBuffer); }

/* -- tensor descriptors ----------------------------------------------------------------------------------- */

static int copy_desc(aclTensorDesc *to, const aclTensorDesc *from) {
    *to = *from;
    to->dims = malloc((from->ndims ? from->ndims : 1) * sizeof(int64_t));
    to->constant = from->constant_len ? malloc(from->constant_len) : NULL;
    if (!to->dims || (from->constant_len && !to->constant)) {
        free(to->dims);
        free(to->constant);
        return -1;
    }
    memcpy(to->dims, from->dims, from->ndims * sizeof(int64_t));
    if (from->constant_len) {
        memcpy(to->constant, from->constant, from->constant_len);
    }
    return 0;
}

aclTensorDesc *aclCreateTensorDesc(aclDataType dataType, int numDims, const int64_t *dims, aclFormat format) {
    if (numDims < 0 || (numDims > 0 && !dims)) {
        fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclCreateTensorDesc: %d dims at %p", numDims, (const void *)dims);
        return NULL;
    }
    aclTensorDesc *d = malloc(sizeof *d);
    aclTensorDesc given = {dataType, format, numDims, (int64_t *)dims, NULL, 0};
    if (d && copy_desc(d, &given) != 0) {
        free(d);
        d = NULL;
    }
    return d;
}

static void free_desc(const aclTensorDesc *desc) {
    free(desc->dims);
    free(desc->constant);
}

void aclDestroyTensorDesc(const aclTensorDesc *desc) {
    if (desc) {
        free_desc(desc);
        free((void *)desc);
    }
}

aclDataType aclGetTensorDescType(const aclTensorDesc *desc) { return desc ? desc->dtype : ACL_DT_UNDEFINED; }
aclFormat aclGetTensorDescFormat(const aclTensorDesc *desc) { return desc ? desc->format : ACL_FORMAT_UNDEFINED; }
size_t aclGetTensorDescNumDims(const aclTensorDesc *desc) { return desc ? (size_t)desc->ndims : 0; }

size_t aclGetTensorDescElementCount(const aclTensorDesc *desc) {
    if (!desc) {
        return 0;
    }
    size_t n = 1;
    for (int i = 0; i < desc->ndims; i++) {
        n *= desc->dims[i] > 0 ? (size_t)desc->dims[i] : 0;
    }
    return n;
}

size_t aclGetTensorDescSize(const aclTensorDesc *desc) {
    return desc ? aclGetTensorDescElementCount(desc) * aclDataTypeSize(desc->dtype) : 0;
}

aclError aclGetTensorDescDimV2(const aclTensorDesc *desc, size_t index, int64_t *dimSize) {
    if (!desc || !dimSize || index >= (size_t)desc->ndims) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclGetTensorDescDimV2: no dimension %zu", index);
    }
    *dimSize = desc->dims[index];
    return ACL_SUCCESS;
}

int64_t aclGetTensorDescDim(const aclTensorDesc *desc, size_t index) {
    int64_t dim = -1;
    aclGetTensorDescDimV2(desc, index, &dim);
    return dim;
}

aclError aclSetTensorConst(aclTensorDesc *desc, void *dataBuffer, size_t length) {
    if (!desc || !dataBuffer || !length) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclSetTensorConst: needs a descriptor, host data and a length > 0");
    }
    uint8_t *copy = malloc(length);
    if (!copy) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "aclSetTensorConst: no host memory for %zu bytes", length);
    }
    memcpy(copy, dataBuffer, length);
    free(desc->constant);
    desc->constant = copy;
    desc->constant_len = length;
    return ACL_SUCCESS;
}

/* -- attributes ------------------------------------------------------------------------------------------- */

aclopAttr *aclopCreateAttr(void) { return calloc(1, sizeof(aclopAttr)); }

static void clear_attr(const aclopAttr *attr) {
    for (size_t i = 0; i < attr->n; i++) {
        free(attr->items[i].name);
        free(attr->items[i].value);
    }
    free(attr->items);
}

void aclopDestroyAttr(const aclopAttr *attr) {
    if (attr) {
        clear_attr(attr);
        free((void *)attr);
    }
}

/* Set `name` (replacing its value in place, as a Python dict keeps its order). */
static aclError set_attr(aclopAttr *attr, const char *name, uint8_t kind, const struct fnpu_buf *value) {
    if (!attr || !name || !*name || strlen(name) > 255) {
        free(value->data);
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopSetAttr: needs an attr from aclopCreateAttr and a name of "
                         "1-255 bytes");
    }
    for (size_t i = 0; i < attr->n; i++) {
        if (strcmp(attr->items[i].name, name) == 0) {
            free(attr->items[i].value);
            attr->items[i].kind = kind;
            attr->items[i].value = value->data;
            attr->items[i].len = value->len;
            return ACL_SUCCESS;
        }
    }
    struct attr *grown = realloc(attr->items, (attr->n + 1) * sizeof *grown);
    char *copy = strdup(name);
    if (!grown || !copy) {
        free(copy);
        free(value->data);
        if (grown) {
            attr->items = grown;
        }
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for attribute %s", name);
    }
    attr->items = grown;
    attr->items[attr->n++] = (struct attr){copy, kind, value->data, value->len};
    return ACL_SUCCESS;
}

aclError fnpu_attr_set(aclopAttr *attr, const char *name, uint8_t kind, const void *value, size_t len) {
    struct fnpu_buf b = {0};
    if (fnpu_buf_put(&b, value, len) != ACL_SUCCESS) {
        return ACL_ERROR_BAD_ALLOC;
    }
    return set_attr(attr, name, kind, &b);
}

static aclError set_list(aclopAttr *attr, const char *name, uint8_t kind, int n, const void *values, size_t width,
                         void (*put)(uint8_t *to, const void *from)) {
    if (n < 0 || n > 0xffff || (n && !values)) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopSetAttrList %s: %d values at %p", name ? name : "", n, values);
    }
    struct fnpu_buf b = {0};
    uint16_t count = (uint16_t)n;
    if (fnpu_buf_reserve(&b, 2 + (size_t)n * 8) != ACL_SUCCESS) {
        return ACL_ERROR_BAD_ALLOC;
    }
    fnpu_buf_put(&b, &count, 2);
    for (int i = 0; i < n; i++) {
        put(b.data + b.len, (const uint8_t *)values + (size_t)i * width);
        b.len += kind == FNPU_ATTR_LIST_BOOL ? 1 : 8;
    }
    return set_attr(attr, name, kind, &b);
}

static void put_int(uint8_t *to, const void *from) { memcpy(to, from, 8); }
static void put_bool(uint8_t *to, const void *from) { *to = *(const uint8_t *)from != 0; }
static void put_float(uint8_t *to, const void *from) {
    double d = *(const float *)from;
    memcpy(to, &d, 8);
}

aclError aclopSetAttrBool(aclopAttr *attr, const char *attrName, uint8_t attrValue) {
    uint8_t v = attrValue != 0;
    return fnpu_attr_set(attr, attrName, FNPU_ATTR_BOOL, &v, 1);
}

aclError aclopSetAttrInt(aclopAttr *attr, const char *attrName, int64_t attrValue) {
    return fnpu_attr_set(attr, attrName, FNPU_ATTR_INT, &attrValue, 8);
}

aclError aclopSetAttrFloat(aclopAttr *attr, const char *attrName, float attrValue) {
    double v = attrValue;
    return fnpu_attr_set(attr, attrName, FNPU_ATTR_FLOAT, &v, 8);
}

aclError aclopSetAttrString(aclopAttr *attr, const char *attrName, const char *attrValue) {
    size_t n = attrValue ? strlen(attrValue) : 0;
    if (!attrValue || n > 0xffff) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopSetAttrString %s: needs a string of at most 65535 bytes",
                         attrName ? attrName : "");
    }
    struct fnpu_buf b = {0};
    uint16_t len = (uint16_t)n;
    if (fnpu_buf_put(&b, &len, 2) != ACL_SUCCESS || fnpu_buf_put(&b, attrValue, n) != ACL_SUCCESS) {
        free(b.data);
        return ACL_ERROR_BAD_ALLOC;
    }
    return set_attr(attr, attrName, FNPU_ATTR_STRING, &b);
}

aclError aclopSetAttrListBool(aclopAttr *attr, const char *attrName, int numValues, const uint8_t *values) {
    return set_list(attr, attrName, FNPU_ATTR_LIST_BOOL, numValues, values, 1, put_bool);
}

aclError aclopSetAttrListInt(aclopAttr *attr, const char *attrName, int numValues, const int64_t *values) {
    return set_list(attr, attrName, FNPU_ATTR_LIST_INT, numValues, values, 8, put_int);
}

aclError aclopSetAttrListFloat(aclopAttr *attr, const char *attrName, int numValues, const float *values) {
    return set_list(attr, attrName, FNPU_ATTR_LIST_FLOAT, numValues, values, 4, put_float);
}

/* Operators are built into the emulated device, so nothing is read from the directory; but as CANN, which loads
 * the *.om files under it, a directory that is not there is an error. */
aclError aclopSetModelDir(const char *modelDir) {
    struct stat st;
    if (!modelDir || stat(modelDir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        return fnpu_fail(ACL_ERROR_INVALID_FILE,
                         "aclopSetModelDir: '%s' is not a directory (it should hold the single-operator *.om models)",
                         modelDir ? modelDir : "(NULL)");
    }
    return ACL_SUCCESS;
}

/* -- launching -------------------------------------------------------------------------------------------- */

static void put_tensor(struct fnpu_buf *b, const aclTensorDesc *d) {
    int32_t head[2] = {(int32_t)d->dtype, (int32_t)d->format};
    uint8_t n = (uint8_t)d->ndims;
    fnpu_buf_put(b, head, sizeof head);
    fnpu_buf_put(b, &n, 1);
    fnpu_buf_put(b, d->dims, (size_t)d->ndims * 8);
}

/* wire.OpDescription: op type, inputs, outputs (dtype, format, dims), attributes. */
static aclError describe(struct fnpu_buf *b, const char *op_type, int nin, const aclTensorDesc *const ins[],
                         int nout, const aclTensorDesc *const outs[], const aclopAttr *attr) {
    size_t type_len = op_type ? strlen(op_type) : 0;
    if (!op_type || !type_len || type_len > 255) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "an operator type of 1-255 bytes is needed, got '%s'",
                         op_type ? op_type : "(NULL)");
    }
    b->len = 0;
    uint8_t n8 = (uint8_t)type_len;
    fnpu_buf_put(b, &n8, 1);
    fnpu_buf_put(b, op_type, type_len);
    const aclTensorDesc *const *sides[2] = {ins, outs};
    int counts[2] = {nin, nout};
    for (int side = 0; side < 2; side++) {
        uint16_t n16 = (uint16_t)counts[side];
        fnpu_buf_put(b, &n16, 2);
        for (int i = 0; i < counts[side]; i++) {
            const aclTensorDesc *d = sides[side][i];
            if (!d || d->ndims > 255) {
                return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: %s %d: not a tensor descriptor (of at most 255 dims)",
                                 op_type, side ? "output" : "input", i);
            }
            put_tensor(b, d);
        }
    }
    uint16_t nattrs = attr ? (uint16_t)attr->n : 0;
    fnpu_buf_put(b, &nattrs, 2);
    for (size_t i = 0; i < nattrs; i++) {
        const struct attr *a = &attr->items[i];
        uint8_t name_len = (uint8_t)strlen(a->name);
        fnpu_buf_put(b, &name_len, 1);
        fnpu_buf_put(b, a->name, name_len);
        fnpu_buf_put(b, &a->kind, 1);
        fnpu_buf_put(b, a->value, a->len);
    }
    return b->data ? ACL_SUCCESS : fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for an operator description");
}

static aclError operand(const aclTensorDesc *d, const aclDataBuffer *b, const char *what, int i, uint64_t *ptr) {
    if (!b) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s %d: not a data buffer from aclCreateDataBuffer", what, i);
    }
    if (d->constant_len) {
        return fnpu_constant(d->constant, d->constant_len, ptr);
    }
    *ptr = (uint64_t)(uintptr_t)b->data;
    return ACL_SUCCESS;
}

/* A launch's description and addresses are built in buffers of its thread, reused: freed when the thread ends. */
struct scratch {
    struct fnpu_buf desc;
    uint64_t *addresses;
    size_t capacity;
};

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p) {
    struct scratch *s = p;
    free(s->desc.data);
    free(s->addresses);
    free(s);
}

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static struct scratch *thread_scratch(void) {
    pthread_once(&scratch_once, make_scratch_key);
    struct scratch *s = pthread_getspecific(scratch_key);
    if (!s && (s = calloc(1, sizeof *s))) {
        pthread_setspecific(scratch_key, s);
    }
    return s;
}

/* A launch with its operands' device addresses resolved: inputs then outputs. */
aclError fnpu_op_launch(const char *op_type, int nin, const aclTensorDesc *const ins[], int nout,
                        const aclTensorDesc *const outs[], const uint64_t *addresses, const aclopAttr *attr,
                        aclrtStream stream) {
    struct scratch *scratch = thread_scratch();
    if (!scratch) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to launch an operator");
    }
    aclError ret = describe(&scratch->desc, op_type, nin, ins, nout, outs, attr);
    struct fnpu_session *s;
    uint64_t handle = (uint64_t)(uintptr_t)stream;
    if (ret == ACL_SUCCESS) {
        ret = fnpu_session_of(handle, &s);
    }
    if (ret != ACL_SUCCESS) {
        return ret;
    }
    fnpu_hold(handle, 0);
    struct fnpu_op_launch_req req = {handle, 0, (uint32_t)(nin + nout), fnpu_thread_limits()};
    return fnpu_launch(s, scratch->desc.data, scratch->desc.len, &req, addresses);
}

static aclError launch(const char *op_type, int nin, const aclTensorDesc *const ins[],
                       const aclDataBuffer *const inputs[], int nout, const aclTensorDesc *const outs[],
                       const aclDataBuffer *const outputs[], const aclopAttr *attr, aclrtStream stream) {
    struct scratch *scratch = thread_scratch();
    if (!scratch) {
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory to launch an operator");
    }
    if (nin < 0 || nout < 0 || nin > 0xffff || nout > 0xffff || (nin && (!ins || !inputs)) ||
        (nout && (!outs || !outputs))) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: %d inputs and %d outputs, with their descriptors and buffers",
                         op_type ? op_type : "(NULL)", nin, nout);
    }
    size_t count = (size_t)nin + (size_t)nout;
    if (count > scratch->capacity) {
        uint64_t *grown = realloc(scratch->addresses, count * sizeof *grown);
        if (!grown) {
            return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for %zu operand addresses", count);
        }
        scratch->addresses = grown;
        scratch->capacity = count;
    }
    uint64_t *addresses = scratch->addresses;
    aclError ret = ACL_SUCCESS;
    for (int i = 0; i < nin && ret == ACL_SUCCESS; i++) {
        ret = ins[i] ? operand(ins[i], inputs[i], "input", i, &addresses[i])
                     : fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: input %d has no descriptor", op_type, i);
    }
    for (int i = 0; i < nout && ret == ACL_SUCCESS; i++) {
        ret = outs[i] ? operand(outs[i], outputs[i], "output", i, &addresses[nin + i])
                      : fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: output %d has no descriptor", op_type, i);
    }
    return ret != ACL_SUCCESS ? ret : fnpu_op_launch(op_type, nin, ins, nout, outs, addresses, attr, stream);
}

aclError aclopExecuteV2(const char *opType, int numInputs, aclTensorDesc *inputDesc[], aclDataBuffer *inputs[],
                        int numOutputs, aclTensorDesc *outputDesc[], aclDataBuffer *outputs[], aclopAttr *attr,
                        aclrtStream stream) {
    return launch(opType, numInputs, (const aclTensorDesc *const *)inputDesc, (const aclDataBuffer *const *)inputs,
                  numOutputs, (const aclTensorDesc *const *)outputDesc, (const aclDataBuffer *const *)outputs, attr,
                  stream);
}

/* aclopCreateHandle: the operator's type, descriptors and attributes, fixed for every later execution. */
aclError aclopCreateHandle(const char *opType, int numInputs, const aclTensorDesc *const inputDesc[], int numOutputs,
                           const aclTensorDesc *const outputDesc[], const aclopAttr *opAttr, aclopHandle **handle) {
    if (!handle || !opType || numInputs < 0 || numOutputs < 0 || (numInputs && !inputDesc) ||
        (numOutputs && !outputDesc)) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopCreateHandle: needs an op type, descriptors and a handle");
    }
    aclopHandle *h = calloc(1, sizeof *h);
    int total = numInputs + numOutputs;
    if (!h || !(h->op_type = strdup(opType)) || !(h->descs = calloc(total ? total : 1, sizeof *h->descs)) ||
        !(h->order = calloc(total ? total : 1, sizeof *h->order))) {
        aclopDestroyHandle(h);
        return fnpu_fail(ACL_ERROR_BAD_ALLOC, "no host memory for an operator handle");
    }
    for (int i = 0; i < total; i++) {
        const aclTensorDesc *d = i < numInputs ? inputDesc[i] : outputDesc[i - numInputs];
        if (!d || copy_desc(&h->descs[i], d) != 0) {
            aclopDestroyHandle(h);
            return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopCreateHandle: descriptor %d is not one", i);
        }
        h->order[i] = &h->descs[i];
        i < numInputs ? h->ninputs++ : h->noutputs++;
    }
    for (size_t i = 0; opAttr && i < opAttr->n; i++) {
        const struct attr *a = &opAttr->items[i];
        struct fnpu_buf value = {0};
        if (fnpu_buf_put(&value, a->value, a->len) != ACL_SUCCESS ||
            set_attr(&h->attr, a->name, a->kind, &value) != ACL_SUCCESS) {
            aclopDestroyHandle(h);
            return ACL_ERROR_BAD_ALLOC;
        }
    }
    *handle = h;
    return ACL_SUCCESS;
}

void aclopDestroyHandle(aclopHandle *handle) {
    if (!handle) {
        return;
    }
    for (int i = 0; i < handle->ninputs + handle->noutputs; i++) {
        free_desc(&handle->descs[i]);
    }
    free(handle->descs);
    free(handle->order);
    clear_attr(&handle->attr);
    free(handle->op_type);
    free(handle);
}

aclError aclopExecWithHandle(aclopHandle *handle, int numInputs, const aclDataBuffer *const inputs[], int numOutputs,
                             aclDataBuffer *const outputs[], aclrtStream stream) {
    if (!handle) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopExecWithHandle: handle is NULL");
    }
    if (numInputs != handle->ninputs || numOutputs != handle->noutputs) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "%s: the handle has %d inputs and %d outputs, got %d and %d",
                         handle->op_type, handle->ninputs, handle->noutputs, numInputs, numOutputs);
    }
    return launch(handle->op_type, numInputs, handle->order, inputs, numOutputs, handle->order + numInputs,
                  (const aclDataBuffer *const *)outputs, &handle->attr, stream);
}

/* aclopCast: the emulated Cast operator, to the destination descriptor's data type. */
aclError aclopCast(const aclTensorDesc *srcDesc, const aclDataBuffer *srcBuffer, const aclTensorDesc *dstDesc,
                   aclDataBuffer *dstBuffer, uint8_t truncate, aclrtStream stream) {
    (void)truncate;
    if (!dstDesc) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclopCast: dstDesc is NULL");
    }
    aclopAttr attr = {0};
    aclError ret = aclopSetAttrInt(&attr, "dst_type", dstDesc->dtype);
    const aclDataBuffer *out[1] = {dstBuffer};
    if (ret == ACL_SUCCESS) {
        ret = launch("Cast", 1, &srcDesc, &srcBuffer, 1, &dstDesc, out, &attr, stream);
    }
    clear_attr(&attr);
    return ret;
}
