"""The emulated Ascend op library (npu/emulated/ops) through its real launch path: bind() a description, put the
inputs in device memory Regions, run the KernelTask, read the outputs back from memory, and compare them with
a reference written here in plain numpy (never the op's own compute()). Also each op family's cost, the errors
a bad description gets, and timing mode (unbacked memory: nothing computed, the same cost).
"""

from __future__ import annotations

import math
import tracemalloc
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu.emulated import timing
from npu.emulated.ops import KernelTask, OpNotFound, TensorSpec, attention, bind
from npu.emulated.ops.attention import FA_EFF_MAX, FA_L0, band_pairs
from npu.emulated.ops.matmul import CUBE_EFF_MAX, CUBE_FP32_RATE, CUBE_K0
from npu.errors import AclError, FlexNPUError, InvalidParam
from npu.memory import DeviceMemory, Region
from npu.profiles import profile
from npu.tasks import Cost, Unit

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
I8 = np.dtype(np.int8)
I32 = np.dtype(np.int32)
I64 = np.dtype(np.int64)
BOOL = np.dtype(np.bool_)

FLOATS = (F32, F16, BF16)
INTS = (I32, I64, I8)
ALL_DTYPES = (*FLOATS, *INTS, BOOL)

# Tolerance per OUTPUT dtype, as (rtol, atol). The reference computes in float64 from the exact input values
# (they are already rounded to their dtype); the op computes in float32 and rounds once to the output dtype,
# so the error is that final rounding plus float32 arithmetic:
#   float32:  half an ulp is 2**-24 ~ 6e-8, and float32 accumulation adds a few ulps more  -> rtol 1e-5;
#   float16:  10-bit mantissa, half an ulp is 2**-11 ~ 4.9e-4                               -> rtol 1e-3;
#   bfloat16: 7-bit mantissa, half an ulp is 2**-8 ~ 3.9e-3                                 -> rtol 1e-2.
# atol covers results that cancel to near zero, where float32 rounding of the O(1) intermediates dominates;
# reductions (matmul, attention) scale it by the size of what they sum. Integers and bool must be exact.
TOLERANCE: dict[np.dtype, tuple[float, float] | None] = {
    F32: (1e-5, 1e-6),
    F16: (1e-3, 1e-5),
    BF16: (1e-2, 1e-5),
    I32: None,
    I64: None,
    I8: None,
    BOOL: None,
}

ACL_CODE = {F32: 0, F16: 1, I8: 2, I32: 3, I64: 9, BOOL: 12, BF16: 27}  # aclDataType (acl_base.h)

