"""acl.mdl: stream capture into a replayable graph (aclmdlRICapture*, aclmdlRIExecuteAsync, aclmdlRIDestroy).

The spellings follow pyACL's rule for the C names (drop `aclmdl`, snake_case the rest). Offline models
(`load_from_file`, datasets) are not provided.
"""

from __future__ import annotations

from acl._ret import code, value
from flexnpu_client.codec import COMMANDS, Op
from flexnpu_client.runtime import RUNTIME

ACL_MODEL_RI_CAPTURE_MODE_GLOBAL, ACL_MODEL_RI_CAPTURE_MODE_THREAD_LOCAL, ACL_MODEL_RI_CAPTURE_MODE_RELAXED = 0, 1, 2


@code
def ri_capture_begin(stream: int, mode: int = ACL_MODEL_RI_CAPTURE_MODE_GLOBAL) -> None:
    RUNTIME.call(Op.GRAPH_CAPTURE_BEGIN, stream, stream=stream, mode=mode)


@value(0)
def ri_capture_end(stream: int) -> int:
    handle = COMMANDS[Op.GRAPH_CAPTURE_END].reply.parse(RUNTIME.call(Op.GRAPH_CAPTURE_END, stream, stream=stream))
    RUNTIME.adopt(handle.handle, stream)
    return handle.handle


@code
def ri_execute_async(model_ri: int, stream: int) -> None:
    RUNTIME.submit(Op.GRAPH_LAUNCH, model_ri, graph=model_ri, stream=stream)


@code
def ri_destroy(model_ri: int) -> None:
    RUNTIME.destroy(Op.GRAPH_DESTROY, model_ri)


# Task groups: operators of a capture that a later update replaces (aclmdlRICaptureTaskGrpBegin/End,
# aclmdlRICaptureTaskUpdateBegin/End: the same operators in the same order, on new parameters).


@code
def ri_capture_task_grp_begin(stream: int) -> None:
    RUNTIME.call(Op.GRAPH_GROUP_BEGIN, stream, stream=stream)


@value(0)
def ri_capture_task_grp_end(stream: int) -> int:
    reply = COMMANDS[Op.GRAPH_GROUP_END].reply.parse(RUNTIME.call(Op.GRAPH_GROUP_END, stream, stream=stream))
    RUNTIME.adopt(reply.handle, stream)
    return reply.handle


# An update travels with the stream's asynchronous work (no round trip per update, as a decode step updates
# every layer's attention): a refused one is reported by the stream's next synchronisation.


@code
def ri_capture_task_update_begin(stream: int, handle: int) -> None:
    RUNTIME.submit(Op.GRAPH_UPDATE_BEGIN, stream, stream=stream, group=handle)


@code
def ri_capture_task_update_end(stream: int) -> None:
    RUNTIME.submit(Op.GRAPH_UPDATE_END, stream, stream=stream)
