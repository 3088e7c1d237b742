"""Backward kernels against the float64 reference `cynorm.slow` and against central finite differences."""
import concurrent.futures
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cynorm
from cynorm import slow

from _core_util import (FLOAT_DTYPES, FOUR_ROW_CASES, LAYOUT_CASES, LAYOUTS, NARROW_COLUMN_CASES, SHORT_ROW_CASES,
                        SPLIT_CASES, NormCase, assert_bitwise_equal, assert_close, compute_dtype, dtype_name,
                        norm_cases, random_array, random_params, run_forward_and_backward, with_layout)

ODD_SIZE_CASES = (
    NormCase("group", (3, 4, 1, 1), 1, 4),  # one element per group: dx is 0
    NormCase("group", (3, 7, 11), 1, 7),
    NormCase("group", (2, 3, 3, 13), -1, 13),
    NormCase("group", (2, 64, 5, 5), 1, 32),
    NormCase("instance", (3, 7, 1), 1),
    NormCase("instance", (2, 8, 8, 64), -1),
    NormCase("layer", (3, 5000), -1),
    NormCase("layer", (2, 26, 26, 10), 1),
    NormCase("layer", (7,), -1),
    NormCase("rms", (3, 5000), -1),
    NormCase("rms", (6,), 0),
)
# every shape the accuracy tests compare against the float64 reference
REFERENCE_CASES = (LAYOUT_CASES + ODD_SIZE_CASES + SPLIT_CASES + SHORT_ROW_CASES + FOUR_ROW_CASES
                   + NARROW_COLUMN_CASES)


def _backward_inputs(case, dtype, *, with_weight, seed=0):
    x = random_array(case.shape, dtype, seed=seed, loc=0.5, scale=2.0)
    dy = random_array(case.shape, dtype, seed=seed + 1)
    weight, bias = random_params(case, dtype, seed=seed + 2, weight=with_weight)
    return x, dy, weight, bias


def _check_against_reference(case, dtype, x, dy, weight, bias):
    """The kernels' gradients equal the reference's, both given the statistics the kernels' forward returned."""
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    dx, dweight, dbias = case.backward(cynorm, dy, x, stats, weight)
    expected_dx, expected_dweight, expected_dbias = case.backward(slow, dy, x, stats, weight)

    assert dx.dtype == x.dtype and dx.shape == x.shape
    # dx = rstd * (dy * weight - terms that nearly cancel it): rounding errors scale with the first term.
    scaled_dy = dy if weight is None else dy * case.broadcastable(weight)
    assert_close(dx, expected_dx, scale=float(np.max(np.abs(scaled_dy), initial=0) * np.max(stats[-1], initial=0)))
    assert dweight.dtype == compute_dtype(dtype) and dweight.shape == case.param_shape
    assert_close(dweight, expected_dweight, err_msg="dweight")
    if case.has_bias:
        assert dbias.dtype == compute_dtype(dtype) and dbias.shape == case.param_shape
        assert_close(dbias, expected_dbias, err_msg="dbias")
    else:
        assert dbias is None


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_backward_matches_reference(case, dtype, with_weight):
    _check_against_reference(case, dtype, *_backward_inputs(case, dtype, with_weight=with_weight))


@given(case=norm_cases(), dtype=st.sampled_from(FLOAT_DTYPES), with_weight=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_generated_backward_matches_reference(case, dtype, with_weight, seed):
    _check_against_reference(case, dtype, *_backward_inputs(case, dtype, with_weight=with_weight, seed=seed))


@pytest.mark.parametrize("case", LAYOUT_CASES + FOUR_ROW_CASES + SHORT_ROW_CASES, ids=str)
def test_float32_backward_on_values_of_std_1e30(case):
    """On such spreads the float32 kernels' coefficient of x - mean falls below float32's range (layer norm
    gradients 9% off): those calls run in float64, rounded back to float32, within the contract."""
    x, dy, weight, bias = _backward_inputs(case, np.float32, with_weight=True)
    x *= np.float32(1e30)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    gradients = case.backward(cynorm, dy, x, stats, weight)
    expected = case.backward(slow, dy, x, stats, weight)
    # dx is of the order of rstd * dy * weight, ~1e-30 here: compared in units of that
    dx_scale = float(np.max(np.abs(dy * case.broadcastable(weight))) * np.max(stats[-1]))
    assert_close(gradients[0] / dx_scale, expected[0] / dx_scale, dtype=np.float32)
    for gradient, reference in zip(gradients[1:], expected[1:]):   # dweight, and dbias but in RMS norm
        if reference is not None:
            assert_close(gradient, reference)


ONE_VALUE_GROUP_CASES = (
    NormCase("group", (3, 4, 1, 1), 1, 4),
    NormCase("group", (2, 1, 3), -1, 3),
    NormCase("instance", (3, 7, 1), 1),
    NormCase("layer", (5, 1), -1),
    NormCase("layer", (2, 3, 1, 4), 2),   # a middle axis of one value (the columns view)
)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ONE_VALUE_GROUP_CASES, ids=str)
def test_groups_of_one_value_have_a_zero_input_gradient(case, dtype):
    """y is the bias whatever x: dx is 0, as torch's is, not the kernels' rounding noise (a few ulps of rstd *
    weight * dy, 316 * weight * dy here); NaN where x is NaN."""
    x, dy, weight, bias = _backward_inputs(case, dtype, with_weight=True)
    x.flat[1] = np.nan
    with np.errstate(invalid="ignore"):
        _, stats = case.forward_with_stats(cynorm, x, weight, bias)
        dx = case.backward(cynorm, dy, x, stats, weight)[0]
    assert np.isnan(dx.flat[1]) and np.count_nonzero(np.isnan(dx)) == 1
    assert np.all(np.delete(dx.ravel(), 1) == 0)