# Derandomized: the same examples every run, so a tolerance edge found once cannot make CI flaky.
FAST = settings(
    max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
SEEDS = st.integers(0, 2**32 - 1)
DIMS = st.integers(1, 5)
SHAPES = st.lists(DIMS, min_size=0, max_size=4).map(tuple)


def dtype_id(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


# -- helpers: data, the launch path, the comparison -------------------------------------------------------


def spec(dtype, shape) -> TensorSpec:
    return TensorSpec(np.dtype(dtype), tuple(shape))


def spec_of(array: np.ndarray) -> TensorSpec:
    return spec(array.dtype, array.shape)


def data(rng: np.random.Generator, dtype, shape, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    """Random values of `dtype`: uniform floats in [low, high], integers in [low, high], fair bools."""
    dtype = np.dtype(dtype)
    if dtype == BOOL:
        return np.asarray(rng.random(shape) < 0.5)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(int(low), int(high), size=shape, endpoint=True)).astype(dtype)
    return np.asarray(rng.uniform(low, high, size=shape)).astype(dtype)


def f64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def aligned(size: int) -> int:
    return -(-max(size, 1) // 32) * 32


def launch(
    op_type: str,
    inputs: list[np.ndarray],
    outs: list[TensorSpec],
    attrs: dict | None = None,
    in_place: dict[int, int] | None = None,
):
    """The real path: bind, copy the inputs into one device allocation (32-byte-aligned Regions), fill the
    outputs with a sentinel so every byte must be written, run the KernelTask, read the outputs back.
    `in_place` maps an output index to the input whose Region it shares. Returns (outputs, kernel, regions)."""
    kernel = bind(op_type, [spec_of(a) for a in inputs], list(outs), dict(attrs or {}))
    in_place = in_place or {}
    sizes = [a.nbytes for a in inputs] + [o.nbytes for o in outs]
    memory = DeviceMemory(1 << 30, backed=True)
    buffer = memory.alloc(sum(aligned(s) for s in sizes))
    regions, offset = [], 0
    for size in sizes:
        regions.append(Region(buffer, offset, size))
        offset += aligned(size)
    in_regions = regions[: len(inputs)]
    for region, array in zip(in_regions, inputs, strict=True):
        region.write(np.ascontiguousarray(array).tobytes())
    out_regions = [in_regions[in_place[i]] if i in in_place else r for i, r in enumerate(regions[len(inputs) :])]
    for i, region in enumerate(out_regions):
        if i not in in_place:
            region.write(b"\xa5" * region.size)
    KernelTask(kernel, tuple(in_regions), tuple(out_regions)).run()
    results = [np.frombuffer(r.read(), dtype=o.dtype).reshape(o.shape) for r, o in zip(out_regions, outs, strict=True)]
    return results, kernel, in_regions


def run_op(op_type: str, inputs: list[np.ndarray], outs: list[TensorSpec], attrs: dict | None = None):
    results, kernel, _ = launch(op_type, inputs, outs, attrs)
    return results, kernel


def assert_matches(actual: np.ndarray, expected, scale: float = 1.0) -> None:
    """Floats: both cast to float64, within the output dtype's tolerance (atol times `scale`); integers, bool:
    exactly equal."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    tolerance = TOLERANCE[actual.dtype]
    if tolerance is None:
        if actual.dtype == BOOL:
            np.testing.assert_array_equal(actual, expected.astype(bool))
        else:
            np.testing.assert_array_equal(actual.astype(np.int64), expected.astype(np.int64))
        return
    rtol, atol = tolerance
    np.testing.assert_allclose(f64(actual), f64(expected), rtol=rtol, atol=atol * scale)


def pad16(x: int) -> int:
    return -(-x // 16) * 16


def c_div(x: int, y: int) -> int:
    """C integer division on Python ints (exact for any int64): truncates toward zero; x / 0 is 0 here."""
    if y == 0:
        return 0
    quotient = abs(x) // abs(y)
    return quotient if (x < 0) == (y < 0) else -quotient


C_DIV = np.frompyfunc(c_div, 2, 1)


@st.composite
def broadcast_pairs(draw, max_rank: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two shapes that broadcast: each drops some leading dims of a common shape and sets some dims to 1."""
    full = draw(st.lists(DIMS, min_size=0, max_size=max_rank))

    def operand() -> tuple[int, ...]:
        drop = draw(st.integers(0, len(full)))
        return tuple(1 if draw(st.booleans()) else d for d in full[drop:])

    return operand(), operand()


# -- elementwise arithmetic and casts --------------------------------------------------------------------

INT_LIMIT = {I8: 11, I32: 1000, I64: 10**6}  # |x| <= limit: no sum or product overflows the dtype


@pytest.mark.parametrize("dtype", [*FLOATS, *INTS], ids=dtype_id)
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
@FAST
@given(shapes=broadcast_pairs(), seed=SEEDS)
def test_binary_arithmetic_with_broadcasting(op_type, dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    s1, s2 = shapes
    if dtype in FLOATS:
        x1 = data(rng, dtype, s1)
        if op_type == "Div":  # denominators away from zero
            x2 = np.asarray(rng.uniform(0.5, 2.0, s2) * rng.choice([-1.0, 1.0], s2)).astype(dtype)
        else:
            x2 = data(rng, dtype, s2)
        a, b = f64(x1), f64(x2)
        expected = {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b}[op_type]
    else:
        limit = INT_LIMIT[dtype]
        x1 = data(rng, dtype, s1, -limit, limit)
        x2 = data(rng, dtype, s2, -limit, limit)
        if op_type == "Div":
            x2 = np.where(rng.random(s2) < 0.25, 0, x2).astype(dtype)  # division by zero gives 0
        a, b = x1.astype(object), x2.astype(object)  # Python ints: exact
        expected = {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": C_DIV(a, b)}[op_type]
    (out,), _ = run_op(op_type, [x1, x2], [spec(dtype, np.broadcast_shapes(s1, s2))])
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", INTS, ids=dtype_id)
@pytest.mark.parametrize("op_type", ["Div", "RealDiv"])
def test_integer_division_truncates_toward_zero_and_by_zero_gives_zero(op_type, dtype):
    x1 = np.array([7, -7, 7, -7, 6, 5, 0, -3, 1, -1], dtype)
    x2 = np.array([2, 2, -2, -2, 3, 0, 3, 0, 4, 4], dtype)
    (out,), _ = run_op(op_type, [x1, x2], [spec_of(x1)])
    assert out.tolist() == [3, -3, -3, 3, 2, 0, 0, 0, 0, 0]


def test_int64_division_is_exact_beyond_float64_precision():
    """Integers above 2**53 have no exact float64; C division of int64 is still exact."""
    x1 = np.array([2**53 + 1, -(2**62) - 3, 2**62 + 1, 10**18 + 7, 2**63 - 1], I64)
    x2 = np.array([1, 1, 3, 10, 2], I64)
    (out,), _ = run_op("Div", [x1, x2], [spec_of(x1)])
    assert out.tolist() == [2**53 + 1, -(2**62) - 3, (2**62 + 1) // 3, 10**17, 2**62 - 1]


@pytest.mark.parametrize(
    ("op_type", "reference"), [("Add", np.logical_or), ("AddV2", np.logical_or), ("Mul", np.logical_and)]
)
def test_bool_add_and_mul_are_or_and_and(op_type, reference):
    x1 = np.array([[True, True, False, False]])
    x2 = np.array([[True], [False]])
    (out,), _ = run_op(op_type, [x1, x2], [spec(BOOL, (2, 4))])
    assert_matches(out, reference(x1, x2))


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_arithmetic_in_place_on_its_first_operand(op_type):
    """x1 op= x2: the output Region is x1's own, read before it is written."""
    x1 = np.array([[6.0, -3.0, 1.5], [2.0, 8.0, -4.0]], F32)
    x2 = np.array([2.0, -0.5, 4.0], F32)
    a, b = f64(x1), f64(x2)
    expected = {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b}[op_type]
    (out,), _, regions = launch(op_type, [x1, x2], [spec_of(x1)], in_place={0: 0})
    assert_matches(out, expected)
    assert_matches(np.frombuffer(regions[0].read(), F32).reshape(x1.shape), expected)


def test_sub_on_bool_is_rejected_at_bind_or_computes():
    """A description bind() accepts must run: either Sub refuses bool when the launch is checked, or it gives
    the integer difference cast to bool (nonzero where the operands differ)."""
    x1 = np.array([True, True, False, False])
    x2 = np.array([True, False, True, False])
    try:
        bind("Sub", [spec_of(x1), spec_of(x2)], [spec_of(x1)], {})
    except InvalidParam as error:
        assert str(error).startswith("Sub ")
        return
    (out,), _ = run_op("Sub", [x1, x2], [spec_of(x1)])
    assert_matches(out, x1 != x2)


CAST_CASES = [
    (F32, F16),
    (F32, BF16),
    (F16, F32),
    (BF16, F32),
    (BF16, F16),
    (F16, F16),
    (F32, I32),
    (F16, I8),
    (BF16, I64),
    (I32, F32),
    (I8, BF16),
    (I64, I32),
    (I8, I64),
    (I32, BOOL),
    (F32, BOOL),
    (BOOL, F32),
    (BOOL, I32),
]


@pytest.mark.parametrize(("src", "dst"), CAST_CASES, ids=[f"{dtype_id(s)}->{dtype_id(d)}" for s, d in CAST_CASES])
def test_cast_to_dst_type(src, dst):
    rng = np.random.default_rng(7)
    x = data(rng, src, (4, 9), -100, 100)
    x[0, :3] = 0  # exact zeros: false for bool
    if src in FLOATS:
        x[1, :4] = np.array([2.5, -2.5, 3.0, -0.75]).astype(src)  # truncation toward zero, exact integers
    value = f64(x)
    if dst in FLOATS:
        expected = value
    elif dst == BOOL:
        expected = value != 0
    else:
        expected = np.trunc(value)
    (out,), _ = run_op("Cast", [x], [spec(dst, x.shape)], {"dst_type": ACL_CODE[dst]})
    assert out.dtype == dst
    assert_matches(out, expected)


# -- activations and softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("op_type", ["Swish", "SiLU", "Silu", "Gelu"])
@FAST
@given(shape=SHAPES, seed=SEEDS, scale=st.sampled_from([None, 0.5, 1.0, 1.702]))
def test_activations(op_type, dtype, shape, seed, scale):
    x = data(np.random.default_rng(seed), dtype, shape, -4, 4)
    a = f64(x)
    attrs = {}
    if op_type == "Gelu":  # the tanh approximation
        expected = 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    else:  # x * sigmoid(scale * x); SiLU is scale 1
        if scale is not None:
            attrs["scale"] = scale
        expected = a / (1.0 + np.exp(-(1.0 if scale is None else scale) * a))
    (out,), _ = run_op(op_type, [x], [spec_of(x)], attrs)
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shape=st.lists(DIMS, min_size=1, max_size=4), draw=st.data(), seed=SEEDS)
def test_swiglu_splits_along_dim(dtype, shape, draw, seed):
    rank = len(shape)
    dim = draw.draw(st.integers(-rank, rank - 1), label="dim")
    full = list(shape)
    full[dim] *= 2
    x = data(np.random.default_rng(seed), dtype, full, -4, 4)
    first, second = np.split(f64(x), 2, axis=dim)
    expected = first / (1.0 + np.exp(-first)) * second
    attrs = {} if dim == -1 and draw.draw(st.booleans(), label="default dim") else {"dim": dim}
    (out,), _ = run_op("SwiGlu", [x], [spec(dtype, shape)], attrs)
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shape=st.lists(DIMS, min_size=1, max_size=4), draw=st.data(), seed=SEEDS)
def test_softmax_over_axes(dtype, shape, draw, seed):
    rank = len(shape)
    axes = sorted(draw.draw(st.sets(st.integers(0, rank - 1), min_size=1), label="axes"))
    named = [a - rank if draw.draw(st.booleans(), label="negative") else a for a in axes]
    op_type = draw.draw(st.sampled_from(["SoftmaxV2", "Softmax"]), label="op")
    x = data(np.random.default_rng(seed), dtype, shape, -6, 6)
    a = f64(x)
    e = np.exp(a - a.max(axis=tuple(axes), keepdims=True))
    expected = e / e.sum(axis=tuple(axes), keepdims=True)
    attrs = {} if axes == [rank - 1] and draw.draw(st.booleans(), label="default axes") else {"axes": named}
    (out,), _ = run_op(op_type, [x], [spec_of(x)], attrs)
    assert_matches(out, expected)
    total = np.asarray(f64(out)).sum(axis=tuple(axes))
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=TOLERANCE[dtype][0] * math.prod(shape[a] for a in axes) + 1e-6)


# -- normalisations --------------------------------------------------------------------------------------

EPSILONS = st.sampled_from([None, 1e-6, 1e-5, 1e-3])


def rms_reference(x: np.ndarray, gamma: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    mean_square = (x * x).sum(axis=axes, keepdims=True) / math.prod(gamma.shape)
    rstd = 1.0 / np.sqrt(mean_square + eps)
    return x * rstd * gamma, rstd


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shape=st.lists(DIMS, min_size=1, max_size=4), draw=st.data(), seed=SEEDS, eps=EPSILONS)
def test_rms_norm(dtype, shape, draw, seed, eps):
    k = draw.draw(st.integers(1, len(shape)), label="gamma rank")
    rng = np.random.default_rng(seed)
    x = data(rng, dtype, shape)
    gamma = data(rng, dtype, shape[len(shape) - k :], 0.5, 1.5)
    y, rstd = rms_reference(f64(x), f64(gamma), 1e-6 if eps is None else eps)
    attrs = {} if eps is None else {"epsilon": eps}
    rstd_shape = tuple(shape[: len(shape) - k]) + (1,) * k
    (out_y, out_rstd), _ = run_op("RmsNorm", [x, gamma], [spec_of(x), spec(F32, rstd_shape)], attrs)
    assert_matches(out_y, y)
    assert out_rstd.dtype == F32
    assert_matches(out_rstd, rstd)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shape=st.lists(DIMS, min_size=1, max_size=4), draw=st.data(), seed=SEEDS, eps=EPSILONS)
def test_add_rms_norm(dtype, shape, draw, seed, eps):
    k = draw.draw(st.integers(1, len(shape)), label="gamma rank")
    rng = np.random.default_rng(seed)
    x1, x2 = data(rng, dtype, shape), data(rng, dtype, shape)
    gamma = data(rng, dtype, shape[len(shape) - k :], 0.5, 1.5)
    x = f64(x1) + f64(x2)
    y, rstd = rms_reference(x, f64(gamma), 1e-6 if eps is None else eps)
    attrs = {} if eps is None else {"epsilon": eps}
    rstd_shape = tuple(shape[: len(shape) - k]) + (1,) * k
    outs = [spec_of(x1), spec(F32, rstd_shape), spec_of(x1)]
    (out_y, out_rstd, out_x), _ = run_op("AddRmsNorm", [x1, x2, gamma], outs, attrs)
    assert_matches(out_y, y)
    assert_matches(out_rstd, rstd)
    assert_matches(out_x, x)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shape=st.lists(DIMS, min_size=1, max_size=4), draw=st.data(), seed=SEEDS, eps=EPSILONS)
def test_layer_norm(dtype, shape, draw, seed, eps):
    rank = len(shape)
    begin = draw.draw(st.integers(-rank, rank - 1), label="begin_norm_axis")
    first = begin % rank
    k = draw.draw(st.integers(1, rank - first), label="gamma rank")
    rng = np.random.default_rng(seed)
    x = data(rng, dtype, shape)
    gamma = data(rng, dtype, shape[rank - k :], 0.5, 1.5)
    beta = data(rng, dtype, shape[rank - k :])
    a = f64(x)
    axes = tuple(range(first, rank))
    count = math.prod(shape[first:])
    mean = a.sum(axis=axes, keepdims=True) / count
    variance = ((a - mean) ** 2).sum(axis=axes, keepdims=True) / count
    y = (a - mean) / np.sqrt(variance + (1e-5 if eps is None else eps)) * f64(gamma) + f64(beta)
    attrs = {} if begin == -1 and draw.draw(st.booleans(), label="default axis") else {"begin_norm_axis": begin}
    if k != 1 or draw.draw(st.booleans(), label="explicit begin_params_axis"):
        attrs["begin_params_axis"] = rank - k if draw.draw(st.booleans(), label="positive") else -k
    if eps is not None:
        attrs["epsilon"] = eps
    stat = spec(F32, tuple(shape[:first]) + (1,) * (rank - first))
    (out_y, out_mean, out_var), _ = run_op("LayerNorm", [x, gamma, beta], [spec_of(x), stat, stat], attrs)
    assert_matches(out_y, y)
    assert_matches(out_mean, mean)
    assert_matches(out_var, variance)


# -- matrix multiplies -----------------------------------------------------------------------------------

MATMUL_DTYPES = (*FLOATS, I32)


def matmul_operand(rng, dtype, shape):
    return data(rng, dtype, shape, -20, 20) if dtype == I32 else data(rng, dtype, shape)


def exact(array: np.ndarray) -> np.ndarray:
    return array.astype(np.int64) if array.dtype.kind in "iu" else f64(array)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=dtype_id)
@FAST
@given(
    mkn=st.tuples(st.integers(1, 8), st.integers(1, 16), st.integers(1, 8)),
    flags=st.tuples(st.booleans(), st.booleans()),
    bias=st.sampled_from([None, "n", "1n"]),
    op_type=st.sampled_from(["MatMulV2", "MatMul"]),
    seed=SEEDS,
)
def test_matmul(dtype, mkn, flags, bias, op_type, seed):
    m, k, n = mkn
    ta, tb = flags
    rng = np.random.default_rng(seed)
    x1 = matmul_operand(rng, dtype, (k, m) if ta else (m, k))
    x2 = matmul_operand(rng, dtype, (n, k) if tb else (k, n))
    a, b = exact(x1), exact(x2)
    expected = (a.T if ta else a) @ (b.T if tb else b)
    inputs = [x1, x2]
    if bias is not None:
        x3 = matmul_operand(rng, dtype, (n,) if bias == "n" else (1, n))
        inputs.append(x3)
        expected = expected + exact(x3).reshape(n)
    attrs = {name: flag for name, flag in zip(("transpose_x1", "transpose_x2"), flags, strict=True) if flag}
    (out,), kernel = run_op(op_type, inputs, [spec(dtype, (m, n))], attrs)
    assert_matches(out, expected, scale=4 * k)
    assert kernel.cost.flops == 2 * pad16(m) * pad16(n) * pad16(k)  # what the 16x16x16 cube executes


