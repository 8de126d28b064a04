/* Stream capture into a replayable graph and task groups, as interposer/shim/acl/mdl.py: the daemon records the
 * stream's work between begin and end; a replay is one record however many operators the graph holds. */
#include "fnpu.h"

#define HANDLE(p) ((uint64_t)(uintptr_t)(p))

aclError aclmdlRICaptureBegin(aclrtStream stream, aclmdlRICaptureMode mode) {
    struct fnpu_graph_capture_begin_req req = {HANDLE(stream), (uint32_t)mode};
    aclError ret = fnpu_rt_call(FNPU_CMD_GRAPH_CAPTURE_BEGIN, req.stream, &req, sizeof req, NULL);
    if (ret == ACL_SUCCESS) {
        fnpu_set_capturing(req.stream, 1);
    }
    return ret;
}

/* The graph is the daemon's until aclmdlRICaptureEnd, so a capture in progress reports no model yet. */
aclError aclmdlRICaptureGetInfo(aclrtStream stream, aclmdlRICaptureStatus *status, aclmdlRI *modelRI) {
    if (!status) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureGetInfo: status is NULL");
    }
    *status = fnpu_capturing(HANDLE(stream)) ? ACL_MODEL_RI_CAPTURE_STATUS_ACTIVE : ACL_MODEL_RI_CAPTURE_STATUS_NONE;
    if (modelRI) {
        *modelRI = NULL;
    }
    return ACL_SUCCESS;
}

static aclError handle_of(uint32_t cmd, aclrtStream stream, void **out) {
    if (!out) {
        return fnpu_fail(ACL_ERROR_INVALID_PARAM, "an output handle pointer is NULL");
    }
    struct fnpu_graph_capture_end_req req = {HANDLE(stream)};
    struct fnpu_graph_capture_end_rep rep = {0};
    struct fnpu_out reply = {&rep, sizeof rep, 0};
    aclError ret = fnpu_rt_call(cmd, req.stream, &req, sizeof req, &reply);
    if (ret == ACL_SUCCESS) {
        fnpu_adopt(rep.handle, req.stream);
    }
    *out = (void *)(uintptr_t)rep.handle;
    return ret;
}

aclError aclmdlRICaptureEnd(aclrtStream stream, aclmdlRI *modelRI) {
    aclError ret = handle_of(FNPU_CMD_GRAPH_CAPTURE_END, stream, modelRI);
    fnpu_set_capturing(HANDLE(stream), 0);
    return ret;
}

aclError aclmdlRIExecuteAsync(aclmdlRI modelRI, aclrtStream stream) {
    struct fnpu_graph_launch_req req = {HANDLE(modelRI), HANDLE(stream)};
    return fnpu_rt_submit(FNPU_CMD_GRAPH_LAUNCH, req.graph, req.stream, &req, sizeof req);
}

aclError aclmdlRIDestroy(aclmdlRI modelRI) { return fnpu_destroy(FNPU_CMD_GRAPH_DESTROY, HANDLE(modelRI)); }

/* Task groups: operators of a capture that a later update replaces (the same operators in the same order, on
 * new parameters). An update travels with the stream's asynchronous work: a refused one is reported by the
 * stream's next synchronisation. */
aclError aclmdlRICaptureTaskGrpBegin(aclrtStream stream) {
    struct fnpu_graph_group_begin_req req = {HANDLE(stream)};
    return fnpu_rt_call(FNPU_CMD_GRAPH_GROUP_BEGIN, req.stream, &req, sizeof req, NULL);
}

aclError aclmdlRICaptureTaskGrpEnd(aclrtStream stream, aclrtTaskGrp *handle) {
    return handle_of(FNPU_CMD_GRAPH_GROUP_END, stream, handle);
}

aclError aclmdlRICaptureTaskUpdateBegin(aclrtStream stream, aclrtTaskGrp handle) {
    struct fnpu_graph_update_begin_req req = {HANDLE(stream), HANDLE(handle)};
    return fnpu_rt_submit(FNPU_CMD_GRAPH_UPDATE_BEGIN, req.stream, req.stream, &req, sizeof req);
}

aclError aclmdlRICaptureTaskUpdateEnd(aclrtStream stream) {
    struct fnpu_graph_update_end_req req = {HANDLE(stream)};
    return fnpu_rt_submit(FNPU_CMD_GRAPH_UPDATE_END, req.stream, req.stream, &req, sizeof req);
}