# ---------------------------------------------------------------------------------------------------------------
# Finite differences: the gradients are those of the kernels' own forward.

FINITE_DIFFERENCE_CASES = (
    NormCase("group", (2, 4, 3), 1, 2),
    NormCase("group", (2, 3, 4), -1, 2),
    NormCase("group", (2, 2, 4, 3), 2, 2),
    NormCase("instance", (2, 2, 3), 1),
    NormCase("instance", (2, 3, 2), -1),
    NormCase("layer", (3, 5), -1),
    NormCase("layer", (2, 2, 3), (-2, -1)),
    NormCase("layer", (2, 4, 3), 1),
    NormCase("rms", (3, 5), -1),
    NormCase("rms", (2, 4, 3), 1),
)

STEP = 1e-6


def _central_difference(loss, array):
    """d loss / d array, one element at a time; `array` is perturbed in place and restored."""
    gradient = np.empty_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + STEP
        above = loss()
        array[index] = original - STEP
        below = loss()
        array[index] = original
        gradient[index] = (above - below) / (2 * STEP)
    return gradient


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("case", FINITE_DIFFERENCE_CASES, ids=str)
def test_backward_matches_finite_differences(case, with_weight):
    x = random_array(case.shape, seed=0, loc=0.5, scale=2.0)
    dy = random_array(case.shape, seed=1)
    weight, bias = random_params(case, np.float64, seed=2)
    used_weight = weight if with_weight else None

    def loss():  # <dy, y>: its gradient with respect to anything is the backward of dy
        return float(np.sum(dy * case.forward(cynorm, x, used_weight, bias)))

    _, stats = case.forward_with_stats(cynorm, x, used_weight, bias)
    dx, dweight, dbias = case.backward(cynorm, dy, x, stats, used_weight)

    # Truncation error is O(STEP**2) and rounding error O(1e-16 / STEP): both far below this tolerance.
    np.testing.assert_allclose(dx, _central_difference(loss, x), rtol=1e-6, atol=1e-7, err_msg="dx")
    if with_weight:
        np.testing.assert_allclose(dweight, _central_difference(loss, weight), rtol=1e-6, atol=1e-7,
                                   err_msg="dweight")
    if case.has_bias:
        np.testing.assert_allclose(dbias, _central_difference(loss, bias), rtol=1e-6, atol=1e-7, err_msg="dbias")


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_dweight_does_not_depend_on_weight(case):
    """dweight = sum(dy * normalized x) and dbias = sum(dy) are computed whatever the weight."""
    x, dy, weight, bias = _backward_inputs(case, np.float64, with_weight=True)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    _, dweight, dbias = case.backward(cynorm, dy, x, stats, weight)
    _, dweight_unscaled, dbias_unscaled = case.backward(cynorm, dy, x, stats, None)
    assert_bitwise_equal(dweight, dweight_unscaled)
    if case.has_bias:
        assert_bitwise_equal(dbias, dbias_unscaled)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_backward_out_is_written_and_returned(case, dtype):
    x, dy, weight, bias = _backward_inputs(case, dtype, with_weight=True)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    out = np.full_like(x, np.nan)
    dx, dweight, dbias = case.backward(cynorm, dy, x, stats, weight, out=out)
    assert dx is out
    expected = case.backward(cynorm, dy, x, stats, weight)
    for name, value, reference in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), expected):
        if reference is not None:
            assert_bitwise_equal(value, reference, err_msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_backward_accepts_any_memory_layout(case, layout):
    x, dy, weight, bias = _backward_inputs(case, np.float32, with_weight=True)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    gradients = case.backward(cynorm, with_layout(dy, layout), with_layout(x, layout),
                              tuple(with_layout(s, layout) for s in stats),
                              with_layout(weight, layout))
    for name, value, expected in zip(("dx", "dweight", "dbias"), gradients,
                                     case.backward(slow, dy, x, stats, weight)):
        if expected is not None:
            assert_close(value, expected, err_msg=name)


# float16 data is computed in float32 buffers a chunk of samples at a time (cynorm._api._half_chunks): chunks of
# a single sample (or row), and uneven chunks of several, on every norm and layout and the kernels' paths.
HALF_CHUNK_CASES = LAYOUT_CASES + (
    NormCase("group", (5, 36, 7, 7), 1, 4),      # rows of 9 channels, four channels at a time
    NormCase("layer", (37, 48), -1),             # four rows at a time
    NormCase("layer", (3, 7, 21), -1),           # short rows in blocks
    NormCase("instance", (3, 7, 601), -1),       # wide columns
    NormCase("group", (3, 37, 29, 10), -1, 5),   # narrow columns, rows taken several at a time
)


def _overlapping_out(x):
    """An array of x's shape and dtype whose memory starts 3 values past x's start, inside x."""
    memory = np.empty(x.size + 3, x.dtype)
    memory[:x.size] = x.reshape(-1)
    return memory[:x.size].reshape(x.shape), memory[3:].reshape(x.shape)


@pytest.mark.skipif(not cynorm._kernels.HAVE_FLOAT16, reason="float16 widened by NumPy, whole, in this build")
@pytest.mark.parametrize("placement", ["new", "in-place", "overlapping"])
@pytest.mark.parametrize("chunk", ["one-sample", "uneven"])
@pytest.mark.parametrize("case", HALF_CHUNK_CASES, ids=str)
def test_float16_in_chunks_of_samples(case, chunk, placement, monkeypatch):
    """The forward and dx keep the bits of a single chunk, whatever the chunks and wherever the output lies;
    the parameter gradients, added up chunk by chunk, keep the accuracy."""
    x, dy, weight, bias = _backward_inputs(case, np.float16, with_weight=True)
    whole = run_forward_and_backward(case, x, weight, bias, dy)   # one chunk holds these inputs
    monkeypatch.setattr(cynorm._api, "_HALF_CHUNK_VALUES", 1 if chunk == "one-sample" else x.size // 3 + 1)

    x_in, out = {"new": (x, None), "in-place": (x.copy(),) * 2, "overlapping": _overlapping_out(x)}[placement]
    y, stats = case.forward_with_stats(cynorm, x_in, weight, bias, out=out)
    for name, got in zip(("y", "mean", "rstd") if case.has_bias else ("y", "rstd"), (y, *stats)):
        assert_bitwise_equal(got, whole[name], err_msg=name)

    dy_in, out = {"new": (dy, None), "in-place": (dy.copy(),) * 2, "overlapping": _overlapping_out(dy)}[placement]
    dx, *param_grads = case.backward(cynorm, dy_in, x, stats, weight, out=out)
    assert_bitwise_equal(dx, whole["dx"], err_msg="dx")
    for name, got, reference in zip(("dweight", "dbias"), param_grads, case.backward(slow, dy, x, stats, weight)[1:]):
        if reference is not None:
            assert_close(got, reference, err_msg=name)
            assert_close(got, whole[name], err_msg=name)


@pytest.mark.skipif(not cynorm._kernels.HAVE_FLOAT16, reason="float16 widened by NumPy, whole, in this build")
@pytest.mark.parametrize("case", [NormCase("group", (8, 8, 256, 256), 1, 4), NormCase("group", (8, 256, 256, 8), -1, 4),
                                  NormCase("layer", (2048, 2048), -1),
                                  NormCase("instance", (1, 32, 256, 256), 1)],   # a sample in runs of rows
                         ids=str)
def test_float16_is_widened_a_chunk_at_a_time(case):
    """The float32 copies of a large float16 call are buffers of a chunk each, not arrays of its size: the
    forward's two, the backward's three; a sample larger than a chunk is split where the rows view allows.  The
    next call takes the same buffers."""
    x, dy, weight, bias = _backward_inputs(case, np.float16, with_weight=True)
    _, stats = case.forward_with_stats(cynorm, x, weight, bias)
    assert x.size >= 4 * cynorm._api._HALF_CHUNK_VALUES
    chunk_bytes = 4 * cynorm._api._HALF_CHUNK_VALUES
    out = np.empty_like(x)
    for run, buffers in ((lambda: case.forward_with_stats(cynorm, x, weight, bias, out=out), 2),
                         (lambda: case.backward(cynorm, dy, x, stats, weight, out=out), 3)):
        cynorm._api._chunk_pool.set_limit(cynorm._api._chunk_pool.set_limit(0))   # (emptied)
        peaks = []
        for _ in range(2):
            tracemalloc.start()   # NumPy reports its data allocations to tracemalloc
            try:
                run()
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        assert buffers * chunk_bytes <= peaks[0] < (buffers + 1) * chunk_bytes
        assert peaks[1] < chunk_bytes // 8


@pytest.mark.skipif(not cynorm._kernels.HAVE_FLOAT16, reason="float16 widened by NumPy, whole, in this build")
def test_float16_calls_from_several_threads_at_once():
    """Calls that run at once (the kernels release the GIL) each take chunk buffers of their own."""
    case = NormCase("group", (4, 64, 48, 48), 1, 8)   # two chunks
    inputs = [_backward_inputs(case, np.float16, with_weight=True, seed=seed) for seed in range(6)]
    expected = [run_forward_and_backward(case, x, weight, bias, dy) for x, dy, weight, bias in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda arrays: run_forward_and_backward(case, *arrays),
                                [(x, weight, bias, dy) for x, dy, weight, bias in inputs] * 4))
    for got, want in zip(results, expected * 4):
        for name in want:
            assert_bitwise_equal(got[name], want[name], err_msg=name)