@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=dtype_id)
@FAST
@given(
    batches=broadcast_pairs(max_rank=3),
    mkn=st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 6)),
    adj=st.tuples(st.booleans(), st.booleans()),
    bias=st.booleans(),
    op_type=st.sampled_from(["BatchMatMulV2", "BatchMatMul"]),
    seed=SEEDS,
)
def test_batch_matmul_broadcasts_batch_dims(dtype, batches, mkn, adj, bias, op_type, seed):
    (b1, b2), (m, k, n), (adj1, adj2) = batches, mkn, adj
    rng = np.random.default_rng(seed)
    x1 = matmul_operand(rng, dtype, (*b1, *((k, m) if adj1 else (m, k))))
    x2 = matmul_operand(rng, dtype, (*b2, *((n, k) if adj2 else (k, n))))
    a, b = exact(x1), exact(x2)
    expected = np.matmul(np.swapaxes(a, -1, -2) if adj1 else a, np.swapaxes(b, -1, -2) if adj2 else b)
    inputs = [x1, x2]
    if bias:
        x3 = matmul_operand(rng, dtype, (n,))
        inputs.append(x3)
        expected = expected + exact(x3)
    batch = np.broadcast_shapes(b1, b2)
    attrs = {"adj_x1": adj1, "adj_x2": adj2}
    (out,), kernel = run_op(op_type, inputs, [spec(dtype, (*batch, m, n))], attrs)
    assert_matches(out, expected, scale=4 * k)
    assert kernel.cost.flops == 2 * pad16(m) * pad16(n) * pad16(k) * math.prod(batch)


# -- rotary embeddings -----------------------------------------------------------------------------------


def rotate_half(a: np.ndarray) -> np.ndarray:
    half = a.shape[-1] // 2
    return np.concatenate([-a[..., half:], a[..., :half]], axis=-1)


@st.composite
def rotary_shapes(draw):
    """x [..., D] with D even, and cos/sin shapes that broadcast to x (leading dims dropped or set to 1)."""
    lead = draw(st.lists(DIMS, min_size=1, max_size=3))
    x = (*lead, 2 * draw(st.integers(1, 4)))

    def table() -> tuple[int, ...]:
        drop = draw(st.integers(0, len(lead)))
        return (*(1 if draw(st.booleans()) else d for d in lead[drop:]), x[-1])

    return x, table(), table()


def angles(rng, dtype, shape) -> tuple[np.ndarray, np.ndarray]:
    theta = rng.uniform(0, 2 * np.pi, shape)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(shapes=rotary_shapes(), seed=SEEDS)
def test_rotary_mul(dtype, shapes, seed):
    x_shape, cos_shape, sin_shape = shapes
    rng = np.random.default_rng(seed)
    x = data(rng, dtype, x_shape)
    cos, _ = angles(rng, dtype, cos_shape)
    _, sin = angles(rng, dtype, sin_shape)
    a = f64(x)
    expected = a * f64(cos) + rotate_half(a) * f64(sin)
    (out,), _ = run_op("RotaryMul", [x, cos, sin], [spec_of(x)])
    assert_matches(out, expected)


@pytest.mark.parametrize("table_batch", [1, 2])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_apply_rotary_pos_emb_rotates_query_and_key(dtype, table_batch):
    rng = np.random.default_rng(11)
    b, s, n, n_kv, d = 2, 5, 4, 2, 8  # layout BSND
    q, k = data(rng, dtype, (b, s, n, d)), data(rng, dtype, (b, s, n_kv, d))
    cos, sin = angles(rng, dtype, (table_batch, s, 1, d))
    c, si = f64(cos), f64(sin)
    (out_q, out_k), _ = run_op("ApplyRotaryPosEmb", [q, k, cos, sin], [spec_of(q), spec_of(k)])
    assert_matches(out_q, f64(q) * c + rotate_half(f64(q)) * si)
    assert_matches(out_k, f64(k) * c + rotate_half(f64(k)) * si)


# -- data movement ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [I32, I64], ids=dtype_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_gather_is_an_embedding_lookup(dtype, index_dtype):
    rng = np.random.default_rng(3)
    table = data(rng, dtype, (50, 8))
    ids = np.array([[0, 49, 7, 7, 13], [21, 2, 49, 0, 30]], index_dtype)
    expected = np.stack([np.stack([table[int(i)] for i in row]) for row in ids])
    for op_type in ("GatherV2", "Gather"):
        (out,), _ = run_op(op_type, [table, ids], [spec(dtype, (2, 5, 8))])
        assert_matches(out, expected)


@pytest.mark.parametrize("axis", [1, -2])
def test_gather_along_an_inner_axis(axis):
    rng = np.random.default_rng(4)
    x = data(rng, F16, (3, 7, 4))
    indices = np.array([[6, 0, 3], [3, 3, 1]], I64)
    (out,), _ = run_op("GatherV2", [x, indices], [spec(F16, (3, 2, 3, 4))], {"axis": axis})
    assert_matches(out, f64(x)[:, indices, :])
    # the axis may also come as a third tensor input, as on Ascend; it must agree with the attribute
    axis_tensor = np.array([axis], I32)
    (out,), _ = run_op("GatherV2", [x, indices, axis_tensor], [spec(F16, (3, 2, 3, 4))], {"axis": axis})
    assert_matches(out, f64(x)[:, indices, :])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("concat_dim", [0, 1, 2, -1, None])
def test_concat(dtype, concat_dim):
    rng = np.random.default_rng(5)
    dim = 0 if concat_dim is None else concat_dim
    parts = []
    for size in (1, 3, 2):
        shape = [2, 3, 4]
        shape[dim] = size
        parts.append(data(rng, dtype, shape))
    expected = np.concatenate(parts, axis=dim)
    attrs = {} if concat_dim is None else {"concat_dim": concat_dim}
    for op_type in ("ConcatD", "Concat"):
        (out,), _ = run_op(op_type, parts, [spec_of(expected)], attrs)
        assert_matches(out, expected)


@FAST
@given(
    shape=st.lists(DIMS, min_size=1, max_size=4),
    draw=st.data(),
    dtype=st.sampled_from(ALL_DTYPES),
    perm_tensor=st.sampled_from([None, I32, I64]),
    op_type=st.sampled_from(["Transpose", "TransposeD"]),
    seed=SEEDS,
)
def test_transpose(shape, draw, dtype, perm_tensor, op_type, seed):
    perm = draw.draw(st.permutations(range(len(shape))), label="perm")
    x = data(np.random.default_rng(seed), dtype, shape)
    inputs = [x] if perm_tensor is None else [x, np.array(perm, perm_tensor)]
    out_shape = tuple(shape[p] for p in perm)
    (out,), _ = run_op(op_type, inputs, [spec(dtype, out_shape)], {"perm": perm})
    # out[i_0, ..., i_r] = x[j] where j[perm[a]] = i_a
    expected = np.empty(out_shape, dtype=x.dtype)
    for index in np.ndindex(*out_shape):
        source = [0] * len(shape)
        for a, p in enumerate(perm):
            source[p] = index[a]
        expected[index] = x[tuple(source)]
    assert_matches(out, expected)


@pytest.mark.parametrize("target", [(6, 4), (4, 3, 2), (24,), (1, 24, 1), (2, 3, 4)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_reshape_keeps_the_bytes_and_costs_nothing(dtype, target):
    x = data(np.random.default_rng(6), dtype, (2, 3, 4))
    shape_tensor = np.array(target, I64)
    for inputs in ([x], [x, shape_tensor]):
        (out,), kernel = run_op("Reshape", inputs, [spec(dtype, target)])
        assert out.tobytes() == x.tobytes()
        assert_matches(out, x.reshape(target))
        assert kernel.cost == Cost(unit=Unit.VECTOR)


@pytest.mark.parametrize("out_code", [None, 3, 9])
@pytest.mark.parametrize("dimension", [None, 0, 1, 2, -1, -3])
@pytest.mark.parametrize("dtype", [*FLOATS, I32, I64, I8], ids=dtype_id)
def test_argmax(dtype, dimension, out_code):
    rng = np.random.default_rng(8)
    x = data(rng, dtype, (4, 6, 5), -3, 3)  # narrow integer range: ties, and the first index wins
    dim = -1 if dimension is None else dimension
    attrs = {}
    if dimension is not None:
        attrs["dimension"] = dimension
    if out_code is not None:
        attrs["dtype"] = out_code
    out_dtype = I64 if out_code == 9 else I32
    value = exact(x)
    expected = np.argmax(value, axis=dim)
    # the first position holding the maximum
    assert np.all(np.take_along_axis(value, np.expand_dims(expected, dim), dim) == value.max(axis=dim, keepdims=True))
    out_shape = tuple(size for i, size in enumerate(x.shape) if i != dim % 3)
    for op_type in ("ArgMaxV2", "ArgMax"):
        (out,), _ = run_op(op_type, [x], [spec(out_dtype, out_shape)], attrs)
        assert out.dtype == out_dtype
        assert_matches(out, expected)
    (out,), _ = run_op("ArgMaxV2", [x, np.array([dim], I32)], [spec(out_dtype, out_shape)], attrs | {"dimension": dim})
    assert_matches(out, expected)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copy"])
@pytest.mark.parametrize("index_dtype", [I32, I64], ids=dtype_id)
@pytest.mark.parametrize("dtype", [F16, BF16, F32, I8], ids=dtype_id)
def test_scatter_update_writes_kv_cache_rows(dtype, index_dtype, in_place):
    rng = np.random.default_rng(9)
    cache = data(rng, dtype, (16, 2, 4))  # [max_seq, N_kv, D]
    positions = np.array([3, 15, 0], index_dtype)
    updates = data(rng, dtype, (3, 2, 4))
    expected = cache.copy()
    for row, position in enumerate(positions):
        expected[int(position)] = updates[row]
    (out,), _, regions = launch(
        "ScatterUpdate", [cache, positions, updates], [spec_of(cache)], in_place={0: 0} if in_place else None
    )
    assert_matches(out, expected)
    if in_place:
        stored = np.frombuffer(regions[0].read(), dtype).reshape(cache.shape)
        assert_matches(stored, expected)


def test_scatter_update_with_a_batch_of_position_rows():
    rng = np.random.default_rng(10)
    cache = data(rng, F16, (12, 8))
    positions = np.array([[1, 2], [10, 11]], I32)  # two requests, two new tokens each
    updates = data(rng, F16, (2, 2, 8))
    expected = f64(cache)
    for b in range(2):
        for t in range(2):
            expected[positions[b, t]] = f64(updates[b, t])
    (out,), _ = run_op("ScatterUpdate", [cache, positions, updates], [spec_of(cache)])
    assert_matches(out, expected)


# -- attention -------------------------------------------------------------------------------------------


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """x in BNSD -> the op's layout (BSH packs heads into the last dim: [B, S, N*D])."""
    if layout == "BNSD":
        return x
    b, heads, s, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, heads * d))


