"""Forward kernels against the float64 reference `cynorm.slow`, and the forward API's contract.

Accuracy over norms x layouts x dtypes x affine parameters x odd sizes, statistics, the float32 accuracy
contract on data with a large mean, NaN confinement, memory layouts, `out=`, empty batches, inputs left
untouched and hypothesis-generated shapes.
"""
import mmap
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cynorm
from cynorm import slow
from cynorm.benchmarks import empty_past_cache_line

from _core_util import (FLOAT_DTYPES, FOUR_ROW_CASES, GROUP_BLOCK_CASES, LAYOUT_CASES, LAYOUTS, NARROW_COLUMN_CASES,
                        SHORT_ROW_CASES, SPLIT_CASES, WIDE_COLUMN_CASES, NormCase, assert_bitwise_equal, assert_close,
                        compute_dtype, dtype_name, norm_cases, random_array, random_params, run_forward_and_backward, with_layout)

ODD_SIZE_CASES = (
    NormCase("group", (3, 7, 11), 1, 7),  # prime channel count, 3-D input
    NormCase("group", (2, 13, 3, 3), 1, 1),
    NormCase("group", (2, 3, 3, 13), -1, 13),
    NormCase("group", (4, 8, 1, 1), 1, 4),  # spatial size 1
    NormCase("group", (4, 1, 1, 8), -1, 4),
    NormCase("group", (2, 6), 1, 2),  # no spatial axes
    NormCase("group", (2, 4, 3, 2, 3), 1, 2),  # 3-D images
    NormCase("group", (2, 3, 2, 3, 4), -1, 2),
    NormCase("group", (2, 64, 5, 5), 1, 32),
    NormCase("instance", (3, 7, 1), 1),
    NormCase("instance", (2, 8, 8, 64), -1),
    NormCase("layer", (3, 5000), -1),  # rows longer than 4096
    NormCase("layer", (2, 4097), -1),
    NormCase("layer", (7,), -1),  # a single row
    NormCase("layer", (2, 26, 26, 10), 1),  # the Keras tutorial's LayerNormalization(axis=1)
    NormCase("layer", (2, 5, 6, 7), (1, 2)),  # a block of middle axes
    NormCase("layer", (2, 3, 4, 5), (-3, -2, -1)),
    NormCase("rms", (3, 5000), -1),
    NormCase("rms", (6,), 0),
    NormCase("rms", (2, 26, 26, 10), 1),
    NormCase("rms", (2, 3, 7), 1),
)
# every shape the accuracy tests compare against the float64 reference
REFERENCE_CASES = (LAYOUT_CASES + ODD_SIZE_CASES + SPLIT_CASES + SHORT_ROW_CASES + FOUR_ROW_CASES
                   + NARROW_COLUMN_CASES + WIDE_COLUMN_CASES + GROUP_BLOCK_CASES)

# Every element alone in its group: the normalized value is 0, so the output is the bias.
SINGLE_ELEMENT_GROUP_CASES = (
    NormCase("group", (4, 8, 1, 1), 1, 8),
    NormCase("group", (3, 1, 1, 6), -1, 6),
    NormCase("instance", (3, 7, 1), 1),
    NormCase("instance", (3, 1, 7), -1),
    NormCase("layer", (5, 1), -1),
    NormCase("layer", (2, 1, 1, 3), (1, 2)),
)

AFFINE = {"plain": (False, False), "weight": (True, False), "bias": (False, True), "affine": (True, True)}


def _affine_params(cases):
    """(case, affine) pairs: RMS norm has a weight but no bias."""
    return [pytest.param(case, affine, id=f"{case}-{affine}")
            for case in cases for affine in AFFINE if case.has_bias or not AFFINE[affine][1]]


def _forward_inputs(case, dtype, affine="affine", seed=0):
    """x with a mean and spread far from 0 and 1, and the requested parameters, all of dtype."""
    x = random_array(case.shape, dtype, seed=seed, loc=0.5, scale=2.0)
    with_weight, with_bias = AFFINE[affine]
    weight, bias = random_params(case, dtype, seed=seed + 1, weight=with_weight, bias=with_bias)
    return x, weight, bias


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case,affine", _affine_params(REFERENCE_CASES))
def test_forward_matches_reference(case, affine, dtype):
    x, weight, bias = _forward_inputs(case, dtype, affine)
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    expected_y, expected_stats = case.forward_with_stats(slow, x, weight, bias)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected_y)
    for name, value, expected in zip(("mean", "rstd") if case.has_bias else ("rstd",), stats, expected_stats):
        assert value.dtype == np.float64 and value.shape == case.stats_shape, name
        assert_close(value, expected, dtype=compute_dtype(dtype), err_msg=name)
    # Asking for the statistics does not change the output.
    assert_bitwise_equal(case.forward(cynorm, x, weight, bias), y)


@pytest.mark.parametrize("eps", [1e-12, 0.1, 3.0])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_eps_is_added_to_the_variance(case, eps):
    x, weight, bias = _forward_inputs(case, np.float64)
    assert_close(case.forward(cynorm, x, weight, bias, eps=eps), case.forward(slow, x, weight, bias, eps=eps))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", SINGLE_ELEMENT_GROUP_CASES, ids=str)
