"""Operators: a description (template) is checked and bound to a kernel once per session; each launch names it
and its buffers' device addresses, and becomes a kernel task on a stream (or in the graph capturing it)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from construct import ConstructError

from interposer import wire
from interposer.translate.memory import region_of
from interposer.translate.streams import stream_of, submit
from npu.emulated import dtypes
from npu.emulated.ops import Kernel, KernelTask, TensorSpec, bind
from npu.errors import AclError, FlexNPUError, InvalidParam, NotSupported

if TYPE_CHECKING:
    from interposer.translate import Translator

PLAIN_FORMATS = {-1, 0, 1, 2}  # UNDEFINED, NCHW, NHWC, ND: row-major as described


def kernel_task(session: Translator, args, data) -> KernelTask:
    kernel = session.templates.get(args.template)
    if kernel is None:
        raise InvalidParam(f"operator launch names template {args.template}, never described in this session")
    if isinstance(kernel, FlexNPUError):
        raise kernel
    ins, outs = kernel.ins, kernel.outs
    if args.count != len(ins) + len(outs) or len(data) != 8 * args.count:
        raise InvalidParam(
            f"{kernel.op_type} launch: {args.count} buffers for {len(ins)} inputs and {len(outs)} outputs"
        )
    addresses = struct.unpack(f"<{args.count}Q", bytes(data))
    op = kernel.op_type
    return KernelTask(
        kernel,
        tuple(
            region_of(session, a, t.nbytes, f"{op} input {i}")
            for i, (a, t) in enumerate(zip(addresses, ins, strict=False))
        ),
        tuple(
            region_of(session, a, t.nbytes, f"{op} output {i}")
            for i, (a, t) in enumerate(zip(addresses[len(ins) :], outs, strict=True))
        ),
    )


# -- the records ------------------------------------------------------------------------------------------------


def op_template(session: Translator, seq, args, data):
    """Check a description once; a refused one is kept, so each launch of it fails on its own stream."""
    try:
        description = wire.OpDescription.parse(bytes(data))
        op = description.op_type
        kernel: Kernel | FlexNPUError = bind(
            op,
            [_spec(op, f"input {i}", t) for i, t in enumerate(description.inputs)],
            [_spec(op, f"output {i}", t) for i, t in enumerate(description.outputs)],
            {a.name: a.value for a in description.attrs},
        )
    except ConstructError as exc:
        kernel = InvalidParam(f"operator description (template {args.template}) is malformed: {exc}")
    except FlexNPUError as exc:
        kernel = exc
    except (TypeError, ValueError) as exc:  # an attribute of the wrong kind, e.g. an int where a list goes
        kernel = InvalidParam(f"operator description (template {args.template}): an attribute is wrong: {exc}")
    if isinstance(kernel, FlexNPUError):
        session.log.info("operator_refused", seq=seq, template=args.template, error=kernel.message)
    session.templates[args.template] = kernel


def op_launch(session: Translator, seq, args, data):
    limits = None if args.limits == wire.OWN_LIMITS else stream_of(session, args.limits)
    submit(session, stream_of(session, args.stream), seq, lambda: kernel_task(session, args, data), limits)


def _spec(op: str, which: str, description) -> TensorSpec:
    dims = tuple(description.dims)
    if any(d < 0 for d in dims):
        raise InvalidParam(f"{op} {which}: dims {list(dims)} must be >= 0")
    if description.format not in PLAIN_FORMATS:
        raise NotSupported(
            f"{op} {which}: aclFormat {description.format} is a blocked layout the emulated op library does not "
            f"implement; describe the tensor as ACL_FORMAT_ND (2)",
            AclError.FEATURE_UNSUPPORTED,
        )
    return TensorSpec(dtypes.from_acl(description.dtype, f"{op} {which}"), dims)