def from_layout(x: np.ndarray, layout: str, heads: int) -> np.ndarray:
    if layout == "BNSD":
        return x
    b, s, h = x.shape
    return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)


def attention_reference(q, k, v, visible, scale: float) -> np.ndarray:
    """q [B, N, S, D], k/v [B, N_kv, S_kv, D] in float64; query head h reads KV head h // (N / N_kv);
    visible [B, N, S, S_kv] says which keys each query sees."""
    b, n, s, d = q.shape
    group = n // k.shape[1]
    out = np.zeros((b, n, s, d))
    for bi in range(b):
        for h in range(n):
            keys, values = k[bi, h // group], v[bi, h // group]
            scores = np.where(visible[bi, h], q[bi, h] @ keys.T * scale, -np.inf)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[bi, h] = weights / weights.sum(axis=-1, keepdims=True) @ values
    return out


def attention_attrs(n: int, n_kv: int, layout: str, scale: float | None, default_layout: bool) -> dict:
    attrs: dict = {"num_heads": n}
    if n_kv != n:
        attrs["num_key_value_heads"] = n_kv
    if not (layout == "BSH" and default_layout):
        attrs["input_layout"] = layout
    if scale is not None:
        attrs["scale_value"] = scale
    return attrs


SCALES = st.one_of(st.none(), st.floats(0.05, 1.0))


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(draw=st.data(), seed=SEEDS)
def test_prompt_flash_attention(dtype, draw, seed):
    b = draw.draw(st.integers(1, 2), label="B")
    n_kv = draw.draw(st.integers(1, 2), label="N_kv")
    n = n_kv * draw.draw(st.integers(1, 3), label="group")
    s, s_kv = draw.draw(st.integers(1, 6), label="S"), draw.draw(st.integers(1, 6), label="S_kv")
    d = draw.draw(st.sampled_from([2, 4, 8]), label="D")
    layout = draw.draw(st.sampled_from(["BSH", "BNSD"]), label="layout")
    scale = draw.draw(SCALES, label="scale")
    # masking: none, causal (next_tokens = 0), or a band; bands where S > S_kv have their own test below
    band = draw.draw(st.sampled_from(["none", "causal", "band"] if s <= s_kv else ["none", "causal"]), label="band")
    mask_shape = draw.draw(
        st.sampled_from([None, (s, s_kv), (b, 1, s, s_kv), (1, n, s, s_kv), (b, n, s, s_kv)]), label="atten_mask"
    )
    mask_dtype = draw.draw(st.sampled_from([BOOL, I8]), label="mask dtype")
    rng = np.random.default_rng(seed)
    q, k, v = data(rng, dtype, (b, n, s, d)), data(rng, dtype, (b, n_kv, s_kv, d)), data(rng, dtype, (b, n_kv, s_kv, d))
    attrs = attention_attrs(n, n_kv, layout, scale, draw.draw(st.booleans(), label="default layout"))
    offset = np.arange(s_kv)[None, :] - np.arange(s)[:, None]  # j - i
    visible = np.ones((b, n, s, s_kv), bool)
    if band == "causal":
        attrs["next_tokens"] = 0
        visible &= offset <= 0
    elif band == "band":
        pre = draw.draw(st.integers(0, s_kv + 1), label="pre_tokens")
        nxt = draw.draw(st.integers(0, s_kv + 1), label="next_tokens")
        attrs |= {"pre_tokens": pre, "next_tokens": nxt}
        visible &= (offset >= -pre) & (offset <= nxt)
    band_visible = int(visible[0, 0].sum())
    inputs = [to_layout(t, layout) for t in (q, k, v)]
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.4
        # no row may be all masked: the band always leaves query i key i (i < S_kv) or key 0 (i >= S_kv)
        mask[..., 0] = False
        diagonal = np.arange(min(s, s_kv))
        mask[..., diagonal, diagonal] = False
        visible &= ~np.broadcast_to(mask, visible.shape)
        inputs.append(mask.astype(mask_dtype))  # nonzero = masked
    expected = attention_reference(f64(q), f64(k), f64(v), visible, 1 / math.sqrt(d) if scale is None else scale)
    (out,), kernel = run_op("PromptFlashAttention", inputs, [spec_of(inputs[0])], attrs)
    assert_matches(from_layout(out, layout, n), expected, scale=4)
    assert kernel.cost.flops == 4 * b * n * band_visible * d


def test_prompt_attention_band_when_the_query_is_longer_than_the_keys():
    """query i sees key j when -pre_tokens <= j - i <= next_tokens, also when S > S_kv: here S = 6, S_kv = 3,
    pre_tokens = 3, so query 4 no longer sees key 0 and query 5 sees only key 2."""
    rng = np.random.default_rng(12)
    s, s_kv, d = 6, 3, 4
    q, k, v = data(rng, F32, (1, 1, s, d)), data(rng, F32, (1, 1, s_kv, d)), data(rng, F32, (1, 1, s_kv, d))
    visible = np.array([[j - i >= -3 for j in range(s_kv)] for i in range(s)])
    assert visible.sum() == 3 + 3 + 3 + 3 + 2 + 1
    expected = attention_reference(f64(q), f64(k), f64(v), visible[None, None], 1 / math.sqrt(d))
    attrs = {"num_heads": 1, "input_layout": "BNSD", "pre_tokens": 3}
    (out,), kernel = run_op("PromptFlashAttention", [q, k, v], [spec_of(q)], attrs)
    assert kernel.cost.flops == 4 * 1 * 1 * 15 * d
    assert_matches(out, expected, scale=4)


@FAST
@given(s=st.integers(1, 12), s_kv=st.integers(1, 12), pre=st.integers(-14, 14), nxt=st.integers(-14, 14))
def test_band_pairs_counts_what_the_band_mask_leaves(s, s_kv, pre, nxt):
    offset = np.arange(s_kv)[None, :] - np.arange(s)[:, None]  # j - i
    assert band_pairs(s, s_kv, pre, nxt) == int(((offset >= -pre) & (offset <= nxt)).sum())


def test_causal_prompt_attention_at_16k_tokens_costs_without_a_mask_in_memory():
    """Binding a 16k-token causal prefill (Qwen2.5-7B's 28 heads) allocates nothing of S x S: the visible
    pairs are counted in closed form."""
    s, n, n_kv, d = 16384, 28, 4, 128
    q, kv = spec(BF16, (1, s, n * d)), spec(BF16, (1, s, n_kv * d))
    tracemalloc.start()
    try:
        kernel = bind("PromptFlashAttention", [q, kv, kv], [q], {"num_heads": n, "num_key_value_heads": n_kv,
                                                                 "next_tokens": 0})  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    visible = s * (s + 1) // 2
    assert kernel.cost == mix(4 * n * visible * d, 2 * (q.nbytes + kv.nbytes), tiles=n * s // 128,
                              keys_per_row=visible / s)  # fmt: skip


@pytest.mark.parametrize("mask_shape", [None, (1, 1, 9, 7), (2, 3, 1, 7)], ids=["band", "mask-rows", "mask-keys"])
def test_prompt_attention_in_chunks_of_query_rows_matches_the_reference(monkeypatch, mask_shape):
    """With room for one query row of scores at a time, every chunk masks its own rows (band and atten_mask,
    whether the mask has a query axis or broadcasts over it) and the result is the whole computation's."""
    monkeypatch.setattr(attention, "SCORE_CHUNK", 1)
    rng = np.random.default_rng(21)
    b, n, n_kv, s, s_kv, d = 2, 3, 1, 9, 7, 4
    q, k, v = data(rng, F32, (b, n, s, d)), data(rng, F32, (b, n_kv, s_kv, d)), data(rng, F32, (b, n_kv, s_kv, d))
    attrs = {"num_heads": n, "num_key_value_heads": n_kv, "input_layout": "BNSD", "pre_tokens": 4, "next_tokens": 1}
    offset = np.arange(s_kv)[None, :] - np.arange(s)[:, None]
    visible = np.broadcast_to((offset >= -4) & (offset <= 1), (b, n, s, s_kv)).copy()
    inputs = [q, k, v]
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.3
        mask[..., 0] = mask[..., 6] = False  # every row keeps a key: row i sees key 0 (i <= 4) or 6 (i >= 5)
        visible &= ~np.broadcast_to(mask, visible.shape)
        inputs.append(mask)
    expected = attention_reference(f64(q), f64(k), f64(v), visible, 1 / math.sqrt(d))
    (out,), _ = run_op("PromptFlashAttention", inputs, [spec_of(q)], attrs)
    assert_matches(out, expected, scale=4)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@FAST
@given(draw=st.data(), seed=SEEDS)
def test_incre_flash_attention_reads_each_cache_up_to_its_length(dtype, draw, seed):
    b = draw.draw(st.integers(1, 3), label="B")
    n_kv = draw.draw(st.integers(1, 2), label="N_kv")
    n = n_kv * draw.draw(st.integers(1, 3), label="group")
    s_kv = draw.draw(st.integers(1, 8), label="S_kv")
    d = draw.draw(st.sampled_from([2, 4, 8]), label="D")
    layout = draw.draw(st.sampled_from(["BSH", "BNSD"]), label="layout")
    scale = draw.draw(SCALES, label="scale")
    lengths = draw.draw(st.one_of(st.none(), st.lists(st.integers(1, s_kv), min_size=b, max_size=b)), label="lengths")
    rng = np.random.default_rng(seed)
    q, k, v = data(rng, dtype, (b, n, 1, d)), data(rng, dtype, (b, n_kv, s_kv, d)), data(rng, dtype, (b, n_kv, s_kv, d))
    used = [s_kv] * b if lengths is None else lengths
    for bi, length in enumerate(used):  # stale cache entries past each length: large, so they would show
        k[bi, :, length:] = data(rng, dtype, (n_kv, s_kv - length, d), -60, 60)
        v[bi, :, length:] = data(rng, dtype, (n_kv, s_kv - length, d), -60, 60)
    attrs = attention_attrs(n, n_kv, layout, scale, draw.draw(st.booleans(), label="default layout"))
    if lengths is not None:
        attrs["actual_seq_lengths"] = lengths
    visible = np.zeros((b, n, 1, s_kv), bool)
    for bi, length in enumerate(used):
        visible[bi, :, :, :length] = True
    expected = attention_reference(f64(q), f64(k), f64(v), visible, 1 / math.sqrt(d) if scale is None else scale)
    inputs = [to_layout(t, layout) for t in (q, k, v)]
    (out,), kernel = run_op("IncreFlashAttention", inputs, [spec_of(inputs[0])], attrs)
    assert_matches(from_layout(out, layout, n), expected, scale=4)
    total = sum(used)
    assert kernel.cost.flops == 4 * n * total * d
    assert kernel.cost.hbm_bytes == 2 * q.nbytes + 2 * total * n_kv * d * dtype.itemsize


def test_incre_attention_ignores_whatever_lies_past_a_length():
    """A reused KV cache can hold anything past a request's length, NaN included; none of it is read."""
    rng = np.random.default_rng(13)
    b, n, d, s_kv = 2, 2, 4, 6
    q, k, v = data(rng, F16, (b, 1, n * d)), data(rng, F16, (b, s_kv, n * d)), data(rng, F16, (b, s_kv, n * d))
    lengths = [2, 5]
    for bi, length in enumerate(lengths):
        k[bi, length:] = np.nan
        v[bi, length:] = np.nan
    visible = np.zeros((b, n, 1, s_kv), bool)
    for bi, length in enumerate(lengths):
        visible[bi, :, :, :length] = True
    clean_k, clean_v = np.nan_to_num(f64(k)), np.nan_to_num(f64(v))  # the reference masks, so NaN must not enter
    expected = attention_reference(
        from_layout(f64(q), "BSH", n), from_layout(clean_k, "BSH", n), from_layout(clean_v, "BSH", n), visible, 0.5
    )
    attrs = {"num_heads": n, "actual_seq_lengths": lengths}
    (out,), _ = run_op("IncreFlashAttention", [q, k, v], [spec_of(q)], attrs)
    assert np.isfinite(f64(out)).all()
    assert_matches(from_layout(out, "BSH", n), expected, scale=4)


def paged(cache: np.ndarray, table: np.ndarray, lengths: list[int], num_blocks: int) -> np.ndarray:
    """Contiguous per-request caches [B, S_kv, H] written into a pool of blocks through a block table. Rows no
    request uses hold NaN, so reading one would show."""
    block_size = -(-cache.shape[1] // table.shape[1])
    pool = np.full((num_blocks, block_size, cache.shape[2]), np.nan, cache.dtype)
    for i, length in enumerate(lengths):
        for t in range(length):
            pool[table[i, t // block_size], t % block_size] = cache[i, t]
    return pool


def test_paged_incre_attention_reads_each_request_through_its_block_table():
    """Paged mode gives what the contiguous cache gives, bit for bit, reading only the tokens in use (same cost
    but for the block table's bytes)."""
    rng = np.random.default_rng(21)
    b, n, n_kv, d, s_kv, block_size = 3, 4, 2, 8, 12, 4
    q = data(rng, F16, (b, 1, n * d))
    k, v = data(rng, F16, (b, s_kv, n_kv * d)), data(rng, F16, (b, s_kv, n_kv * d))
    lengths = [5, 12, 1]
    attrs = {"num_heads": n, "num_key_value_heads": n_kv, "actual_seq_lengths": lengths}
    (expected,), contiguous = run_op("IncreFlashAttention", [q, k, v], [spec_of(q)], attrs)
    num_blocks = b * s_kv // block_size + 1  # one spare block nobody owns
    table = rng.permutation(num_blocks)[: b * s_kv // block_size].reshape(b, -1).astype(np.int32)
    pools = [paged(cache, table, lengths, num_blocks) for cache in (k, v)]
    (out,), kernel = run_op(
        "IncreFlashAttention", [q, *pools, table], [spec_of(q)], {**attrs, "block_size": block_size}
    )
    np.testing.assert_array_equal(out, expected)
    assert kernel.cost.flops == contiguous.cost.flops
    assert kernel.cost.hbm_bytes == contiguous.cost.hbm_bytes + table.nbytes


@pytest.mark.parametrize(
    ("pool", "table", "attrs", "match"),
    [
        ((5, 4, 8), spec(I32, (2, 3)), {}, "attr block_size"),
        ((5, 4, 16), spec(I32, (2, 3)), {"block_size": 4}, "key"),
        ((5, 4, 8), spec(I64, (2, 3)), {"block_size": 4}, "block_table"),
        ((5, 4, 8), spec(I32, (1, 3)), {"block_size": 4}, "block_table"),
        ((5, 4, 8), spec(I32, (2, 3)), {"block_size": 4, "actual_seq_lengths": [4, 13]}, "attr actual_seq_lengths"),
    ],
)
def test_paged_incre_attention_checks_its_pool_and_table(pool, table, attrs, match):
    """Two requests of up to 3 blocks of 4 tokens; query 2 heads x 8, one KV head."""
    q = spec(F16, (2, 1, 16))
    attrs = {"num_heads": 2, "num_key_value_heads": 1, "actual_seq_lengths": [4, 12], **attrs}
    with pytest.raises(InvalidParam, match=f"IncreFlashAttention {match}"):
        bind("IncreFlashAttention", [q, spec(F16, pool), spec(F16, pool), table], [q], attrs)


def test_paged_incre_attention_refuses_a_block_outside_the_pool():
    q, pool = np.zeros((1, 1, 16), np.float16), np.zeros((2, 4, 8), np.float16)
    attrs = {"num_heads": 2, "num_key_value_heads": 1, "actual_seq_lengths": [6], "block_size": 4}
    with pytest.raises(InvalidParam, match="block_table: row 0 names blocks outside"):
        run_op("IncreFlashAttention", [q, pool, pool, np.array([[1, 2]], np.int32)], [spec_of(q)], attrs)


# -- costs -----------------------------------------------------------------------------------------------


def vector(hbm_bytes: int, tiles: int = 1) -> Cost:
    return Cost(hbm_bytes=hbm_bytes, unit=Unit.VECTOR, tiles=tiles)


def cube(flops: int, hbm_bytes: int, tiles: int, k: int, fp32: bool = False) -> Cost:
    """A GEMM's cost: FLOPs on dims padded to 16, efficiency over its (padded) K loop."""
    efficiency = CUBE_EFF_MAX * k / (k + CUBE_K0)
    return Cost(flops=flops, hbm_bytes=hbm_bytes, unit=Unit.CUBE, tiles=tiles,
                efficiency=efficiency * CUBE_FP32_RATE if fp32 else efficiency)  # fmt: skip


def mix(flops: int, hbm_bytes: int, tiles: int, keys_per_row: float) -> Cost:
    """A fused attention's cost: efficiency over the keys a query row sees on average."""
    efficiency = FA_EFF_MAX * keys_per_row / (keys_per_row + FA_L0)
    return Cost(flops=flops, hbm_bytes=hbm_bytes, unit=Unit.MIX, tiles=tiles, efficiency=efficiency)


COST_CASES = [
    # elementwise ops: every input read once, every output written once, in unified-buffer tiles of 96 KiB
    pytest.param(
        "Add", [spec(F16, (4, 8)), spec(F16, (8,))], [spec(F16, (4, 8))], {}, vector((32 + 8 + 32) * 2), id="Add"
    ),  # fmt: skip
    pytest.param("Div", [spec(I32, (5,))] * 2, [spec(I32, (5,))], {}, vector(3 * 5 * 4), id="Div"),
    pytest.param("Cast", [spec(F32, (3, 5))], [spec(F16, (3, 5))], {"dst_type": 1}, vector(15 * 4 + 15 * 2), id="Cast"),
    pytest.param(
        "Cast",
        [spec(F32, (1024, 1024))],
        [spec(F16, (1024, 1024))],
        {"dst_type": 1},
        vector(6 << 20, tiles=64),  # 6 MiB in 96 KiB tiles
        id="Cast-large",
    ),
    pytest.param("Swish", [spec(BF16, (2, 3, 4))], [spec(BF16, (2, 3, 4))], {}, vector(24 * 2 * 2), id="Swish"),
    pytest.param("Gelu", [spec(F16, (8,))], [spec(F16, (8,))], {}, vector(8 * 2 * 2), id="Gelu"),
    pytest.param("SwiGlu", [spec(F32, (2, 8))], [spec(F32, (2, 4))], {}, vector((16 + 8) * 4), id="SwiGlu"),
    # row-wise ops: one tile per row
    pytest.param(
        "SoftmaxV2", [spec(F32, (4, 16))], [spec(F32, (4, 16))], {}, vector(64 * 4 * 2, tiles=4), id="Softmax"
    ),
    pytest.param(
        "RmsNorm",
        [spec(BF16, (2, 3, 8)), spec(BF16, (8,))],
        [spec(BF16, (2, 3, 8)), spec(F32, (2, 3, 1))],
        {},
        vector(48 * 2 + 8 * 2 + 48 * 2 + 6 * 4, tiles=6),  # x, gamma, y, rstd
        id="RmsNorm",
    ),
    pytest.param(
        "AddRmsNorm",
        [spec(F16, (2, 8)), spec(F16, (2, 8)), spec(F16, (8,))],
        [spec(F16, (2, 8)), spec(F32, (2, 1)), spec(F16, (2, 8))],
        {},
        vector((16 + 16 + 8) * 2 + 16 * 2 + 2 * 4 + 16 * 2, tiles=2),  # x1, x2, gamma, y, rstd, x
        id="AddRmsNorm",
    ),
    pytest.param(
        "LayerNorm",
        [spec(F32, (2, 3, 4)), spec(F32, (3, 4)), spec(F32, (3, 4))],
        [spec(F32, (2, 3, 4)), spec(F32, (2, 1, 1)), spec(F32, (2, 1, 1))],
        {"begin_norm_axis": 1, "begin_params_axis": 1},
        vector((24 + 12 + 12) * 4 + (24 + 2 + 2) * 4, tiles=2),
        id="LayerNorm",
    ),
    pytest.param(
        "RotaryMul",
        [spec(F32, (2, 4, 8)), spec(F32, (4, 8)), spec(F32, (4, 8))],
        [spec(F32, (2, 4, 8))],
        {},
        vector((64 + 32 + 32 + 64) * 4),
        id="RotaryMul",
    ),
    pytest.param(
        "ApplyRotaryPosEmb",
        [spec(F16, (1, 4, 2, 8)), spec(F16, (1, 4, 1, 8)), spec(F16, (1, 4, 1, 8)), spec(F16, (1, 4, 1, 8))],
        [spec(F16, (1, 4, 2, 8)), spec(F16, (1, 4, 1, 8))],
        {},
        vector((64 + 32 + 32 + 32 + 64 + 32) * 2),
        id="ApplyRotaryPosEmb",
    ),
    pytest.param(
        "ConcatD",
        [spec(I32, (2, 3)), spec(I32, (2, 5))],
        [spec(I32, (2, 8))],
        {"concat_dim": 1},
        vector((6 + 10 + 16) * 4),
        id="ConcatD",
    ),
    pytest.param(
        "Transpose",
        [spec(BF16, (2, 3, 4))],
        [spec(BF16, (4, 2, 3))],
        {"perm": [2, 0, 1]},
        vector(24 * 2 * 2),
        id="Transpose",
    ),
    pytest.param(
        "ArgMaxV2",
        [spec(F16, (4, 10))],
        [spec(I64, (4,))],
        {"dtype": 9},
        vector(40 * 2 + 4 * 8, tiles=4),
        id="ArgMaxV2",
    ),  # fmt: skip
    # gathers and scatters move only the rows they touch, one tile per row
    pytest.param(
        "GatherV2",
        [spec(F32, (100, 16)), spec(I32, (2, 5))],
        [spec(F32, (2, 5, 16))],
        {},
        vector(10 * 4 + 2 * (160 * 4), tiles=10),  # indices + the rows read + the rows written
        id="GatherV2",
    ),
    pytest.param(
        "ScatterUpdate",
        [spec(F16, (10, 4, 8)), spec(I64, (3,)), spec(F16, (3, 4, 8))],
        [spec(F16, (10, 4, 8))],
        {},
        vector(3 * 8 + 2 * (96 * 2), tiles=3),  # indices + the updates read + the rows written
        id="ScatterUpdate",
    ),
    pytest.param("Reshape", [spec(F32, (2, 3, 4))], [spec(F32, (6, 4))], {}, vector(0), id="Reshape"),
    # cube work: 2*M*N*K FLOPs per batch entry, on dims padded to 16
    pytest.param(
        "MatMulV2",
        [spec(F16, (32, 16)), spec(F16, (32, 8)), spec(F16, (8,))],  # x1 transposed: M = 16, K = 32; N = 8
        [spec(F16, (16, 8))],
        {"transpose_x1": True},
        cube(2 * 16 * 16 * 32, (512 + 256 + 8 + 128) * 2, tiles=1, k=32),
        id="MatMulV2",
    ),
    pytest.param(
        "BatchMatMulV2",
        [spec(F32, (3, 1, 4, 5)), spec(F32, (2, 6, 5))],  # M = 4, K = 5, N = 6 (adj_x2), batch 3 x 2
        [spec(F32, (3, 2, 4, 6))],
        {"adj_x2": True},
        cube(2 * 16 * 16 * 16 * (3 * 2), (60 + 60 + 144) * 4, tiles=6, k=16, fp32=True),  # a 16 x 128 block each
        id="BatchMatMulV2",
    ),
    # prompt attention: 4*B*N*visible*D FLOPs; B x N x ceil(S / 128) query blocks; B = 2, S = 8, N = 4,
    # N_kv = 2, D = 16
    pytest.param(
        "PromptFlashAttention",
        [spec(F16, (2, 8, 64)), spec(F16, (2, 8, 32)), spec(F16, (2, 8, 32))],
        [spec(F16, (2, 8, 64))],
        {"num_heads": 4, "num_key_value_heads": 2},
        mix(4 * 2 * 4 * 8 * 8 * 16, (1024 + 512 + 512 + 1024) * 2, tiles=8, keys_per_row=8),
        id="PromptFlashAttention",
    ),
    pytest.param(
        "PromptFlashAttention",
        [spec(F16, (2, 8, 64)), spec(F16, (2, 8, 32)), spec(F16, (2, 8, 32))],
        [spec(F16, (2, 8, 64))],
        {"num_heads": 4, "num_key_value_heads": 2, "next_tokens": 0},
        mix(4 * 2 * 4 * (8 * 9 // 2) * 16, (1024 + 512 + 512 + 1024) * 2, tiles=8, keys_per_row=36 / 8),  # causal
        id="PromptFlashAttention-causal",
    ),
    pytest.param(
        "PromptFlashAttention",
        [spec(F32, (1, 2, 8, 4))] * 3,  # BNSD, S = S_kv = 8, pre_tokens 2, next_tokens 1
        [spec(F32, (1, 2, 8, 4))],
        {"num_heads": 2, "input_layout": "BNSD", "pre_tokens": 2, "next_tokens": 1},
        mix(4 * 1 * 2 * 28 * 4, 4 * 64 * 4, tiles=2, keys_per_row=28 / 8),  # rows 0, 1, 2-6, 7 see 2, 3, 4, 3
        id="PromptFlashAttention-band",
    ),
    pytest.param(
        "PromptFlashAttention",
        [spec(F32, (1, 4, 6)), spec(F32, (1, 6, 6)), spec(F32, (1, 6, 6))],  # S = 4 < S_kv = 6, N = 1, D = 6
        [spec(F32, (1, 4, 6))],
        {"num_heads": 1, "next_tokens": 0},
        mix(4 * 1 * 1 * (1 + 2 + 3 + 4) * 6, (24 + 36 + 36 + 24) * 4, tiles=1, keys_per_row=10 / 4),
        id="PromptFlashAttention-causal-prefix",
    ),
    # decode attention: 4*N*sum(lengths)*D; HBM = query + output + K and V up to each length; one tile per
    # KV head and 512-token split of each cache
    pytest.param(
        "IncreFlashAttention",
        [spec(F16, (3, 1, 128)), spec(F16, (3, 10, 32)), spec(F16, (3, 10, 32))],  # N = 8, N_kv = 2, D = 16
        [spec(F16, (3, 1, 128))],
        {"num_heads": 8, "num_key_value_heads": 2, "actual_seq_lengths": [3, 10, 5]},
        mix(4 * 8 * 18 * 16, 384 * 2 + 384 * 2 + 2 * 18 * 2 * 16 * 2, tiles=2 * 3, keys_per_row=18 / 3),
        id="IncreFlashAttention",
    ),
    pytest.param(
        "IncreFlashAttention",
        [spec(BF16, (2, 4, 1, 8)), spec(BF16, (2, 4, 5, 8)), spec(BF16, (2, 4, 5, 8))],  # BNSD, whole caches
        [spec(BF16, (2, 4, 1, 8))],
        {"num_heads": 4, "input_layout": "BNSD"},
        mix(4 * 4 * (5 + 5) * 8, 64 * 2 + 64 * 2 + 2 * 10 * 4 * 8 * 2, tiles=4 * 2, keys_per_row=5),
        id="IncreFlashAttention-full",
    ),
    pytest.param(
        "IncreFlashAttention",
        [spec(F16, (1, 1, 256)), spec(F16, (1, 1300, 256)), spec(F16, (1, 1300, 256))],  # N = N_kv = 2, D = 128
        [spec(F16, (1, 1, 256))],
        {"num_heads": 2},
        mix(4 * 2 * 1300 * 128, 512 * 2 + 2 * 1300 * 256 * 2, tiles=2 * 3, keys_per_row=1300),  # 3 splits a head
        id="IncreFlashAttention-split",
    ),
]


@pytest.mark.parametrize(("op_type", "ins", "outs", "attrs", "expected"), COST_CASES)
def test_cost_follows_the_documented_rule(op_type, ins, outs, attrs, expected):
    kernel = bind(op_type, ins, outs, attrs)
    assert kernel.cost == expected
    assert KernelTask(kernel, (), ()).cost() == expected


@pytest.mark.parametrize(("op_type", "ins", "outs", "attrs", "expected"), COST_CASES)
def test_timing_mode_computes_nothing_and_costs_the_same(op_type, ins, outs, attrs, expected):
    timing = DeviceMemory(1 << 40, backed=False)
    in_regions = tuple(Region(timing.alloc(t.nbytes), 0, t.nbytes) for t in ins)
    out_regions = tuple(Region(timing.alloc(t.nbytes), 0, t.nbytes) for t in outs)
    task = KernelTask(bind(op_type, ins, outs, attrs), in_regions, out_regions)
    task.run()
    for region in out_regions:
        assert region.buffer.data is None
        assert region.read() == bytes(region.size)
    # the same description on backed memory (zeros are valid data for every op here) costs the same
    _, numeric, _ = launch(op_type, [np.zeros(t.shape, t.dtype) for t in ins], outs, attrs)
    assert task.cost() == numeric.cost == expected


def test_timing_mode_prices_a_model_sized_matmul_without_host_memory():
    m, k, n = 16, 8192, 65536  # a 1 GiB bfloat16 weight
    timing = DeviceMemory(64 << 30, backed=False)
    ins = [spec(BF16, (m, k)), spec(BF16, (k, n))]
    outs = [spec(BF16, (m, n))]
    regions = [Region(timing.alloc(t.nbytes), 0, t.nbytes) for t in (*ins, *outs)]
    task = KernelTask(bind("MatMulV2", ins, outs, {}), tuple(regions[:2]), tuple(regions[2:]))
    task.run()
    assert all(r.buffer.data is None for r in regions)
    cost = task.cost()
    assert (cost.flops, cost.hbm_bytes, cost.unit) == (2 * m * n * k, (m * k + k * n + m * n) * 2, Unit.CUBE)


# Modeled BF16 torch.mm throughput against what a 910B2 measured (github.com/zzc0721/torch-performance-test-data,
# issue #109): the model is deterministic, so these are properties of the calibration, not timings.
B2 = profile("910B2")


def modeled_tflops(m: int, k: int, n: int) -> float:
    kernel = bind("MatMulV2", [spec(BF16, (m, k)), spec(BF16, (k, n))], [spec(BF16, (m, n))], {})
    return 2 * m * n * k / timing.alone(B2, kernel.cost) / 1e12


@pytest.mark.parametrize(("size", "measured"), [(4096, 315.36), (8192, 301.23)])
def test_large_gemm_models_the_measured_910b2_throughput(size, measured):
    assert modeled_tflops(size, size, size) == pytest.approx(measured, rel=0.15)


def test_smaller_gemms_reach_less_of_the_peak():
    sizes = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    tflops = [modeled_tflops(n, n, n) for n in sizes]
    assert tflops == sorted(tflops), dict(zip(sizes, tflops, strict=True))
    efficiency = [bind("MatMulV2", [spec(BF16, (n, n))] * 2, [spec(BF16, (n, n))], {}).cost.efficiency for n in sizes]
    assert efficiency == sorted(efficiency)


@pytest.mark.parametrize(
    ("m", "k", "n", "tiles"),
    [
        (4096, 4096, 4096, 32 * 16),  # 128 x 256 blocks
        (1, 4096, 4096, 16),  # 16 x 256: baseM shrinks to the padded M
        (16, 5120, 1024, 8),  # 16 x 128: 8 blocks, as a profiled Qwen3 k/v projection on an A3 die launched
        (1, 3584, 18944, 148),  # 16 x 128: 148 blocks in 7 rounds of 24 beat 74 of 256 in 4
    ],
)
def test_gemm_tiles_follow_the_cann_base_block_choice(m, k, n, tiles):
    kernel = bind("MatMulV2", [spec(BF16, (m, k)), spec(BF16, (k, n))], [spec(BF16, (m, n))], {})
    assert kernel.cost.tiles == tiles


# -- errors ----------------------------------------------------------------------------------------------


def test_an_unknown_op_is_op_not_found():
    with pytest.raises(OpNotFound) as caught:
        bind("FlashAttentionScoreV9", [spec(F16, (2, 2))], [spec(F16, (2, 2))], {})
    assert caught.value.code == AclError.OP_NOT_FOUND == 100024
    assert isinstance(caught.value, FlexNPUError)
    assert "FlashAttentionScoreV9" in str(caught.value)


def q16(*shape):
    return spec(F16, shape)


ERROR_CASES = [
    # (op, inputs, declared outputs, attrs, "op operand" the message must name)
    ("Add", [spec(F32, (2, 3)), spec(F16, (2, 3))], [spec(F32, (2, 3))], {}, "Add x2"),
    ("Add", [spec(F32, (2, 3)), spec(F32, (4,))], [spec(F32, (2, 3))], {}, "Add x2"),
    ("Add", [spec(F32, (2, 3)), spec(F32, (3,))], [spec(F32, (3, 2))], {}, "Add output 0"),
    ("Add", [spec(F32, (2, 3)), spec(F32, (3,))], [spec(F16, (2, 3))], {}, "Add output 0"),
    ("Add", [spec(F32, (2, 3)), spec(F32, (3,))], [spec(F32, (2, 3)), spec(F32, (2, 3))], {}, "Add outputs"),
    ("Mul", [spec(I32, (4,)), spec(I64, (4,))], [spec(I32, (4,))], {}, "Mul x2"),
    ("Div", [spec(I8, (4,)), spec(I8, (5,))], [spec(I8, (4,))], {}, "Div x2"),
    ("Cast", [spec(F32, (2,))], [spec(F16, (2,))], {}, "Cast attr dst_type"),
    ("Cast", [spec(F32, (2,))], [spec(F16, (2,))], {"dst_type": 99}, "Cast attr dst_type"),
    ("Cast", [spec(F32, (2,))], [spec(F16, (2,))], {"dst_type": 27}, "Cast output 0"),
    ("Swish", [spec(I32, (4,))], [spec(I32, (4,))], {}, "Swish x"),
    ("Gelu", [spec(I8, (4,))], [spec(I8, (4,))], {}, "Gelu x"),
    ("SwiGlu", [spec(F32, (2, 5))], [spec(F32, (2, 2))], {}, "SwiGlu x"),
    ("SwiGlu", [spec(F32, (2, 4))], [spec(F32, (2, 2))], {"dim": 2}, "SwiGlu attr dim"),
    ("SoftmaxV2", [spec(F32, (2, 3))], [spec(F32, (2, 3))], {"axes": [2]}, "SoftmaxV2 attr axes"),
    ("SoftmaxV2", [spec(BOOL, (2, 3))], [spec(BOOL, (2, 3))], {}, "SoftmaxV2 x"),
    ("RmsNorm", [q16(2, 8), q16(4)], [q16(2, 8), spec(F32, (2, 1))], {}, "RmsNorm gamma"),
    ("RmsNorm", [q16(2, 8), spec(F32, (8,))], [q16(2, 8), spec(F32, (2, 1))], {}, "RmsNorm gamma"),
    ("RmsNorm", [q16(2, 8), q16(8)], [q16(2, 8), q16(2, 1)], {}, "RmsNorm output 1"),
    ("RmsNorm", [q16(2, 8), q16(8)], [q16(2, 8)], {}, "RmsNorm outputs"),
    ("AddRmsNorm", [q16(2, 8), q16(3, 8), q16(8)], [q16(2, 8), spec(F32, (2, 1)), q16(2, 8)], {}, "AddRmsNorm x2"),
    (
        "LayerNorm",
        [q16(2, 3, 4), q16(4), q16(3)],
        [q16(2, 3, 4), spec(F32, (2, 3, 1)), spec(F32, (2, 3, 1))],
        {},
        "LayerNorm beta",
    ),
    (
        "LayerNorm",
        [q16(2, 3, 4), q16(4), q16(4)],
        [q16(2, 3, 4)],
        {"begin_norm_axis": 3},
        "LayerNorm attr begin_norm_axis",
    ),
    (
        "LayerNorm",  # begin_params_axis 1: gamma and beta are x's shape from dim 1, [3, 4]
        [q16(2, 3, 4), q16(4), q16(4)],
        [q16(2, 3, 4), spec(F32, (2, 1, 1)), spec(F32, (2, 1, 1))],
        {"begin_norm_axis": 1, "begin_params_axis": 1},
        "LayerNorm gamma",
    ),
    ("MatMulV2", [q16(4, 5), q16(6, 3)], [q16(4, 3)], {}, "MatMulV2 x2"),
    ("MatMulV2", [q16(4, 5), q16(5, 3)], [q16(4, 3)], {"transpose_x2": True}, "MatMulV2 x2"),
    ("MatMulV2", [q16(4, 5), spec(F32, (5, 3))], [q16(4, 3)], {}, "MatMulV2 x2"),
    ("MatMulV2", [q16(4, 5), q16(5, 3), q16(4)], [q16(4, 3)], {}, "MatMulV2 bias"),
    ("MatMulV2", [q16(4, 5), q16(5, 3), spec(F32, (3,))], [q16(4, 3)], {}, "MatMulV2 bias"),
    ("MatMulV2", [q16(4, 5), q16(5, 3)], [q16(3, 4)], {}, "MatMulV2 output 0"),
    ("MatMulV2", [q16(5), q16(5, 3)], [q16(3)], {}, "MatMulV2 x1"),
    ("MatMulV2", [q16(5, 3), q16(5)], [q16(5)], {}, "MatMulV2 x2"),
    ("MatMulV2", [q16(4, 5), q16(2, 5, 3)], [q16(2, 4, 3)], {}, "MatMulV2 x2"),  # batched x2: BatchMatMulV2's job
    ("BatchMatMulV2", [spec(F32, (2, 4, 5)), spec(F32, (3, 5, 6))], [spec(F32, (2, 4, 6))], {}, "BatchMatMulV2 x2"),
    ("BatchMatMulV2", [spec(F32, (2, 4, 5)), spec(F32, (2, 6, 5))], [spec(F32, (2, 4, 6))], {}, "BatchMatMulV2 x2"),
    ("GatherV2", [spec(F32, (5, 4)), spec(F32, (3,))], [spec(F32, (3, 4))], {}, "GatherV2 indices"),
    ("GatherV2", [spec(F32, (5, 4)), spec(I32, (3,))], [spec(F32, (3, 4))], {"axis": 2}, "GatherV2 attr axis"),
    ("ConcatD", [spec(F32, (2, 3)), spec(F32, (3, 3))], [spec(F32, (2, 6))], {"concat_dim": 1}, "ConcatD input 1"),
    ("ConcatD", [spec(F32, (2, 3)), spec(F16, (2, 3))], [spec(F32, (4, 3))], {}, "ConcatD input 1"),
    ("Transpose", [spec(F32, (2, 3, 4))], [spec(F32, (4, 3, 2))], {"perm": [2, 1, 1]}, "Transpose attr perm"),
    ("Transpose", [spec(F32, (2, 3, 4))], [spec(F32, (2, 4, 3))], {"perm": [2, 1, 0]}, "Transpose output 0"),
    ("Reshape", [spec(F32, (2, 3))], [spec(F32, (4, 2))], {}, "Reshape output 0"),
    ("Reshape", [spec(F32, (2, 3))], [spec(F16, (3, 2))], {}, "Reshape output 0"),
    ("ArgMaxV2", [spec(F32, (2, 3))], [spec(I32, (2,))], {"dtype": 5}, "ArgMaxV2 attr dtype"),
    ("ArgMaxV2", [spec(F32, (2, 3))], [spec(I32, (2,))], {"dimension": 2}, "ArgMaxV2 attr dimension"),
    ("ArgMaxV2", [spec(F32, (2, 3))], [spec(I64, (2,))], {}, "ArgMaxV2 output 0"),
    ("ScatterUpdate", [q16(8, 4), spec(I32, (2,)), q16(3, 4)], [q16(8, 4)], {}, "ScatterUpdate updates"),
    ("ScatterUpdate", [q16(8, 4), spec(I32, (2,)), spec(F32, (2, 4))], [q16(8, 4)], {}, "ScatterUpdate updates"),
    ("ScatterUpdate", [q16(8, 4), q16(2), q16(2, 4)], [q16(8, 4)], {}, "ScatterUpdate indices"),
    ("RotaryMul", [q16(2, 4, 8), q16(4, 6), q16(4, 8)], [q16(2, 4, 8)], {}, "RotaryMul r1"),
    ("RotaryMul", [q16(2, 4, 8), q16(4, 8), q16(3, 2, 4, 8)], [q16(2, 4, 8)], {}, "RotaryMul r2"),
    ("RotaryMul", [q16(2, 4, 7), q16(4, 7), q16(4, 7)], [q16(2, 4, 7)], {}, "RotaryMul x"),
    ("PromptFlashAttention", [q16(1, 4, 16)] * 3, [q16(1, 4, 16)], {}, "PromptFlashAttention attr num_heads"),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16)] * 3,
        [q16(1, 4, 16)],
        {"num_heads": 4, "num_key_value_heads": 3},
        "PromptFlashAttention attr num_key_value_heads",
    ),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16), q16(1, 4, 8), q16(1, 4, 8)],  # D = 8 for the query, 4 for the keys
        [q16(1, 4, 16)],
        {"num_heads": 2},
        "PromptFlashAttention key",
    ),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16), spec(F32, (1, 4, 16)), q16(1, 4, 16)],
        [q16(1, 4, 16)],
        {"num_heads": 2},
        "PromptFlashAttention key",
    ),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16), q16(1, 4, 16), q16(2, 4, 16)],
        [q16(1, 4, 16)],
        {"num_heads": 2},
        "PromptFlashAttention value",
    ),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16)] * 3,
        [q16(1, 4, 16)],
        {"num_heads": 2, "input_layout": "BNSD"},
        "PromptFlashAttention query",
    ),
    (
        "PromptFlashAttention",
        [q16(1, 4, 16)] * 3,
        [q16(1, 4, 16)],
        {"num_heads": 2, "input_layout": "SBH"},
        "PromptFlashAttention attr input_layout",
    ),
    ("IncreFlashAttention", [q16(2, 3, 16)] * 3, [q16(2, 3, 16)], {"num_heads": 2}, "IncreFlashAttention query"),
    (
        "IncreFlashAttention",
        [q16(2, 1, 16), q16(2, 5, 16), q16(2, 5, 16)],
        [q16(2, 1, 16)],
        {"num_heads": 2, "actual_seq_lengths": [5, 6]},
        "IncreFlashAttention attr actual_seq_lengths",
    ),
    (
        "IncreFlashAttention",
        [q16(2, 1, 16), q16(2, 5, 16), q16(2, 5, 16)],
        [q16(2, 1, 16)],
        {"num_heads": 2, "actual_seq_lengths": [5]},
        "IncreFlashAttention attr actual_seq_lengths",
    ),
    (
        "IncreFlashAttention",
        [q16(2, 1, 16), q16(2, 5, 16), q16(2, 5, 16)],
        [q16(2, 1, 16)],
        {"num_heads": 2, "actual_seq_lengths": [0, 3]},
        "IncreFlashAttention attr actual_seq_lengths",
    ),
    # input counts outside the op's range
    ("Add", [spec(F32, (2,))], [spec(F32, (2,))], {}, "Add inputs"),
    ("Add", [spec(F32, (2,))] * 3, [spec(F32, (2,))], {}, "Add inputs"),
    ("MatMulV2", [q16(2, 2)] * 4, [q16(2, 2)], {}, "MatMulV2 inputs"),
    ("RmsNorm", [q16(2, 8)], [q16(2, 8), spec(F32, (2, 1))], {}, "RmsNorm inputs"),
    ("ConcatD", [], [spec(F32, (2,))], {}, "ConcatD inputs"),
    ("IncreFlashAttention", [q16(2, 1, 16)] * 5, [q16(2, 1, 16)], {"num_heads": 2}, "IncreFlashAttention inputs"),
    ("PromptFlashAttention", [q16(1, 4, 16)] * 2, [q16(1, 4, 16)], {"num_heads": 2}, "PromptFlashAttention inputs"),
]