def test_single_element_groups_give_the_bias(case, dtype):
    x, weight, bias = _forward_inputs(case, dtype)
    y = case.forward(cynorm, x, weight, bias)
    assert_close(y, np.broadcast_to(case.broadcastable(bias), case.shape))


@pytest.mark.parametrize("param_dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", [NormCase("group", (2, 6, 5, 4), 1, 3), NormCase("layer", (3, 4, 5), (-2, -1)),
                                  NormCase("rms", (3, 4, 5), (-2, -1))], ids=str)
def test_parameters_of_another_float_dtype(case, dtype, param_dtype):
    x, _, _ = _forward_inputs(case, dtype)
    weight, bias = random_params(case, param_dtype, seed=5)
    y = case.forward(cynorm, x, weight, bias)
    assert y.dtype == x.dtype
    # Parameters may be rounded to the computing precision first; that rounding is within x's tolerance.
    assert_close(y, case.forward(slow, x, weight, bias))


# ---------------------------------------------------------------------------------------------------------------
# The float32 accuracy contract: groups whose |mean| / std reaches 1e4 keep every output within 1e-3 of the
# float64 reference computed from the same float32 values.

CONTRACT_ATOL = 1e-3

CENTERED_ADVERSARIAL_CASES = (
    NormCase("group", (2, 8, 16, 16), 1, 4),
    NormCase("group", (2, 16, 16, 8), -1, 4),
    NormCase("group", (1, 4, 300, 100), 1, 1),  # one block split between threads
    NormCase("instance", (2, 4, 16, 16), 1),
    NormCase("instance", (2, 16, 16, 4), -1),
    NormCase("layer", (8, 1024), -1),
    NormCase("layer", (2, 10_000), -1),
    NormCase("layer", (2, 26, 26, 10), 1),
    NormCase("layer", (40, 24), -1),  # short rows, 16 at a time
    NormCase("layer", (40, 64), -1),
    GROUP_BLOCK_CASES[0],
)
ADVERSARIAL_CASES = CENTERED_ADVERSARIAL_CASES + (NormCase("rms", (8, 1024), -1), NormCase("rms", (2, 10_000), -1),
                                                  NormCase("rms", (40, 24), -1))

# (mean, std) of the groups, |mean| / std = 1e4.
SHIFTED_DISTRIBUTIONS = [(1e4, 1.0), (1.0, 1e-4), (-300.0, 0.03)]


def _shifted_input(case, loc, std):
    """float32 loc + std * N(0, 1), and an eps small enough not to hide the variance."""
    return random_array(case.shape, np.float32, seed=3, loc=loc, scale=std), 1e-5 * std ** 2


def _naive_float32_norm(case, x, eps):
    """Normalization with the textbook one-pass variance E[x^2] - E[x]^2, all in float32 (no weight or bias)."""
    if case.norm in ("group", "instance"):
        num_groups = case.num_groups or case.shape[case.axis]
        moved = np.moveaxis(x, case.axis, 1)
        rows = moved.reshape(moved.shape[0], num_groups, -1)
    else:
        trailing = range(x.ndim - len(case.normalized_axes), x.ndim)
        moved = np.moveaxis(x, case.normalized_axes, trailing)
        rows = moved.reshape(moved.shape[:x.ndim - len(case.normalized_axes)] + (-1,))
    mean = rows.mean(axis=-1, dtype=np.float32, keepdims=True)
    variance = np.maximum((rows * rows).mean(axis=-1, dtype=np.float32, keepdims=True) - mean * mean, 0)
    y = ((rows - mean) / np.sqrt(variance + np.float32(eps))).reshape(moved.shape)
    if case.norm in ("group", "instance"):
        return np.moveaxis(y, 1, case.axis)
    return np.moveaxis(y, trailing, case.normalized_axes)


@pytest.mark.parametrize("loc,std", SHIFTED_DISTRIBUTIONS)
@pytest.mark.parametrize("case", CENTERED_ADVERSARIAL_CASES, ids=str)
def test_naive_float32_variance_breaks_the_contract_on_shifted_data(case, loc, std):
    """The data below is hard: the textbook float32 formula misses the contract on it by far."""
    x, eps = _shifted_input(case, loc, std)
    naive = _naive_float32_norm(case, x, eps)
    assert naive.dtype == np.float32
    expected = case.forward(slow, x, eps=eps)
    assert np.max(np.abs(naive - expected)) > 10 * CONTRACT_ATOL


@pytest.mark.parametrize("affine", ["plain", "affine"])
@pytest.mark.parametrize("loc,std", SHIFTED_DISTRIBUTIONS)
@pytest.mark.parametrize("case", ADVERSARIAL_CASES, ids=str)
def test_shifted_float32_input_meets_the_accuracy_contract(case, loc, std, affine):
    x, eps = _shifted_input(case, loc, std)
    with_weight, with_bias = AFFINE[affine]
    weight, bias = random_params(case, np.float32, seed=4, weight=with_weight, bias=with_bias)
    y = case.forward(cynorm, x, weight, bias, eps=eps)
    np.testing.assert_allclose(y, case.forward(slow, x, weight, bias, eps=eps), rtol=0, atol=CONTRACT_ATOL)


