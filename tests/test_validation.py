"""Bad arguments raise ValueError or TypeError naming the argument and the value, before any kernel runs.

Every case is a valid call (`VALID_CALLS`, checked to succeed) with one argument replaced, so each test fails
for exactly the reason it names.
"""
import re

import numpy as np
import pytest

import cynorm
from cynorm import slow

from _core_util import random_array

X = random_array((2, 6, 4, 4), np.float32, seed=0)
WRONG_SHAPE = (2, 6, 4, 5)  # for out and dy
DY = random_array(X.shape, np.float32, seed=1)
PER_CHANNEL = np.linspace(0.5, 1.5, 6).astype(np.float32)  # weight or bias for 6 channels
PER_FEATURE = np.linspace(0.5, 1.5, 4).astype(np.float32)  # weight or bias for the last axis (4)

_, GROUP_MEAN, GROUP_RSTD = slow.group_norm(X, 3, return_stats=True)
_, INSTANCE_MEAN, INSTANCE_RSTD = slow.instance_norm(X, return_stats=True)
_, LAYER_MEAN, LAYER_RSTD = slow.layer_norm(X, return_stats=True)
_, RMS_RSTD = slow.rms_norm(X, return_stats=True)

VALID_CALLS = {
    "group_norm": dict(x=X, num_groups=3, weight=PER_CHANNEL, bias=PER_CHANNEL, axis=1),
    "instance_norm": dict(x=X, weight=PER_CHANNEL, bias=PER_CHANNEL, axis=1),
    "layer_norm": dict(x=X, weight=PER_FEATURE, bias=PER_FEATURE, axis=-1),
    "rms_norm": dict(x=X, weight=PER_FEATURE, axis=-1),
    "group_norm_backward": dict(dy=DY, x=X, mean=GROUP_MEAN, rstd=GROUP_RSTD, weight=PER_CHANNEL, axis=1),
    "instance_norm_backward": dict(dy=DY, x=X, mean=INSTANCE_MEAN, rstd=INSTANCE_RSTD, weight=PER_CHANNEL, axis=1),
    "layer_norm_backward": dict(dy=DY, x=X, mean=LAYER_MEAN, rstd=LAYER_RSTD, weight=PER_FEATURE, axis=-1),
    "rms_norm_backward": dict(dy=DY, x=X, rstd=RMS_RSTD, weight=PER_FEATURE, axis=-1),
}
FORWARD = [name for name in VALID_CALLS if not name.endswith("_backward")]
BACKWARD = [name for name in VALID_CALLS if name.endswith("_backward")]
CHANNEL_NORMS = [name for name in VALID_CALLS if name.startswith(("group", "instance"))]


def _call(function, **changes):
    return getattr(cynorm, function)(**{**VALID_CALLS[function], **changes})


def _case(function, exception, argument, shown, **changes):
    """One bad call: `changes` to a valid call; the message must name `argument` and show `shown` (a regex)."""
    label = ",".join(f"{name}={_describe(value)}" for name, value in changes.items())
    return pytest.param(function, changes, exception, argument, shown, id=f"{function}-{label}")


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}" + ("F" if not value.flags.c_contiguous else "")
    return repr(value)


def _literal(value):
    return re.escape(str(value))


def _without_parameters(function):
    """weight=None (and bias=None) so that a changed axis cannot also make the parameters' shape wrong."""
    return {name: None for name in ("weight", "bias") if name in VALID_CALLS[function]}