@pytest.mark.parametrize(("op_type", "ins", "outs", "attrs", "names"), ERROR_CASES, ids=[c[4] for c in ERROR_CASES])
def test_a_bad_description_is_invalid_param_naming_the_op_and_operand(op_type, ins, outs, attrs, names):
    with pytest.raises(InvalidParam) as caught:
        bind(op_type, ins, outs, attrs)
    assert caught.value.code == AclError.INVALID_PARAM == 100000
    assert names in str(caught.value)


@pytest.mark.parametrize(("count", "want"), [(1, "takes 2 inputs, got 1"), (3, "takes 2 inputs, got 3")])
def test_the_input_count_message_says_what_the_op_takes(count, want):
    with pytest.raises(InvalidParam, match=want):
        bind("Mul", [spec(F32, (2,))] * count, [spec(F32, (2,))], {})
    with pytest.raises(InvalidParam, match="takes 2-3 inputs, got 1"):
        bind("MatMul", [q16(2, 2)], [q16(2, 2)], {})


def test_prompt_attention_checks_the_mask_shape_when_bound():
    """atten_mask must broadcast to [B, N, S, S_kv]; a mask that cannot is a bad description, refused by bind()
    like any other operand, not a crash when the kernel runs."""
    q = q16(1, 6, 16)
    with pytest.raises(InvalidParam) as caught:
        bind("PromptFlashAttention", [q, q, q, spec(BOOL, (5, 7))], [q], {"num_heads": 2})
    assert caught.value.code == AclError.INVALID_PARAM
    assert "PromptFlashAttention atten_mask" in str(caught.value)