# Rows of a few dozen values hold too few squares of ~1e36 to overflow: theirs are ~1.6e37.
SQUARES_PAST_FLOAT32_CASES = ([pytest.param(case, 1e18, id=str(case)) for case in ADVERSARIAL_CASES]
                              + [pytest.param(NormCase(norm, (40, length), -1), 4e18, id=f"{norm}-40x{length}-4e18")
                                 for norm, length in (("layer", 24), ("layer", 64), ("rms", 24))])


@pytest.mark.parametrize("case,scale", SQUARES_PAST_FLOAT32_CASES)
def test_float32_input_whose_squares_sum_past_the_float32_range(case, scale):
    """Every square fits in float32 (|x| < 1.8e19) but a group's sum of them does not: still within contract."""
    x = random_array(case.shape, np.float32, seed=3, scale=scale)
    with np.errstate(over="ignore"):
        assert np.abs(x).max() < 1.8e19 and not np.isfinite(np.sum(x ** 2, dtype=np.float32))
    weight, bias = random_params(case, np.float32, seed=4)
    y = case.forward(cynorm, x, weight, bias)
    np.testing.assert_allclose(y, case.forward(slow, x, weight, bias), rtol=0, atol=CONTRACT_ATOL)


# ---------------------------------------------------------------------------------------------------------------
# A group's statistics depend on its own values only.