def _bad_calls():
    cases = []
    # num_groups: not dividing the 6 channels, out of range, not an integer
    for groups in (4, 5, 0, -1, 7, 12):
        cases.append(_case("group_norm", ValueError, "num_groups", _literal(groups), num_groups=groups))
    cases.append(_case("group_norm", (TypeError, ValueError), "num_groups", _literal(1.5), num_groups=1.5))

    for function in CHANNEL_NORMS:
        # The channel axis: out of range, or the batch axis
        for axis in (4, -5, 0, -4):
            cases.append(_case(function, ValueError, "axis", _literal(axis), axis=axis,
                               **_without_parameters(function)))
        # Fewer than 2 dimensions
        if not function.endswith("_backward"):
            cases.append(_case(function, ValueError, "x", r"\(6,\)|\b1\b", x=X[0, :, 0, 0]))

    for function in ("layer_norm", "rms_norm", "layer_norm_backward", "rms_norm_backward"):
        for axis in (4, -5):
            cases.append(_case(function, ValueError, "axis", _literal(axis), axis=axis,
                               **_without_parameters(function)))
        # The message may show the whole tuple or its offending member
        cases.append(_case(function, ValueError, "axis", r"\(2, 4\)|\b4\b", axis=(2, 4),
                           **_without_parameters(function)))
        # Not a contiguous block of axes
        for axis in ((1, 3), (0, 2, 3)):
            cases.append(_case(function, ValueError, "axis", _literal(axis), axis=axis,
                               **_without_parameters(function)))

    for function in VALID_CALLS:
        parameters = ("weight", "bias") if "bias" in VALID_CALLS[function] else ("weight",)
        right_size = VALID_CALLS[function]["weight"].shape[0]
        for parameter in parameters:
            for shape in ((right_size + 1,), (right_size, 1), (1, right_size), ()):
                cases.append(_case(function, ValueError, parameter, _literal(shape),
                                   **{parameter: np.ones(shape, np.float32)}))
            for dtype in (np.complex128, np.object_):
                cases.append(_case(function, TypeError, parameter, _literal(np.dtype(dtype)),
                                   **{parameter: np.ones(right_size, dtype)}))

        # Arrays that are not float16/32/64
        arrays = ("dy", "x") if function in BACKWARD else ("x",)
        for array in arrays:
            for dtype in (np.int32, np.int64, np.bool_, np.complex128, np.object_):
                value = VALID_CALLS[function][array].astype(dtype)
                cases.append(_case(function, TypeError, array, _literal(np.dtype(dtype)), **{array: value}))

        # out: wrong shape, wrong dtype, not C-contiguous, read-only
        cases.append(_case(function, ValueError, "out", _literal(WRONG_SHAPE), out=np.empty(WRONG_SHAPE, X.dtype)))
        cases.append(_case(function, (TypeError, ValueError), "out", "float64", out=np.empty(X.shape, np.float64)))
        cases.append(_case(function, ValueError, "out", "contiguous", out=np.empty(X.shape, X.dtype, order="F")))
        read_only = np.empty(X.shape, X.dtype)
        read_only.flags.writeable = False
        cases.append(_case(function, ValueError, "out", "read-only|writ", out=read_only))

    for function in FORWARD:
        for eps in (-0.5, float("nan"), float("inf"), -float("inf")):
            cases.append(_case(function, ValueError, "eps", _literal(eps), eps=eps))
        for eps in ("0.1", None):
            cases.append(_case(function, (TypeError, ValueError), "eps", _literal(eps), eps=eps))

    # Backward: dy not matching x, statistics not matching the forward's
    for function in BACKWARD:
        cases.append(_case(function, ValueError, "dy", _literal(WRONG_SHAPE), dy=np.ones(WRONG_SHAPE, np.float32)))
        for stat in ("mean", "rstd") if "mean" in VALID_CALLS[function] else ("rstd",):
            right = VALID_CALLS[function][stat]
            for shape in (right.shape[:-1] + (right.shape[-1] + 1,), right.shape + (1,), (1,) + right.shape[1:]):
                cases.append(_case(function, ValueError, stat, _literal(shape), **{stat: np.ones(shape)}))
    return cases


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("function", VALID_CALLS)
def test_valid_calls_succeed(function):
    """The baseline every bad call departs from is itself valid."""
    _call(function)


@pytest.mark.parametrize("function,changes,exception,argument,shown", BAD_CALLS)
def test_bad_argument_is_named_with_its_value(function, changes, exception, argument, shown):
    names_argument_and_value = rf"(?s)(?=.*\b{argument}\b)(?=.*(?:{shown}))"
    with pytest.raises(exception, match=names_argument_and_value):
        _call(function, **changes)


@pytest.mark.parametrize("function", FORWARD)
def test_bad_argument_is_rejected_before_writing_out(function):
    out = np.full_like(X, 7.0)
    with pytest.raises(ValueError):
        _call(function, out=out, eps=-1.0)
    with pytest.raises(ValueError):
        _call(function, out=out, weight=np.ones(5, np.float32))
    np.testing.assert_array_equal(out, 7.0)


@pytest.mark.parametrize("function", BACKWARD)
def test_bad_statistics_are_rejected_before_writing_out(function):
    out = np.full_like(X, 7.0)
    with pytest.raises(ValueError):
        _call(function, out=out, rstd=np.ones(3))
    np.testing.assert_array_equal(out, 7.0)