ROTARY_ERRORS = [
    # (query, key, cos, sin, names any of which the message may give as the bad operand)
    ((1, 4, 2, 7), (1, 4, 1, 7), (1, 4, 1, 7), (1, 4, 1, 7), ("query", "key")),
    ((1, 4, 2, 8), (1, 4, 1, 6), (1, 4, 1, 8), (1, 4, 1, 8), ("key", "cos")),
    ((1, 4, 2, 8), (1, 4, 1, 8), (1, 3, 1, 8), (1, 4, 1, 8), ("cos", "query")),
]


@pytest.mark.parametrize(("q", "k", "cos", "sin", "names"), ROTARY_ERRORS)
def test_apply_rotary_errors_name_apply_rotary_and_its_operands(q, k, cos, sin, names):
    ins = [q16(*q), q16(*k), q16(*cos), q16(*sin)]
    with pytest.raises(InvalidParam) as caught:
        bind("ApplyRotaryPosEmb", ins, [q16(*q), q16(*k)], {})
    message = str(caught.value)
    assert message.startswith("ApplyRotaryPosEmb "), message
    assert any(f"ApplyRotaryPosEmb {name}" in message for name in names), message


def test_out_of_range_indices_are_refused_when_the_kernel_runs():
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    with pytest.raises(InvalidParam, match="GatherV2 indices"):
        run_op("GatherV2", [table, np.array([1, 5], I32)], [spec(F32, (2, 4))])
    cache = np.arange(32, dtype=np.float16).reshape(8, 4)
    updates = np.ones((2, 4), F16)
    with pytest.raises(InvalidParam, match="ScatterUpdate indices"):
        launch("ScatterUpdate", [cache, np.array([2, 8], I64), updates], [spec_of(cache)], in_place={0: 0})