@pytest.mark.parametrize("trouble", ["first-rows-unrepresentative", "squares-past-float32"])
@pytest.mark.parametrize("case", [NormCase("group", (2, 300, 64), -1, 8), GROUP_BLOCK_CASES[0]], ids=str)
def test_a_groups_bits_do_not_depend_on_another_groups_trouble(case, trouble):
    """Channels-last statistics are taken around a centre from a tile's first rows, and in float32 sums for
    float32 input: a group whose first rows are far from its mean is taken again around its whole mean, one whose
    squares overflow float32 again in double.  The other groups of the tile keep their own results, bit for bit."""
    calm = random_array(case.shape, np.float32, seed=5)
    troubled = calm.copy()
    group_columns = troubled.reshape(case.shape[0], -1, case.shape[-1])[..., :case.shape[-1] // case.num_groups]
    if trouble == "first-rows-unrepresentative":
        group_columns[:, 8:] += 1e4
    else:   # (each column's float sums of squares overflow)
        group_columns *= 1e19
    weight, bias = random_params(case, np.float32, seed=4)
    calm_y, calm_stats = case.forward_with_stats(cynorm, calm, weight, bias)
    y, stats = case.forward_with_stats(cynorm, troubled, weight, bias)
    others = case.broadcastable(np.arange(case.shape[-1]) >= case.shape[-1] // case.num_groups)
    others = np.broadcast_to(others, case.shape)
    assert_bitwise_equal(y[others], calm_y[others])
    for name, calm_values, values in zip(("mean", "rstd"), calm_stats, stats):
        assert_bitwise_equal(values[:, 1:], calm_values[:, 1:], err_msg=name)
    np.testing.assert_allclose(y, case.forward(slow, troubled, weight, bias), rtol=0, atol=CONTRACT_ATOL)


@pytest.mark.parametrize("dtype,shape", [(np.float32, (2, 8, 8, 1280)), (np.float64, (2, 8, 8, 640)),
                                         (np.float32, (2, 7, 7, 2560))], ids=str)
def test_column_group_blocks_give_the_bits_of_whole_tiles(dtype, shape):
    """On one thread, a batch of two of these channels-last samples is taken a tile (here a whole sample) at a
    time, and each sample alone in blocks of its column groups, each block over all the sample's rows: the same
    sums in the same order, the same bits."""
    case = NormCase("group", shape, -1, 32)
    x = random_array(shape, dtype, seed=6, loc=3.0)
    weight, bias = random_params(case, dtype, seed=7)
    with cynorm.num_threads(1):
        y, stats = case.forward_with_stats(cynorm, x, weight, bias)
        for sample in range(shape[0]):
            alone_y, alone_stats = case.forward_with_stats(cynorm, x[sample:sample + 1], weight, bias)
            assert_bitwise_equal(alone_y, y[sample:sample + 1])
            for name, alone, together in zip(("mean", "rstd"), alone_stats, stats):
                assert_bitwise_equal(alone, together[sample:sample + 1], err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite input stays in its group.

@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES + (NormCase("group", (1, 4, 300, 100), 1, 2),
                                                NormCase("layer", (37, 10), -1)), ids=str)
def test_non_finite_value_is_confined_to_its_group(case, dtype, bad_value):
    x, weight, bias = _forward_inputs(case, dtype)
    x.flat[x.size // 2 + 1] = np.nan
    with np.errstate(invalid="ignore"):
        # NaN propagates through every reference formula, so it marks the poisoned group.
        poisoned_group = np.isnan(case.forward(slow, x, weight, bias))
        assert poisoned_group.sum() == case.group_size
        x.flat[x.size // 2 + 1] = bad_value
        expected = case.forward(slow, x, weight, bias)

    y = case.forward(cynorm, x, weight, bias)
    assert np.isfinite(y[~poisoned_group]).all()
    assert_close(y, expected)  # including where the NaNs are


@pytest.mark.parametrize("case", [case for case in LAYOUT_CASES if case.norm != "rms"]
                         + [NormCase("group", (1, 4, 300, 100), 1, 2), NormCase("layer", (37, 10), -1)], ids=str)
def test_float64_variance_past_the_float64_range_is_nan_in_its_group(case):
    """A float64 group whose squared deviations sum past the float64 range (one value of 1e200) has no finite
    rstd: its outputs are NaN, as torch's are on most shapes, not the zeros of 1/sqrt(inf).  (RMS norm gives
    torch's zeros: its sum of squares is infinite with an infinite input too, and there 0 is the answer.)"""
    x, weight, bias = _forward_inputs(case, np.float64)
    x.flat[x.size // 2 + 1] = np.nan
    with np.errstate(invalid="ignore"):
        poisoned_group = np.isnan(case.forward(slow, x, weight, bias))
    x.flat[x.size // 2 + 1] = 1e200
    y = case.forward(cynorm, x, weight, bias)
    assert np.array_equal(np.isnan(y), poisoned_group)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_close(y, case.forward(slow, x, weight, bias))


# ---------------------------------------------------------------------------------------------------------------
# Memory layouts, out=, empty batches, inputs left alone.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_any_memory_layout_of_x_and_parameters(case, dtype, layout):
    """Strided, Fortran-ordered, read-only or byte-swapped inputs give the same results (after one copy)."""
    x, weight, bias = _forward_inputs(case, dtype)
    weight = with_layout(weight, layout)
    bias = None if bias is None else with_layout(bias, layout)
    y = case.forward(cynorm, with_layout(x, layout), weight, bias)
    assert_close(y, case.forward(slow, x, weight, bias))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_out_is_written_and_returned(case, dtype):
    x, weight, bias = _forward_inputs(case, dtype)
    out = np.full_like(x, np.nan)
    assert case.forward(cynorm, x, weight, bias, out=out) is out
    assert_bitwise_equal(out, case.forward(cynorm, x, weight, bias))

    out[...] = np.nan
    y, _ = case.forward_with_stats(cynorm, x, weight, bias, out=out)
    assert y is out
    assert_bitwise_equal(out, case.forward(cynorm, x, weight, bias))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES + SPLIT_CASES[:1], ids=str)
def test_in_place_forward(case, dtype):
    x, weight, bias = _forward_inputs(case, dtype)
    expected = case.forward(cynorm, x, weight, bias)
    assert case.forward(cynorm, x, weight, bias, out=x) is x
    assert_bitwise_equal(x, expected)


def _stream_large_outputs(monkeypatch, stream):
    """Every output of the kernels written with streaming stores (or never), whatever its size."""
    monkeypatch.setattr(cynorm._api, "_prepare_large_output", lambda address, nbytes, stream_from_bytes: stream)


# Streaming stores only change how the output reaches memory: every path of both views, with outputs starting
# at several places in a cache line (only whole lines are streamed), misaligned, and in place.
STREAM_CASES = (
    NormCase("group", (3, 6, 5, 37), 1, 3),      # rows, one row per task, several channels per row
    NormCase("layer", (3, 700), -1),             # rows, one element per channel, rows of several blocks
    NormCase("layer", (6, 528), -1),             # rows of a multiple of 16 values: the one-loop backward
    NormCase("layer", (1, 70001), -1),           # rows, one row split into chunks across threads
    NormCase("layer", (5, 3), -1),               # rows shorter than a vector
    NormCase("group", (2, 9, 9, 12), -1, 4),     # columns, several narrow rows per streamed block
    NormCase("instance", (2, 7, 601), -1),       # columns, wide rows streamed a block at a time
    NormCase("instance", (3, 7, 601), -1),       # columns, samples shared by the threads
    NormCase("layer", (2, 26, 26, 10), 1),       # columns, weight along the rows
    NormCase("layer", (37, 10), -1),             # rows, 16 short rows streamed together
    NormCase("group", (50, 12, 1), 1, 4),        # rows, short rows that are not consecutive in the backward
)


@pytest.mark.skipif(not cynorm._kernels.HAVE_STREAM, reason="no streaming stores in this build")
@pytest.mark.parametrize("placement", ["new", "line+0", "line+16", "line+48", "byte-offset", "in-place"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:2], ids=dtype_name)
@pytest.mark.parametrize("case", STREAM_CASES, ids=str)
def test_streamed_output_has_the_same_bits(case, dtype, placement, monkeypatch):
    x, weight, bias = _forward_inputs(case, dtype)
    expected = case.forward_with_stats(cynorm, x, weight, bias)
    if placement.startswith("line+"):   # that many bytes past the start of a 64-byte cache line
        out = empty_past_cache_line(x.shape, dtype, int(placement[5:]))
    else:
        out = {
            "new": None,
            # never on a line boundary: written with ordinary stores
            "byte-offset": np.empty(x.nbytes + 1, np.uint8)[1:].view(dtype).reshape(x.shape),
            "in-place": x.copy(),
        }[placement]
    source = out if placement == "in-place" else x
    _stream_large_outputs(monkeypatch, True)
    got = case.forward_with_stats(cynorm, source, weight, bias, out=out)
    for got_array, expected_array in zip(got, expected):
        assert_bitwise_equal(got_array, expected_array)


@pytest.mark.skipif(not cynorm._kernels.HAVE_STREAM, reason="no streaming stores in this build")
@pytest.mark.parametrize("placement", ["new", "line+0", "line+16", "line+48", "byte-offset"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:2], ids=dtype_name)
@pytest.mark.parametrize("case", STREAM_CASES, ids=str)
def test_streamed_gradient_has_the_same_bits(case, dtype, placement, monkeypatch):
    x, weight, bias = _forward_inputs(case, dtype)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    dy = np.random.default_rng(11).standard_normal(x.shape).astype(dtype)
    expected = case.backward(cynorm, dy, x, stats, weight)
    if placement.startswith("line+"):
        out = empty_past_cache_line(x.shape, dtype, int(placement[5:]))
    else:
        out = {"new": None, "byte-offset": np.empty(x.nbytes + 1, np.uint8)[1:].view(dtype).reshape(x.shape)}[placement]
    _stream_large_outputs(monkeypatch, True)
    got = case.backward(cynorm, dy, x, stats, weight, out=out)
    for got_array, expected_array in zip(got, expected):
        if expected_array is not None:
            assert_bitwise_equal(got_array, expected_array)


# Loops over consecutive values take the values before the output's first vector boundary apart
# (values_before_vector): the same bits wherever the input and the output start in a cache line.
ALIGNMENT_CASES = (
    NormCase("group", (3, 6, 5, 37), 1, 3),     # rows view: channels of 185 values
    NormCase("instance", (2, 3, 4100), 1),      # channels of more values than a streamed block
    NormCase("group", (2, 4, 3), 1, 2),         # channels of fewer values than a vector
    NormCase("layer", (3, 700), -1),            # a weight per value
    NormCase("group", (2, 9, 7, 48), -1, 3),    # columns view: rows a multiple of a line apart
    NormCase("group", (2, 9, 7, 40), -1, 4),    # rows that are not
    GROUP_BLOCK_CASES[0],                       # blocks of column groups
)


@pytest.mark.parametrize("x_place,out_place", [(16, 16), (16, 0), (0, 40), (40, 40), (8, 56), (1, 3)],
                         ids=lambda place: f"line+{place}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:2], ids=dtype_name)
@pytest.mark.parametrize("case", ALIGNMENT_CASES, ids=str)
def test_arrays_anywhere_in_a_line_give_the_same_bits(case, dtype, x_place, out_place):
    x, weight, bias = _forward_inputs(case, dtype)
    dy = np.random.default_rng(11).standard_normal(x.shape).astype(dtype)
    expected_y, expected_stats = case.forward_with_stats(cynorm, x, weight, bias)
    expected_grads = case.backward(cynorm, dy, x, expected_stats, weight)
    placed_x, placed_dy = (empty_past_cache_line(x.shape, dtype, x_place) for _ in range(2))
    placed_x[...], placed_dy[...] = x, dy
    y, dx = (empty_past_cache_line(x.shape, dtype, out_place) for _ in range(2))
    y[...] = dx[...] = np.nan   # (a value left unwritten shows)
    _, stats = case.forward_with_stats(cynorm, placed_x, weight, bias, out=y)
    assert_bitwise_equal(y, expected_y)
    for got, expected in zip(stats, expected_stats):
        assert_bitwise_equal(got, expected)
    grads = case.backward(cynorm, placed_dy, placed_x, stats, weight, out=dx)
    assert grads[0] is dx
    for got, expected in zip(grads, expected_grads):
        if expected is not None:
            assert_bitwise_equal(got, expected)


def test_kernel_addresses_are_those_of_contiguous_float_values():
    """The kernels take arrays by address: the first value's of a C-contiguous float32 or float64 array (0 for
    an empty one, which they do not read); other arrays never get an address."""
    for dtype in (np.float32, np.float64):
        values = np.arange(12, dtype=dtype)[2:]
        assert cynorm._kernels.address_of(values) == values.ctypes.data
        assert cynorm._kernels.address_of(np.empty(0, dtype)) == 0
    with pytest.raises(TypeError, match="2 bytes"):
        cynorm._kernels.address_of(np.ones(4, np.float16))
    with pytest.raises(ValueError, match="contiguous"):
        cynorm._kernels.address_of(np.ones((4, 4), np.float32)[:, ::2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fresh pages are detected on Linux only")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:2], ids=dtype_name)
def test_large_outputs_fresh_or_reused_give_the_same_bits(dtype):
    case = NormCase("group", (2, 1 << 21), 1, 1)   # a 16 MiB output in float32
    x, weight, bias = _forward_inputs(case, dtype)
    expected = case.forward_with_stats(cynorm, x, weight, bias, out=np.zeros_like(x))
    # a new anonymous mapping (as the allocator gives for large arrays), the array not page-aligned in it
    mapping = mmap.mmap(-1, (x.size + 1024) * x.itemsize)
    fresh = np.frombuffer(mapping, dtype)[3:3 + x.size].reshape(x.shape)
    assert cynorm._kernels.has_untouched_pages(cynorm._kernels.address_of(fresh.reshape(-1)), fresh.nbytes)
    got = case.forward_with_stats(cynorm, x, weight, bias, out=fresh)
    assert not cynorm._kernels.has_untouched_pages(cynorm._kernels.address_of(fresh.reshape(-1)), fresh.nbytes)
    for got_array, expected_array in zip(got + case.forward_with_stats(cynorm, x, weight, bias), expected * 2):
        assert_bitwise_equal(got_array, expected_array)


@pytest.mark.parametrize("stream", [False, True], ids=["cached-stores", "streamed"])
@pytest.mark.parametrize("placement", ["new", "in-place"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:2], ids=dtype_name)
@pytest.mark.parametrize("case", [
    NormCase("group", (5, 12, 140, 131), 1, 3),   # rows of 288 KiB: the input's rows ahead
    NormCase("layer", (1500, 801), -1),           # rows of 3 KiB: the input's and the output's rows ahead
    # columns view, rows of 160 values asked for ahead: summed a row at a time in builds without AVX-512, four
    # or eight at a time in the pieces' calls
    NormCase("group", (5, 40, 40, 160), -1, 8),
], ids=str)
def test_prefetching_forward_gives_each_samples_own_bits(case, dtype, placement, stream, monkeypatch):
    # From 4 MiB of input on (here), the rows forward prefetches each thread's next rows; a piece of the batch
    # alone is below that size, and its rows depend on nothing else.  The threads' shares are uneven.
    x, weight, bias = _forward_inputs(case, dtype)
    pieces = np.array_split(np.arange(x.shape[0]), 5)
    assert x.nbytes >= 4 * 2 ** 20 > max(x[piece].nbytes for piece in pieces)
    monkeypatch.setattr(cynorm._api, "_FORWARD_STREAM_FROM_BYTES", 4 * 2 ** 20)
    monkeypatch.setattr(cynorm._api, "_FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES", 4 * 2 ** 20)
    _stream_large_outputs(monkeypatch, stream)
    per_piece = [case.forward_with_stats(cynorm, x[piece], weight, bias) for piece in pieces]
    source = x.copy()
    y, (mean, rstd) = case.forward_with_stats(cynorm, source, weight, bias,
                                              out=source if placement == "in-place" else None)
    for piece, (expected_y, (expected_mean, expected_rstd)) in zip(pieces, per_piece):
        assert_bitwise_equal(y[piece], expected_y)
        assert_bitwise_equal(mean[piece], expected_mean)
        assert_bitwise_equal(rstd[piece], expected_rstd)


@pytest.mark.parametrize("stream", [False, True], ids=["cached-stores", "streamed"])
@pytest.mark.parametrize("case", [
    NormCase("group", (5, 12, 140, 131), 1, 3),   # a thread's rows skip the other groups' rows
    NormCase("layer", (1500, 700), -1),           # one group: a thread's next task starts at the next row
    NormCase("rms", (1500, 700), -1),
    NormCase("group", (7, 40, 40, 160), -1, 8),   # columns view: a sample's rows of 160 values asked for ahead
], ids=str)
def test_prefetching_backward_gives_each_rows_own_bits(case, stream, monkeypatch):
    # From 4 MiB of input on (here), the rows backward prefetches rows a few ahead of the one it writes, across
    # the blocks of samples that share parameter partial sums, and the columns backward asks for the rows of the
    # tile it sums.  dx of a row depends on that row alone; the parameter gradients do not depend on the thread
    # count.
    x, weight, bias = _forward_inputs(case, np.float32)
    dy = random_array(case.shape, np.float32, seed=7)
    pieces = np.array_split(np.arange(x.shape[0]), 7)
    assert x.nbytes >= 4 * 2 ** 20 > max(x[piece].nbytes for piece in pieces)
    monkeypatch.setattr(cynorm._api, "_BACKWARD_STREAM_FROM_BYTES", 4 * 2 ** 20)
    _stream_large_outputs(monkeypatch, stream)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    dx, dweight, dbias = case.backward(cynorm, dy, x, stats, weight)
    for piece in pieces:
        expected_dx = case.backward(cynorm, dy[piece], x[piece], tuple(s[piece] for s in stats), weight)[0]
        assert_bitwise_equal(dx[piece], expected_dx)
    with cynorm.num_threads(1):
        _, one_thread_dweight, one_thread_dbias = case.backward(cynorm, dy, x, stats, weight)
    assert_bitwise_equal(dweight, one_thread_dweight)
    if dbias is not None:
        assert_bitwise_equal(dbias, one_thread_dbias)


def _linux_cache_directory(root, caches):
    """A folder laid out as Linux's /sys/devices/system/cpu/cpu0/cache, one index per (level, type, size)."""
    for number, cache in enumerate(caches):
        index = root / f"index{number}"
        index.mkdir()
        for name, value in zip(("level", "type", "size"), cache):
            (index / name).write_text(f"{value}\n")
    return str(root)


@pytest.mark.parametrize("caches, counted_mib", [
    ([(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"), (3, "Unified", "16384K")], 16),
    ([(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"), (3, "Unified", "491520K")], 32),
    ([(3, "Unified", "24M"), (1, "Data", "32K")], 24),               # listed in any order
    ([(1, "Data", "32K"), (2, "Unified", "1024K")], 1),               # no L3
    ([(2, "Unified", "512K"), (3, "Instruction", "8192K")], 0.5),   # an instruction cache holds no data
    ([(3, "Unified", "a lot")], 32),                                 # unreadable: counts on 32 MiB
    ([], 32),
], ids=str)
def test_the_cache_counted_on_is_linuxs_last_level_one_up_to_32_mib(tmp_path, caches, counted_mib):
    assert cynorm._api._last_level_cache_bytes(_linux_cache_directory(tmp_path, caches)) == counted_mib * 2 ** 20


def test_the_cache_counted_on_is_this_machines(tmp_path):
    assert cynorm._api._last_level_cache_bytes(str(tmp_path / "missing")) == 32 * 2 ** 20
    try:
        reported = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        reported = ""
    if not sys.platform.startswith("linux") or not reported.isdigit() or int(reported) <= 0:
        pytest.skip("no L3 size from glibc's getconf here")
    assert cynorm._api._LAST_LEVEL_CACHE_BYTES == min(int(reported), 32 * 2 ** 20)


def test_info_command_tells_the_cache_counted_on_and_the_streaming_thresholds(capsys):
    from cynorm.__main__ import main
    api = cynorm._api
    main(["info"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"kernel build: {cynorm._kernels.BUILD} ")
    assert lines[3] == (f"last-level cache counted on: {api._LAST_LEVEL_CACHE_BYTES / 2 ** 20:g} MiB (outputs streamed "
                        f"from {api._FORWARD_STREAM_FROM_BYTES / 2 ** 20:g} MiB in forwards, "
                        f"{api._COLUMNS_FORWARD_STREAM_FROM_BYTES / 2 ** 20:g} MiB in channels-last ones, "
                        f"{api._BACKWARD_STREAM_FROM_BYTES / 2 ** 20:.3g} MiB in backwards)")


def test_outputs_stream_only_when_the_call_outgrows_the_last_level_cache(monkeypatch):
    api = cynorm._api
    # a forward streams once x and y fill the cache, a backward once dy, x and dx fill half of it
    cache = api._LAST_LEVEL_CACHE_BYTES
    assert cache == api._last_level_cache_bytes() > 0
    assert (api._FORWARD_STREAM_FROM_BYTES, api._BACKWARD_STREAM_FROM_BYTES) == (cache // 2, cache // 6)
    # the columns view's forward (channels-last) from a quarter of it in builds without AVX-512 (see _api)
    without_avx512 = cynorm._kernels.BUILD != "x86_64_v4"
    assert api._COLUMNS_FORWARD_STREAM_FROM_BYTES == (cache // 4 if without_avx512 else cache // 2)
    output = np.ones(1 << 20, np.float32)   # 4 MiB, its pages in memory
    address = cynorm._kernels.address_of(output)
    assert not api._launch(address, output.size, False, False, output.nbytes + 1)[1]
    assert api._launch(address, output.size, False, False, output.nbytes)[1] == cynorm._kernels.HAVE_STREAM
    # a float16 result computed in float32 is read back at once: never streamed
    assert not api._launch(address, output.size, False, True, output.nbytes)[1]
    # fresh memory is faulted in by ordinary stores
    fresh = np.frombuffer(mmap.mmap(-1, output.nbytes + 4096), np.float32)
    assert not api._launch(cynorm._kernels.address_of(fresh), output.size, False, False, output.nbytes)[1]
    # each direction asks with its own threshold
    asked = []
    monkeypatch.setattr(api, "_prepare_large_output", lambda address, nbytes, stream_from_bytes: asked.append(
        stream_from_bytes) or False)
    x = np.ones((2, 4, 8), np.float32)
    _, mean, rstd = cynorm.group_norm(x, 2, return_stats=True)
    cynorm.group_norm_backward(x, x, mean, rstd)
    cynorm.group_norm(x, 2, axis=-1)
    assert asked == [api._FORWARD_STREAM_FROM_BYTES, api._BACKWARD_STREAM_FROM_BYTES,
                     api._COLUMNS_FORWARD_STREAM_FROM_BYTES]


def test_rows_forward_asks_for_short_rows_ahead_from_a_smaller_size(monkeypatch):
    api = cynorm._api
    cache = api._LAST_LEVEL_CACHE_BYTES
    without_avx512 = cynorm._kernels.BUILD != "x86_64_v4"
    assert api._FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES == (cache * 3 // 8 if without_avx512 else cache // 2)
    monkeypatch.setattr(api, "_FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES", 2 ** 20)
    monkeypatch.setattr(api, "_FORWARD_STREAM_FROM_BYTES", 2 ** 21)
    asked = []
    forward_rows = cynorm._kernels.forward_rows
    monkeypatch.setattr(cynorm._kernels, "forward_rows", lambda *args: asked.append(args[-2]) or forward_rows(*args))
    shortest, longest = (nbytes // 4 for nbytes in cynorm._kernels.PREFETCHED_OUTPUT_ROWS)   # float32 values
    for row in (shortest, longest):   # rows whose output is asked for too: from 1 MiB
        cynorm.layer_norm(np.ones((2 ** 18 // row - 1, row), np.float32))   # just under 1 MiB
        cynorm.layer_norm(np.ones((2 ** 18 // row + 1, row), np.float32))
    for row in (shortest - 16, 2 * longest):   # others: from 2 MiB
        cynorm.layer_norm(np.ones((2 ** 18 // row + 1, row), np.float32))
        cynorm.layer_norm(np.ones((2 ** 19 // row + 1, row), np.float32))
    assert asked == [False, True] * 4


def test_huge_page_advice_keeps_the_contents():
    values = np.arange(3 << 20, dtype=np.float32)[5:]
    cynorm._kernels.advise_huge_pages(cynorm._kernels.address_of(values), values.nbytes)
    np.testing.assert_array_equal(values, np.arange(5, 3 << 20, dtype=np.float32))


@pytest.mark.parametrize("case", [
    NormCase("group", (4, 64, 32, 32), 1, 32),
    NormCase("group", (4, 32, 32, 64), -1, 32),
    NormCase("instance", (4, 64, 32, 32), 1),
    NormCase("layer", (1024, 256), -1),
    NormCase("rms", (1024, 256), -1),
], ids=str)
def test_out_avoids_allocating_an_output(case):
    x, weight, bias = _forward_inputs(case, np.float32)
    out = np.empty_like(x)
    case.forward(cynorm, x, weight, bias, out=out)  # warm up any lazily created state
    tracemalloc.start()  # NumPy reports its data allocations to tracemalloc
    try:
        case.forward(cynorm, x, weight, bias, out=out, return_stats=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 4


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_empty_batch(case, dtype):
    """Zero samples: empty outputs and statistics, zero parameter gradients."""
    case = case.with_shape((0,) + case.shape[1:])
    x, weight, bias = _forward_inputs(case, dtype)
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all(s.shape == case.stats_shape for s in stats)
    dx, dweight, dbias = case.backward(cynorm, np.ones_like(x), x, stats, weight)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_array_equal(dweight, np.zeros(case.param_shape))
    if case.has_bias:
        np.testing.assert_array_equal(dbias, np.zeros(case.param_shape))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", [NormCase("group", (2, 4, 0), 1, 2), NormCase("group", (2, 0, 4), -1, 2),
                                  NormCase("instance", (3, 2, 0, 5), 1), NormCase("layer", (3, 0, 5), 1),
                                  NormCase("rms", (3, 4, 0), (-2, -1))], ids=str)
def test_groups_of_no_values(case, dtype):
    """An empty axis other than the batch: empty outputs, NaN statistics (of no values), zero parameter
    gradients."""
    x, weight, bias = _forward_inputs(case, dtype)
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all(s.shape == case.stats_shape and np.isnan(s).all() for s in stats)
    dx, dweight, dbias = case.backward(cynorm, np.ones_like(x), x, stats, weight)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_array_equal(dweight, np.zeros(case.param_shape))
    if case.has_bias:
        np.testing.assert_array_equal(dbias, np.zeros(case.param_shape))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES + SPLIT_CASES[:1], ids=str)
def test_inputs_are_not_modified(case, dtype):
    """No forward or backward call writes to x, weight, bias, dy, mean or rstd."""
    x, weight, bias = _forward_inputs(case, dtype)
    dy = random_array(case.shape, dtype, seed=9)
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    inputs = {"x": x, "weight": weight, "dy": dy, **dict(zip(("mean", "rstd") if case.has_bias else ("rstd",), stats))}
    if bias is not None:
        inputs["bias"] = bias
    copies = {name: array.copy() for name, array in inputs.items()}

    run_forward_and_backward(case, x, weight, bias, dy)
    case.backward(cynorm, dy, x, stats, None)
    for name, array in inputs.items():
        assert_bitwise_equal(array, copies[name], err_msg=name)


def test_import_does_not_import_frameworks():
    code = "import sys, cynorm; print(sorted({'torch', 'tensorflow', 'keras', 'jax'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# Generated shapes, axes and groups.

@given(case=norm_cases(), dtype=st.sampled_from(FLOAT_DTYPES), affine=st.sampled_from(sorted(AFFINE)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_generated_forward_matches_reference(case, dtype, affine, seed):
    if not case.has_bias:
        affine = "weight" if AFFINE[affine][0] else "plain"
    x, weight, bias = _forward_inputs(case, dtype, affine, seed=seed)
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    expected_y, expected_stats = case.forward_with_stats(slow, x, weight, bias)
    assert_close(y, expected_y)
    for value, expected in zip(stats, expected_stats):
        assert value.shape == case.stats_shape
        assert_close(value, expected, dtype=compute_dtype(dtype))