def test_a_tensor_input_must_agree_with_its_attribute():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with pytest.raises(InvalidParam, match="GatherV2 axis"):
        run_op("GatherV2", [x, np.array([0], I32), np.array([0], I32)], [spec(F32, (2, 1, 4))], {"axis": 1})
    with pytest.raises(InvalidParam, match="Transpose perm"):
        run_op("Transpose", [x, np.array([0, 2, 1], I32)], [spec(F32, (4, 3, 2))], {"perm": [2, 1, 0]})


# -- inputs no op's checks foresaw: each is the caller's error, never a daemon traceback ---------------------

UNFORESEEN_CASES = [
    # (op, inputs, outputs, attrs, what the message names) — each of these raised an internal exception at launch
    ("Transpose", [spec(F32, ())], [spec(F32, ())], {}, "Transpose attr perm: is required"),
    ("Transpose", [spec(F32, (2, 3))], [spec(F32, (3, 2))], {}, "Transpose attr perm: is required"),
    ("ArgMaxV2", [spec(F32, (0,))], [spec(I32, ())], {}, "ArgMaxV2 x: dimension 0 of [0] is empty"),
    ("ArgMaxV2", [spec(F32, (2, 0))], [spec(I32, (2,))], {}, "ArgMaxV2 x: dimension 1 of [2, 0] is empty"),
    ("SwiGlu", [spec(BOOL, (2, 4))], [spec(BOOL, (2, 2))], {}, "SwiGlu x: needs a float dtype, got bool"),
    ("SwiGlu", [spec(I32, (2, 4))], [spec(I32, (2, 2))], {}, "SwiGlu x: needs a float dtype"),
    ("SoftmaxV2", [spec(F32, (2, 0))], [spec(F32, (2, 0))], {}, "SoftmaxV2 x: dimension 1 of [2, 0] is empty"),
    ("RmsNorm", [spec(F32, (0,)), spec(F32, (0,))], [spec(F32, (0,)), spec(F32, (1,))], {}, "RmsNorm gamma"),
    ("RotaryMul", [spec(F32, ())] * 3, [spec(F32, ())], {}, "RotaryMul x: is a scalar"),
    ("RotaryMul", [spec(BOOL, (2, 4))] * 3, [spec(BOOL, (2, 4))], {}, "RotaryMul x: needs a float dtype"),
    ("ScatterUpdate", [spec(I32, ()), spec(I32, ()), spec(I32, ())], [spec(I32, ())], {}, "ScatterUpdate var"),
    ("SoftmaxV2", [spec(F32, (4, 8))], [spec(F32, (4, 8))], {"axes": -1}, "an attribute is wrong"),
]


@pytest.mark.parametrize(
    ("op_type", "ins", "outs", "attrs", "names"), UNFORESEEN_CASES, ids=[c[4] for c in UNFORESEEN_CASES]
)
def test_inputs_that_used_to_raise_inside_an_op_are_invalid_param_naming_the_operand(op_type, ins, outs, attrs, names):
    with pytest.raises(InvalidParam) as caught:
        bind(op_type, ins, outs, attrs)
    assert caught.value.code == AclError.INVALID_PARAM
    assert names in str(caught.value)


def test_no_op_raises_anything_but_an_acl_error_on_odd_shapes_and_dtypes():
    """Every registered op, every input count it takes, odd shapes (scalars, empty dims) and every dtype: bind()
    and the kernel's run either work or raise a FlexNPUError, so a tenant's launch can only fail its own stream."""
    from npu.emulated.ops.base import REGISTRY

    memory = DeviceMemory(1 << 30, backed=True)
    shapes = [(), (0,), (4,), (2, 0), (0, 4), (2, 4), (2, 3, 4), (1, 2, 2, 4)]
    attr_sets = [{}, {"perm": [1, 0]}, {"axis": 0}, {"dimension": 0}, {"dim": 0}, {"axes": [0]}]
    unforeseen = []
    for op in {type(o): o for o in REGISTRY.values()}.values():
        low, high = op.inputs
        for n in range(low, min(high, 4) + 1):
            for dtype in ALL_DTYPES:
                for shape in shapes:
                    for attrs in attr_sets:
                        ins = [spec(dtype, shape)] * n
                        try:
                            kernel = bind(op.name, ins, op.infer(list(ins), attrs, []), attrs)
                            regions = [
                                Region(memory.alloc(max(1, t.nbytes)), 0, t.nbytes) for t in (*ins, *kernel.outs)
                            ]
                            with warnings.catch_warnings():  # numpy's "mean of empty slice": as on the chip
                                warnings.simplefilter("ignore", RuntimeWarning)
                                KernelTask(kernel, tuple(regions[:n]), tuple(regions[n:])).run()
                        except FlexNPUError:
                            pass
                        except Exception as exc:  # noqa: BLE001 (what this test looks for)
                            unforeseen.append((op.name, dtype.name, shape, attrs, repr(exc)))
                        finally:
                            memory.used = 0
    assert unforeseen == []
