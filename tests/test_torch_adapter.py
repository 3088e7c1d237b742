"""Tests of cynorm.adapters.torch: parity with torch.nn, gradients, layouts, fallbacks, conversion, compile, DDP."""
import copy
import functools
import itertools
import logging
import math
import pathlib
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import cynorm  # noqa: E402
import cynorm.adapters.torch as ct  # noqa: E402
from cynorm import slow  # noqa: E402
from cynorm._blocks import PAGE_BYTES  # noqa: E402

from _core_util import TOLERANCE as KERNEL_TOLERANCE  # noqa: E402
from _core_util import NormCase  # noqa: E402
from _torch_util import (ddp_train_worker, finished_marker, kernel_calls, kernels_for_small_inputs,  # noqa: E402,F401
                         small_conv_net, train, training_batch)

KERNEL_NAMES = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def random_tensor(shape, dtype=torch.float64, seed=0):
    """Seeded values with a non-zero mean and a non-unit scale, so that centering and scaling both matter."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1).to(dtype)


def in_layout(x, layout):
    """The same values as ``x`` in the given memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=MEMORY_FORMATS[x.dim()])
    if layout == "strided":
        return torch.stack([x, x], dim=-1)[..., 0]
    if layout == "last_axes_swapped":   # (dense, its last two axes in the other order in memory)
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 2 else x.contiguous()
    raise ValueError(layout)


def assert_close_scaled(actual, expected, tolerance):
    """Relative and absolute error within ``tolerance``, the absolute one relative to the largest |expected|."""
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance * scale)


TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-12}


# --------------------------------------------------------------------------------------------------------
# Module parity with torch.nn
# --------------------------------------------------------------------------------------------------------

# name: (torch.nn class, our class, constructor arguments, affine keyword, input shape)
MODULE_CASES = {
    "group_norm_1d": (nn.GroupNorm, ct.GroupNorm, dict(num_groups=3, num_channels=6), "affine", (3, 6, 7)),
    "group_norm_2d": (nn.GroupNorm, ct.GroupNorm, dict(num_groups=4, num_channels=8), "affine", (3, 8, 5, 6)),
    "group_norm_3d": (nn.GroupNorm, ct.GroupNorm, dict(num_groups=2, num_channels=4), "affine", (2, 4, 3, 4, 5)),
    "group_norm_no_spatial": (nn.GroupNorm, ct.GroupNorm, dict(num_groups=2, num_channels=8), "affine", (5, 8)),
    "instance_norm_1d": (nn.InstanceNorm1d, ct.InstanceNorm1d, dict(num_features=6), "affine", (3, 6, 9)),
    "instance_norm_1d_unbatched": (nn.InstanceNorm1d, ct.InstanceNorm1d, dict(num_features=6), "affine", (6, 9)),
    "instance_norm_2d": (nn.InstanceNorm2d, ct.InstanceNorm2d, dict(num_features=6), "affine", (2, 6, 5, 7)),
    "instance_norm_3d": (nn.InstanceNorm3d, ct.InstanceNorm3d, dict(num_features=4), "affine", (2, 4, 3, 4, 5)),
    "layer_norm": (nn.LayerNorm, ct.LayerNorm, dict(normalized_shape=16), "elementwise_affine", (4, 5, 16)),
    "layer_norm_two_axes": (nn.LayerNorm, ct.LayerNorm, dict(normalized_shape=(5, 6)), "elementwise_affine",
                            (3, 5, 6)),
    "layer_norm_no_bias": (nn.LayerNorm, ct.LayerNorm, dict(normalized_shape=(6, 7), bias=False),
                           "elementwise_affine", (2, 3, 6, 7)),
    "rms_norm": (nn.RMSNorm, ct.RMSNorm, dict(normalized_shape=16), "elementwise_affine", (4, 5, 16)),
    "rms_norm_two_axes_eps": (nn.RMSNorm, ct.RMSNorm, dict(normalized_shape=(5, 6), eps=1e-3), "elementwise_affine",
                              (3, 5, 6)),
}


KERNEL_OF_MODULE = {ct.GroupNorm: "group_norm", ct.InstanceNorm1d: "instance_norm", ct.InstanceNorm2d: "instance_norm",
                    ct.InstanceNorm3d: "instance_norm", ct.LayerNorm: "layer_norm", ct.RMSNorm: "rms_norm"}


def module_pair(case, affine, dtype=torch.float32, seed=1):
    """The torch.nn module and ours, with the same random (not default) parameters."""
    torch_class, our_class, arguments, affine_keyword, _ = MODULE_CASES[case]
    theirs = torch_class(**arguments, **{affine_keyword: affine}, dtype=dtype)
    with torch.no_grad():
        for index, parameter in enumerate(theirs.parameters()):
            parameter.copy_(random_tensor(parameter.shape, seed=seed + index))
    ours = our_class(**arguments, **{affine_keyword: affine}, dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def parity_params():
    return [pytest.param(case, layout, id=f"{case}-{layout}")
            for case, (*_, shape) in MODULE_CASES.items()
            for layout in ["contiguous", "strided"] + (["channels_last"] if len(shape) in MEMORY_FORMATS else [])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case, layout", parity_params())
def test_module_forward_and_backward_match_torch(case, layout, affine, dtype, kernel_calls):
    theirs, ours = module_pair(case, affine, dtype)
    reference, _ = module_pair(case, affine, torch.float64)
    shape = MODULE_CASES[case][-1]
    x = in_layout(random_tensor(shape, dtype, seed=2), layout).requires_grad_()
    x_before = x.detach().clone()
    x_reference = x.detach().double().requires_grad_()
    grad_output = random_tensor(shape, dtype, seed=3)

    y = ours(x)
    y_reference = reference(x_reference)
    # Like torch's, except that channels-last instance, layer and RMS norm keep the input's layout (torch's
    # output is contiguous): in channels-last memory the normalized axes lie together.
    keeps_layout = layout == "channels_last" and KERNEL_OF_MODULE[type(ours)] != "group_norm"
    assert y.dtype == dtype and y.stride() == (x.stride() if keeps_layout else theirs(x).stride())
    assert_close_scaled(y, y_reference, TOLERANCES[dtype])

    grads = torch.autograd.grad(y, [x, *ours.parameters()], grad_output)
    grads_reference = torch.autograd.grad(y_reference, [x_reference, *reference.parameters()], grad_output.double())
    for grad, grad_reference in zip(grads, grads_reference, strict=True):
        assert_close_scaled(grad, grad_reference, TOLERANCES[dtype])
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)
    assert len(kernel_calls["forward"]) == 1 and len(kernel_calls["backward"]) == 1


# A drawn call of the functional API: the norm, the input's shape, layout and dtype, which parameters it has and
# which tensors record a gradient (none under no_grad or inference_mode), eps, the data's offset from zero, and
# whether small inputs go to torch's function.  Successive examples share the adapter's kept verdicts (see
# _eager_verdict), so that one signature meets other grad modes, settings and parameters.
LAYOUTS = ("contiguous", "channels_last", "strided", "last_axes_swapped")
GRAD_MODES = ("record", "no_grad", "inference_mode")
# The kernels' accuracy (see tests/_core_util.py), on drawn data that may lie far from zero; bfloat16 goes to torch's
# function, whose own error bounds it
DRAWN_TOLERANCES = {torch.float32: KERNEL_TOLERANCE[np.float32], torch.float64: KERNEL_TOLERANCE[np.float64],
                    torch.float16: KERNEL_TOLERANCE[np.float16], torch.bfloat16: KERNEL_TOLERANCE[np.float16]}


@st.composite
def functional_calls(draw):
    norm = draw(st.sampled_from(KERNEL_NAMES))
    if norm in ("group_norm", "instance_norm"):
        num_groups = draw(st.integers(1, 4))
        channels = num_groups * draw(st.integers(1, 5))
        spatial = draw(st.lists(st.integers(1, 9), min_size=1 if norm == "instance_norm" else 0, max_size=3))
        if norm == "instance_norm" and math.prod(spatial) == 1:
            spatial[-1] = 2   # (torch refuses a single value per channel)
        shape = (draw(st.integers(1, 3)), channels, *spatial)
        param_shape = (channels,)
    else:
        num_groups = None
        shape = tuple(draw(st.lists(st.integers(1, 17), min_size=1, max_size=4)))
        param_shape = shape[len(shape) - draw(st.integers(1, min(2, len(shape)))):]
    layouts = [layout for layout in LAYOUTS if layout != "channels_last" or len(shape) in MEMORY_FORMATS]
    grad_mode = draw(st.sampled_from(GRAD_MODES))
    has_weight = draw(st.booleans())
    has_bias = norm != "rms_norm" and draw(st.booleans())
    records = grad_mode == "record"
    return dict(
        norm=norm, shape=shape, param_shape=param_shape, num_groups=num_groups,
        layout=draw(st.sampled_from(layouts)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])),
        has_weight=has_weight, has_bias=has_bias, grad_mode=grad_mode,
        # (x, weight, bias); a norm of tensors of which none records a gradient runs as inference
        needs_grad=(records and draw(st.booleans()), records and has_weight and draw(st.booleans()),
                    records and has_bias and draw(st.booleans())),
        eps=draw(st.sampled_from([1e-5, 1e-3, None] if norm == "rms_norm" else [1e-5, 1e-3])),
        offset=draw(st.sampled_from([0.0, 1e3])),
        small_inputs_to_torch=draw(st.booleans()),
    )


def _functional_call(module, call, x, weight, bias):
    """``call``'s norm through ``module`` (torch.nn.functional or the adapter)."""
    norm, eps = call["norm"], call["eps"]
    if norm == "group_norm":
        return module.group_norm(x, call["num_groups"], weight, bias, eps)
    if norm == "instance_norm":
        return module.instance_norm(x, weight=weight, bias=bias, eps=eps)
    if norm == "layer_norm":
        return module.layer_norm(x, list(call["param_shape"]), weight, bias, eps)
    return module.rms_norm(x, list(call["param_shape"]), weight, eps)


def _run_functional_call(module, call, tensors, grad_output):
    """The output and the gradients of ``call`` through ``module``, in the call's grad mode; the gradients of
    the tensors that record one (None for the others, and without a gradient to record)."""
    mode = {"record": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    tensors = [None if t is None else t.detach().requires_grad_(needs) for t, needs in zip(tensors,
                                                                                         call["needs_grad"])]
    with mode[call["grad_mode"]]():
        output = _functional_call(module, call, *tensors)
    recording = [t for t in tensors if t is not None and t.requires_grad]
    grads = dict(zip(map(id, recording), torch.autograd.grad(output, recording, grad_output) if recording else ()))
    return output, [None if t is None else grads.get(id(t)) for t in tensors]


def _reference_results(call, tensors, grad_output):
    """cynorm.slow's output of ``call`` on ``tensors`` (x, weight, bias), and the gradients of each for
    ``grad_output``, as float64 tensors."""
    x, weight, bias = (None if t is None else t.detach().double().numpy() for t in tensors)
    norm = call["norm"].removesuffix("_norm")
    axis = 1 if norm in ("group", "instance") else tuple(range(x.ndim - len(call["param_shape"]), x.ndim))
    case = NormCase(norm, x.shape, axis, call["num_groups"] if norm == "group" else None)
    # (eps None, RMS norm's: the input dtype's epsilon, as torch takes it)
    eps = torch.finfo(tensors[0].dtype).eps if call["eps"] is None else call["eps"]
    y, stats = case.forward_with_stats(slow, x, weight, bias, eps=eps)
    grads = case.backward(slow, grad_output.double().numpy(), x, stats, weight)
    return torch.from_numpy(np.asarray(y)), [None if g is None else torch.from_numpy(np.asarray(g)) for g in grads]


def assert_as_close_as_torch(actual, torchs, reference, tolerance):
    """``actual`` within ``tolerance`` of the float64 ``reference``, relative to its largest value or to 1 if that
    is smaller (drawn data are of unit scale, and some gradients cancel to nearly 0: a layer norm over one value, a
    group of two), or no further from it than twice ``torchs``, torch's own result of the same dtype (where a result
    is as ill-conditioned as an RMS norm of one value near 0, whose worst values on either side differed 1.4x, or
    comes from torch's function)."""
    reference = reference.double()
    error = (actual.double() - reference).abs().max().item()
    torchs_error = (torchs.double() - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1.0)
    assert error <= max(tolerance * scale, 2 * torchs_error), (error, torchs_error, scale)


@given(functional_calls())
def test_drawn_functional_calls_match_torch(call):
    """Outputs and gradients as close to the float64 reference as the dtype allows, or as torch's own results
    (the calls that go to torch's function are torch's), of torch's dtype, memory layout and gradient recording,
    on inputs that stay unchanged; or torch's error."""
    previous = ct.use_torch_for_small_inputs(call["small_inputs_to_torch"])
    try:
        dtype, shape = call["dtype"], call["shape"]
        seed = len(shape) + sum(shape)
        x = in_layout((random_tensor(shape, seed=seed) + call["offset"]).to(dtype), call["layout"])
        weight = random_tensor(call["param_shape"], dtype, seed=seed + 1) if call["has_weight"] else None
        bias = random_tensor(call["param_shape"], dtype, seed=seed + 2) if call["has_bias"] else None
        grad_output = random_tensor(shape, dtype, seed=seed + 3)
        tensors = [x, weight, bias]
        before = [None if t is None else t.clone() for t in tensors]

        try:
            output, grads = _run_functional_call(ct, call, tensors, grad_output)
        except ValueError as error:   # (e.g. a single value in each group's channels, which torch refuses)
            with pytest.raises(ValueError, match=re.escape(str(error))):
                _run_functional_call(F, call, tensors, grad_output)
            return
        # torch's CPU group norm crashes in a backward for a channels-last input that records no gradient under
        # parameters that do (see _torch_group_norm_backward_crashes): its results then come from a contiguous copy
        x_needs, *params_need = call["needs_grad"]
        torch_crashes = (call["norm"] == "group_norm" and call["layout"] == "channels_last" and not x_needs
                         and any(params_need))
        torchs = [t.contiguous() if torch_crashes and t is not None else t for t in tensors]
        # and torch 2.13's group norm backward raises "tensor does not have a device" for a bias without a weight
        # (the adapter gives that bias its gradient, see test_group_norm_bias_without_weight_gets_its_gradient):
        # there torch's function gets ones
        if call["norm"] == "group_norm" and not call["has_weight"] and params_need[1]:
            torchs[1] = torch.ones(call["param_shape"], dtype=dtype)
        expected, expected_grads = _run_functional_call(F, call, torchs, grad_output)
        reference, reference_grads = _reference_results(call, tensors, grad_output)

        for t, t_before in zip(tensors, before):
            assert t is None or torch.equal(t, t_before)
        assert output.dtype == expected.dtype and output.shape == expected.shape
        assert output.requires_grad == expected.requires_grad
        assert output.is_inference() == expected.is_inference()
        if call["layout"] == "contiguous":
            assert output.is_contiguous()
        elif call["layout"] == "channels_last":   # (or torch's layout, from torch's function)
            assert output.is_contiguous(memory_format=MEMORY_FORMATS[x.dim()]) or output.stride() == expected.stride()
        results = [(output, expected, reference)] + [
            (grad, expected_grad, reference_grad)
            for grad, expected_grad, reference_grad in zip(grads, expected_grads, reference_grads)
            if grad is not None or expected_grad is not None]
        for actual, torchs_result, exact in results:
            assert actual is not None and torchs_result is not None and actual.dtype == dtype
            assert_as_close_as_torch(actual, torchs_result, exact, DRAWN_TOLERANCES[dtype])
    finally:
        ct.use_torch_for_small_inputs(previous)


@pytest.mark.parametrize("case", ["group_norm_2d", "group_norm_3d", "instance_norm_2d", "instance_norm_3d"])
def test_channels_last_runs_in_place_without_transposing_copy(case, kernel_calls):
    _, ours = module_pair(case, affine=True)
    x = in_layout(random_tensor(MODULE_CASES[case][-1], torch.float32), "channels_last")
    y = ours(x)
    assert y.is_contiguous(memory_format=MEMORY_FORMATS[x.dim()])
    (x_address, y_address, size, *_, geometry, _, _), = kernel_calls["forward"]
    # The kernel reads the input's own memory as (N, *spatial, C), channels innermost, and writes the output's.
    assert (x_address, y_address, size) == (x.data_ptr(), y.data_ptr(), x.numel())
    assert not geometry.rows and geometry.n_cols == x.shape[1] and geometry.n_rows == x[0, 0].numel()


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", ["group_norm_2d", "group_norm_3d", "instance_norm_2d", "instance_norm_3d"])
def test_channels_last_gradient_is_read_where_it_lies(case, grad_layout, kernel_calls):
    """A gradient laid out like the channels-last input goes to the backward kernel as it is; one in another
    layout is copied into the input's first.  Either way the gradients are torch's."""
    theirs, ours = module_pair(case, affine=True, dtype=torch.float64)
    x = in_layout(random_tensor(MODULE_CASES[case][-1], torch.float64, seed=4), "channels_last").requires_grad_()
    grad_output = in_layout(random_tensor(x.shape, torch.float64, seed=5), grad_layout)
    grads = torch.autograd.grad(ours(x), [x, *ours.parameters()], grad_output)
    grads_reference = torch.autograd.grad(theirs(x), [x, *theirs.parameters()], grad_output)
    for grad, grad_reference in zip(grads, grads_reference, strict=True):
        assert_close_scaled(grad, grad_reference, TOLERANCES[torch.float64])
    (dy_address, x_address, *_), = kernel_calls["backward"]
    assert x_address == x.data_ptr()
    assert (dy_address == grad_output.data_ptr()) == (grad_layout == "channels_last")


# (shape of the memory, permutation viewing it, number of normalized trailing axes, whether they lie together
# in memory and in order, so that the kernels normalize the input where it lies)
PERMUTED_CASES = {
    "convnext_channel_norm": ((2, 6, 5, 7), (0, 2, 3, 1), 1, True),    # NCHW memory seen as NHWC
    "time_major": ((5, 3, 8), (1, 0, 2), 1, True),                      # (time, batch, features) seen batch-first
    "two_axes_batch_inside": ((3, 4, 5, 6), (1, 0, 2, 3), 2, True),
    "features_outermost": ((4, 2, 3), (1, 2, 0), 1, True),
    "axes_apart": ((2, 3, 4, 5), (0, 2, 1, 3), 2, False),
    "axes_out_of_order": ((2, 5, 4), (0, 2, 1), 2, False),
}


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", PERMUTED_CASES)
def test_permuted_input_is_normalized_where_it_lies(case, norm, kernel_calls):
    """A permuted view whose normalized axes lie together in memory is normalized without a copy, into an output
    laid out like the input; other layouts are copied first.  Either way values and gradients are torch's."""
    memory_shape, permutation, num_axes, in_place = PERMUTED_CASES[case]
    x = random_tensor(memory_shape, torch.float32, seed=5).permute(permutation).requires_grad_()
    x_reference = x.detach().double().requires_grad_()
    normalized_shape = tuple(x.shape[-num_axes:])
    params = [random_tensor(normalized_shape, seed=6 + i).float().requires_grad_() for i in range(2)]
    params = params if norm == "layer_norm" else params[:1]
    params_reference = [p.detach().double().requires_grad_() for p in params]
    grad_output = random_tensor(x.shape, torch.float32, seed=8)

    y = getattr(ct, norm)(x, normalized_shape, *params, eps=1e-5)
    y_reference = getattr(F, norm)(x_reference, normalized_shape, *params_reference, eps=1e-5)
    assert_close_scaled(y, y_reference, TOLERANCES[torch.float32])
    grads = torch.autograd.grad(y, [x, *params], grad_output)
    grads_reference = torch.autograd.grad(y_reference, [x_reference, *params_reference], grad_output.double())
    for grad, grad_reference in zip(grads, grads_reference, strict=True):
        assert_close_scaled(grad, grad_reference, TOLERANCES[torch.float32])

    assert y.stride() == (x.stride() if in_place else y_reference.stride())
    (x_address, y_address, *_), = kernel_calls["forward"]
    assert (x_address == x.data_ptr()) == in_place and y_address == y.data_ptr()
    # the operators (torch.compile's path) agree with the eager path, layout included
    op_output = getattr(torch.ops.cynorm, norm)(x.detach(), list(normalized_shape), *params, 1e-5)
    assert op_output[0].stride() == y.stride()
    torch.testing.assert_close(op_output[0], y.detach(), rtol=0, atol=0)
    op_grads = getattr(torch.ops.cynorm, f"{norm}_backward")(grad_output, x.detach(), *op_output[1:], params[0])
    for grad, op_grad in zip(grads, op_grads):
        torch.testing.assert_close(op_grad, grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# The autograd operators
# --------------------------------------------------------------------------------------------------------

def _double(*shapes, seed=4):
    return [random_tensor(shape, seed=seed + i).requires_grad_() for i, shape in enumerate(shapes)]


# name: (kernel name, function of the differentiable tensors, those tensors in float64)
FUNCTION_CASES = {
    "group_norm": ("group_norm", lambda x, w, b: ct.group_norm(x, 2, w, b), lambda: _double((2, 4, 3, 3), 4, 4)),
    "group_norm_channels_last": ("group_norm", lambda x, w, b: ct.group_norm(
        x.contiguous(memory_format=torch.channels_last), 2, w, b), lambda: _double((2, 4, 3, 3), 4, 4)),
    "group_norm_no_affine": ("group_norm", lambda x: ct.group_norm(x, 3, eps=1e-3), lambda: _double((2, 6, 5))),
    "instance_norm": ("instance_norm", lambda x, w, b: ct.instance_norm(x, weight=w, bias=b),
                      lambda: _double((2, 3, 4, 2), 3, 3)),
    "layer_norm": ("layer_norm", lambda x, w, b: ct.layer_norm(x, (3, 4), w, b), lambda: _double((2, 3, 4), (3, 4),
                                                                                                (3, 4))),
    "layer_norm_no_affine": ("layer_norm", lambda x: ct.layer_norm(x, 5), lambda: _double((3, 5))),
    "rms_norm": ("rms_norm", lambda x, w: ct.rms_norm(x, (4,), w, eps=1e-5), lambda: _double((3, 2, 4), 4)),
    "rms_norm_no_affine": ("rms_norm", lambda x: ct.rms_norm(x, [3, 4]), lambda: _double((2, 3, 4))),
    "layer_norm_permuted": ("layer_norm", lambda x, w, b: ct.layer_norm(x.permute(0, 2, 3, 1), (3,), w, b),
                            lambda: _double((2, 3, 2, 4), 3, 3)),
    "rms_norm_permuted": ("rms_norm", lambda x, w: ct.rms_norm(x.permute(0, 2, 3, 1), (3,), w),
                          lambda: _double((2, 3, 2, 4), 3)),
}


@pytest.mark.parametrize("case", FUNCTION_CASES)
def test_gradcheck(case, kernel_calls):
    kernel, function, make_inputs = FUNCTION_CASES[case]
    assert torch.autograd.gradcheck(function, make_inputs())
    assert kernel_calls["forward"] and kernel_calls["backward"]


def _float16_requiring_grad(*arguments):
    """The tensors among ``arguments`` in float16, each a leaf that requires a gradient."""
    return tuple(a.half().requires_grad_() if isinstance(a, Tensor) else a for a in arguments)


# name: (operator, its arguments, float64 unless named otherwise)
OPERATOR_CASES = {
    "group_norm": (torch.ops.cynorm.group_norm, lambda: (*_double((2, 4, 3, 3))[:1], 2, *_double(4, 4), 1e-5)),
    "group_norm_channels_last": (torch.ops.cynorm.group_norm, lambda: (
        in_layout(random_tensor((2, 4, 3, 3)), "channels_last").requires_grad_(), 2, None, None, 1e-5)),
    "instance_norm": (torch.ops.cynorm.instance_norm, lambda: (*_double((2, 3, 4, 2), 3, 3), 1e-5)),
    "layer_norm": (torch.ops.cynorm.layer_norm, lambda: (*_double((2, 3, 4))[:1], [3, 4], *_double((3, 4), (3, 4)),
                                                         1e-5)),
    "rms_norm": (torch.ops.cynorm.rms_norm, lambda: (*_double((3, 4))[:1], [4], *_double(4), 1e-5)),
    # float16 goes through the NumPy API, whose parameter gradients are float32: the operators give float16
    "group_norm_float16": (torch.ops.cynorm.group_norm, lambda: _float16_requiring_grad(
        random_tensor((2, 4, 3, 3)), 2, random_tensor(4, seed=1), random_tensor(4, seed=2), 1e-5)),
    "layer_norm_float16": (torch.ops.cynorm.layer_norm, lambda: _float16_requiring_grad(
        random_tensor((2, 3, 4)), [4], random_tensor(4, seed=1), random_tensor(4, seed=2), 1e-5)),
    "group_norm_backward_float16": (torch.ops.cynorm.group_norm_backward, lambda: (
        random_tensor((2, 4, 3, 3), torch.float16, seed=3), random_tensor((2, 4, 3, 3), torch.float16),
        *torch.ops.cynorm.group_norm(random_tensor((2, 4, 3, 3), torch.float16), 2, None, None, 1e-5)[1:],
        random_tensor(4, torch.float16, seed=1))),
    "layer_norm_backward_float16": (torch.ops.cynorm.layer_norm_backward, lambda: (
        random_tensor((2, 3, 4), torch.float16, seed=3), random_tensor((2, 3, 4), torch.float16),
        *torch.ops.cynorm.layer_norm(random_tensor((2, 3, 4), torch.float16), [4], None, None, 1e-5)[1:],
        random_tensor(4, torch.float16, seed=1))),
}


@pytest.mark.parametrize("case", OPERATOR_CASES)
def test_operator_registration(case):
    """torch's own checks of the schema, the fake (meta) implementation and the autograd registration."""
    operator, make_arguments = OPERATOR_CASES[case]
    torch.library.opcheck(operator.default, make_arguments())


def test_operators_check_what_callers_of_torch_ops_pass():
    """The eager paths skip the NumPy API's checks on arguments they checked themselves; the operators, which
    anyone can call, do not: bad arguments raise instead of reaching the kernels."""
    x, weight = random_tensor((2, 4, 3)), random_tensor(4)
    _, mean, rstd = torch.ops.cynorm.group_norm(x, 2, weight, None, 1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        torch.ops.cynorm.group_norm(x, 3, weight, None, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.cynorm.group_norm(x, 2, random_tensor(5), None, 1e-5)
    with pytest.raises(ValueError, match="mean"):
        torch.ops.cynorm.group_norm_backward(x, x, mean[:1], rstd, weight)
    with pytest.raises(ValueError, match="rstd"):
        torch.ops.cynorm.layer_norm_backward(x, x, *torch.ops.cynorm.layer_norm(x, [3], None, None, 1e-5)[1:2],
                                             random_tensor((2, 3)), None)
    with pytest.raises(ValueError, match="dy"):
        torch.ops.cynorm.rms_norm_backward(x[:1], x, torch.ops.cynorm.rms_norm(x, [3], None, 1e-5)[1], None)


def _in_other_memory(stat):
    """The same values, every stride doubled."""
    return torch.stack([stat, stat], dim=-1)[..., 0]


# name: (operator name, a function of the dtype making its forward's arguments)
TRUSTED_OPERATOR_CASES = {
    "group_norm": ("group_norm", lambda dtype: (random_tensor((3, 6, 5), dtype), 2, random_tensor(6, dtype, seed=1),
                                                random_tensor(6, dtype, seed=2), 1e-5)),
    "group_norm_channels_last": ("group_norm", lambda dtype: (
        in_layout(random_tensor((3, 8, 2, 5), dtype), "channels_last"), 4, random_tensor(8, dtype, seed=1), None,
        1e-3)),
    "instance_norm_strided": ("instance_norm", lambda dtype: (
        in_layout(random_tensor((2, 3, 4, 2), dtype), "strided"), random_tensor(3, dtype, seed=1),
        random_tensor(3, dtype, seed=2), 1e-5)),
    "layer_norm_permuted": ("layer_norm", lambda dtype: (
        random_tensor((3, 4, 2, 5), dtype).permute(0, 2, 3, 1), [4], random_tensor(4, dtype, seed=1),
        random_tensor(4, dtype, seed=2), 1e-5)),
    "rms_norm": ("rms_norm", lambda dtype: (random_tensor((3, 2, 6), dtype), [2, 6],
                                            random_tensor((2, 6), dtype, seed=1), 1e-5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", TRUSTED_OPERATOR_CASES)
def test_operators_skip_the_numpy_api_on_arguments_they_have_checked(case, dtype, monkeypatch):
    """torch.compile's graphs call the operators: on arguments that pass the functional API's checks, and
    statistics laid out as their forward returns them, the operators skip the NumPy API's second round of checks,
    and give its bits; statistics of other strides take the NumPy API's path."""
    name, make_arguments = TRUSTED_OPERATOR_CASES[case]
    forward, backward = getattr(torch.ops.cynorm, name), getattr(torch.ops.cynorm, f"{name}_backward")
    arguments = make_arguments(dtype)
    input, weight = arguments[0], arguments[2 if name in ("group_norm", "layer_norm", "rms_norm") else 1]
    grad_output = random_tensor(input.shape, dtype, seed=9)

    def run(*statistics_layouts):
        output = forward(*arguments)
        statistics = [layout(stat) for layout, stat in zip(statistics_layouts, output[1:])]
        return output, backward(grad_output, input, *statistics, weight)

    numpy_api_calls = []
    # (instance norm's operators call the NumPy API's group norm, with a group per channel)
    numpy_api_functions = [f"{name}", f"{name}_backward"] if name != "instance_norm" else [
        "group_norm", "group_norm_backward"]

    def watch_numpy_api(functions):
        for function in functions:
            original = getattr(cynorm, function)
            monkeypatch.setattr(cynorm, function, lambda *a, _original=original, _name=function, **k: (
                numpy_api_calls.append(_name), _original(*a, **k))[1])

    watch_numpy_api(numpy_api_functions)
    as_returned = (lambda stat: stat,) * 2
    outputs, grads = run(*as_returned)
    assert numpy_api_calls == []
    for predicate in ("_group_norm_takes", "_instance_norm_takes", "_layer_norm_takes", "_rms_norm_takes",
                      "_channel_norm_backward_takes", "_trailing_norm_backward_takes"):
        monkeypatch.setattr(ct, predicate, lambda *a, **k: False)
    numpy_outputs, numpy_grads = run(*as_returned)
    assert numpy_api_calls == numpy_api_functions
    for got, expected in zip([*outputs, *grads], [*numpy_outputs, *numpy_grads], strict=True):
        assert got.stride() == expected.stride()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    monkeypatch.undo()

    numpy_api_calls.clear()
    watch_numpy_api(numpy_api_functions[1:])
    _, other_grads = run(_in_other_memory, _in_other_memory)
    assert numpy_api_calls == numpy_api_functions[1:]
    for got, expected in zip(other_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", FUNCTION_CASES)
def test_gradgradcheck(case, kernel_calls):
    """Gradients of gradients: a backward with create_graph=True records torch's own gradients of the norm."""
    kernel, function, make_inputs = FUNCTION_CASES[case]
    assert torch.autograd.gradgradcheck(function, make_inputs())
    assert kernel_calls["forward"]


@pytest.mark.parametrize("case", FUNCTION_CASES)
def test_batched_gradients(case, kernel_calls):
    """autograd.grad with is_grads_batched=True (torch.autograd.functional.jacobian and hessian with
    vectorize=True) batches the incoming gradient with vmap, which leaves the kernels no memory to read: torch's
    function gives those gradients, as the kernels give them one at a time (the call failed before)."""
    _, function, make_inputs = FUNCTION_CASES[case]
    inputs = make_inputs()
    output = function(*inputs)
    grad_outputs = random_tensor((3, *output.shape), seed=9)
    if case == "group_norm_channels_last":   # (torch's function on a channels-last input raises the same under vmap)
        with pytest.raises(RuntimeError, match="NYI: querying is_contiguous inside of vmap"):
            torch.autograd.grad(output, inputs, grad_outputs, is_grads_batched=True)
        return
    batched = torch.autograd.grad(output, inputs, grad_outputs, retain_graph=True, is_grads_batched=True)
    for index, grad_output in enumerate(grad_outputs):
        one_at_a_time = torch.autograd.grad(output, inputs, grad_output, retain_graph=True)
        for got, expected in zip(batched, one_at_a_time, strict=True):
            torch.testing.assert_close(got[index], expected, rtol=1e-12, atol=1e-12)
    assert kernel_calls["forward"] and kernel_calls["backward"]


def test_vectorized_hessian_of_a_group_norm():
    """torch.autograd.functional.hessian(vectorize=True), which fails on torch's own group_norm in torch 2.13 (a
    size mismatch in its batched double backward), gives the Hessian that torch's computes one row at a time."""
    x, weight, bias = _double((2, 4, 3, 3), 4, 4)

    def hessian(group_norm, vectorize):
        return torch.autograd.functional.hessian(lambda t: group_norm(t, 2, weight, bias).pow(3).sum(), x,
                                                 vectorize=vectorize)

    torch.testing.assert_close(hessian(ct.group_norm, vectorize=True), hessian(F.group_norm, vectorize=False),
                               rtol=1e-12, atol=1e-12)


def test_gradient_penalty_through_a_converted_model_gives_torchs_gradients(kernel_calls):
    """A WGAN-GP critic's step (the gradient of the score with respect to the images, differentiated again) on a
    converted model: every parameter's gradient as the torch.nn model gives it."""
    torch.manual_seed(0)
    # (no bias before the instance norm, which removes it: its gradient would be rounding error)
    critic = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, bias=False),
                           nn.InstanceNorm2d(8, affine=True), nn.SiLU(), nn.Flatten(), nn.LayerNorm(8 * 4 * 4),
                           nn.Linear(8 * 4 * 4, 16), nn.RMSNorm(16), nn.Linear(16, 1)).double()
    converted = ct.convert(critic)
    images = random_tensor((4, 3, 8, 8))

    def penalty_step(model):
        x = images.clone().requires_grad_()
        score = model(x)
        grad, = torch.autograd.grad(score.sum(), x, create_graph=True)
        loss = score.mean() + 10 * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        model.zero_grad()
        loss.backward()
        return [parameter.grad for parameter in model.parameters()]

    for ours, theirs in zip(penalty_step(converted), penalty_step(critic), strict=True):
        assert_close_scaled(ours, theirs, TOLERANCES[torch.float64])
    assert len(kernel_calls["forward"]) == 4 and kernel_calls["backward"]


@pytest.mark.parametrize("case", ["group_norm", "instance_norm", "layer_norm", "rms_norm"])
def test_double_backward_through_the_operators_raises_clear_error(case):
    """Calls of torch.ops.cynorm (direct, or under dispatch modes) differentiate through the backward operators,
    which refuse it.  (Under torch.compile, torch's autograd refuses double backward first, for torch's norms too.)"""
    operator, make_arguments = OPERATOR_CASES[case]
    arguments = make_arguments()
    inputs = [a for a in arguments if isinstance(a, Tensor)]
    first_order = torch.autograd.grad(operator(*arguments)[0].pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"double backward .* not supported through the operator "
                                           rf"torch\.ops\.cynorm\.{case}_backward"):
        torch.autograd.grad(sum(g.sum() for g in first_order), inputs)


# name: (cynorm's function, torch's), both of (x, weight, bias) with x of shape (2, 4, 3, 3)
TRANSFORM_CASES = {
    "group_norm": (lambda x, w, b: ct.group_norm(x, 2, w, b), lambda x, w, b: F.group_norm(x, 2, w, b)),
    "instance_norm": (lambda x, w, b: ct.instance_norm(x, weight=w, bias=b),
                      lambda x, w, b: F.instance_norm(x, weight=w, bias=b)),
    "layer_norm": (lambda x, w, b: ct.layer_norm(x, (3,), w[:3], b[:3]),
                   lambda x, w, b: F.layer_norm(x, (3,), w[:3], b[:3])),
    "rms_norm": (lambda x, w, b: ct.rms_norm(x, (3,), w[:3]), lambda x, w, b: F.rms_norm(x, (3,), w[:3])),
}


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_torch_func_transforms_give_torchs_results(case, kernel_calls):
    """grad, vmap and jacrev (per-sample gradients, Jacobians) run torch's functions, which they can transform."""
    ours, theirs = TRANSFORM_CASES[case]
    x, weight, bias = (random_tensor(shape, seed=seed) for seed, shape in enumerate([(2, 4, 3, 3), (4,), (4,)]))

    def loss(function):
        return lambda x, w, b: function(x, w, b).pow(3).sum()

    results = {
        "grad": (torch.func.grad(loss(ours), argnums=(0, 1, 2)), torch.func.grad(loss(theirs), argnums=(0, 1, 2))),
        "vmap": (torch.func.vmap(lambda xi, w, b: ours(xi.unsqueeze(0), w, b), in_dims=(0, None, None)),
                 torch.func.vmap(lambda xi, w, b: theirs(xi.unsqueeze(0), w, b), in_dims=(0, None, None))),
        "jacrev": (torch.func.jacrev(ours, argnums=1), torch.func.jacrev(theirs, argnums=1)),
    }
    for name, (transformed_ours, transformed_theirs) in results.items():
        torch.testing.assert_close(transformed_ours(x, weight, bias), transformed_theirs(x, weight, bias),
                                   rtol=0, atol=0, msg=lambda message: f"{name}: {message}")
    assert not kernel_calls
    # outside the transforms the kernels run again
    ours(x, weight, bias)
    assert kernel_calls


@pytest.mark.parametrize("case", TRANSFORM_CASES)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # (torch.jit.script, in torch's forward-mode formulas)
def test_forward_mode_dual_tensors_give_torchs_tangents(case, kernel_calls):
    """Inside torch.autograd.forward_ad.dual_level() torch's functions run, whose outputs carry the tangent (the
    kernels' had none)."""
    ours, theirs = TRANSFORM_CASES[case]
    x, tangent, weight, bias = (random_tensor(shape, seed=seed)
                                for seed, shape in enumerate([(2, 4, 3, 3), (2, 4, 3, 3), (4,), (4,)]))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        outputs = [torch.autograd.forward_ad.unpack_dual(function(dual, weight, bias)) for function in (ours, theirs)]
    assert outputs[1].tangent is not None
    torch.testing.assert_close(outputs[0].primal, outputs[1].primal, rtol=0, atol=0)
    torch.testing.assert_close(outputs[0].tangent, outputs[1].tangent, rtol=0, atol=0)
    assert not kernel_calls
    ours(x, weight, bias)
    assert kernel_calls


class _LoggedTensor(torch.Tensor):
    """A tensor subclass that records the torch functions called on it."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _LoggingMode(torch.overrides.TorchFunctionMode):
    """A torch function mode that records the torch functions called while it is on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_torch_function_subclasses_and_modes_see_torchs_calls(case, kernel_calls):
    """A tensor subclass or a mode with ``__torch_function__`` sees the calls torch's function makes and nothing
    more (the adapter's size queries came first), and torch's function computes: torch's results and types."""
    ours, theirs = TRANSFORM_CASES[case]
    x, weight, bias = (random_tensor(shape, seed=seed) for seed, shape in enumerate([(2, 4, 3, 3), (4,), (4,)]))
    outputs, subclass_calls, mode_calls = [], [], []
    for function in (ours, theirs):
        _LoggedTensor.calls = []
        outputs.append(function(x.as_subclass(_LoggedTensor), weight, bias))
        subclass_calls.append(_LoggedTensor.calls)
        with _LoggingMode() as mode:
            function(x, weight, bias)
        mode_calls.append(mode.calls)
    assert subclass_calls[0] == subclass_calls[1] and subclass_calls[0]
    assert mode_calls[0] == mode_calls[1] and mode_calls[0]
    assert type(outputs[0]) is type(outputs[1]) is _LoggedTensor
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not kernel_calls


def _nested(*shapes):
    return torch.nested.nested_tensor([random_tensor(shape, seed=seed) for seed, shape in enumerate(shapes)])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_nested_and_sparse_tensors_get_torchs_function(grad, kernel_calls):
    """Nested tensors (torch.nested's strided layout: no shape) and sparse ones (no strides) go to torch's
    function, with its results and errors, on the inference path as on the full path: a converted model's
    LayerNorm takes nested tensors as torch.nn's does (it asked for their shape before)."""
    nested = _nested((700, 768), (500, 768))   # (large enough for the kernels, were it a plain tensor)
    weight = random_tensor((8,), seed=3).requires_grad_(grad)
    calls = [lambda module, functional: module(nested),
             lambda module, functional: functional.layer_norm(nested, [768]),   # (torch's ValueError)
             lambda module, functional: functional.group_norm(_nested((8, 3, 3), (8, 5, 5)), 4, weight, weight),
             lambda module, functional: functional.layer_norm(random_tensor((64, 768), seed=4).to_sparse(), [768])]
    with torch.set_grad_enabled(grad):
        for call in calls:
            expected = _result_or_error(call, nn.LayerNorm(768), F)
            got = _result_or_error(call, ct.LayerNorm(768), ct)
            if isinstance(expected, Tensor):
                assert got.is_nested and got.requires_grad == expected.requires_grad
                for got_part, expected_part in zip(got.unbind(), expected.unbind()):
                    torch.testing.assert_close(got_part, expected_part, rtol=0, atol=0)
            else:
                assert type(got) is type(expected) and str(got) == str(expected)
    assert not kernel_calls


@pytest.mark.parametrize("case", TRANSFORM_CASES)
@pytest.mark.parametrize("params_need_grad", [False, True], ids=["no_grad", "grad"])
def test_tensors_left_behind_by_a_transform_give_torchs_results(case, params_need_grad, kernel_calls):
    """A tensor stored from inside torch.func.grad outlives the transform as a functorch wrapper, whose memory the
    kernels cannot always reach: torch's function takes it, with or without autograd recording."""
    ours, theirs = TRANSFORM_CASES[case]
    left_behind = []

    def loss(x):
        left_behind.append(x * 1)
        return x.sum()

    torch.func.grad(loss)(random_tensor((2, 4, 3, 3), seed=0))
    x = left_behind[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(x)
    weight, bias = (random_tensor((4,), seed=seed).requires_grad_(params_need_grad) for seed in (1, 2))
    torch.testing.assert_close(ours(x, weight, bias), theirs(x, weight, bias), rtol=0, atol=0)
    assert not kernel_calls


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_forward_without_autograd(grad_mode):
    theirs, ours = module_pair("group_norm_2d", affine=True)
    x = random_tensor((2, 8, 3, 3), torch.float32)
    with grad_mode():
        y = ours(x)
    assert y.grad_fn is None and not y.requires_grad
    assert_close_scaled(y, theirs(x).detach(), 1e-5)


class _OperatorRecorder(TorchDispatchMode):
    """Records the name of every operator dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["group_norm", "instance_norm", "layer_norm", "rms_norm"])
def test_inference_skips_the_operator_only_when_nothing_watches(case, monkeypatch):
    """Without autograd, compiler or dispatch mode the kernels are called directly, with the operator's result;
    under a dispatch mode (as in torch.export and make_fx) the operator itself runs; eager autograd runs the
    eager autograd Function."""
    _, function, make_inputs = FUNCTION_CASES[case]
    inputs = make_inputs()
    operator = getattr(ct, f"_{case}_op")
    direct_calls = []   # the kernels without the operator: on the full path, or on the inference path
    kernels, inference_forward = ct._KERNELS_OF[operator], ct._inference_forward
    monkeypatch.setitem(ct._KERNELS_OF, operator, functools.partial(_counted, direct_calls, kernels))
    monkeypatch.setattr(ct, "_inference_forward", functools.partial(_counted, direct_calls, inference_forward))
    with torch.no_grad():
        direct = function(*inputs)
        assert len(direct_calls) == 1
        with _OperatorRecorder() as recorder:
            through_operator = function(*inputs)
    assert f"cynorm.{case}" in recorder.names and len(direct_calls) == 1
    torch.testing.assert_close(direct, through_operator, rtol=0, atol=0)
    recorded = function(*inputs)
    assert type(recorded.grad_fn).__name__ == f"cynorm_{case}Backward"
    torch.testing.assert_close(recorded.detach(), direct, rtol=0, atol=0)


def _inference_variants(case):
    """(input, arguments after it) of calls of ``case`` with one input shape, each in another layout, dtype or
    kind of parameter: each has a verdict of its own, or takes the full path."""
    x = random_tensor((2, 8, 3, 5), torch.float32)
    strided_weight = random_tensor((16,), torch.float32, seed=1)[::2]   # (not contiguous: the full path)
    if case == "group_norm":
        return [(x, (4,)), (x.contiguous(memory_format=torch.channels_last), (4,)), (x.double(), (4,)),
                (x, (4, random_tensor((8,), torch.float32), random_tensor((8,), torch.float32, seed=2))),
                (x, (4, strided_weight)), (x, (4, None, None, 1e-2)), (x, (4, None, None, -1.0)), (x, (2,)),
                (x[:, :, :, ::2], (4,)), (x.bfloat16(), (4,)), (x.bfloat16(), (3,)),
                (x.half().contiguous(memory_format=torch.channels_last), (4,)), (x.half(), (4,))]
    weight = random_tensor((5,), torch.float32)
    return [(x, ([5],)), (x.permute(0, 2, 3, 1), ([8],)), (x.double(), ([5],)), (x, ([3, 5],)),
            (x, ([5], weight)), (x, ([5], strided_weight[:5])), (x, ([5], None, 1e-2)),
            (x[:, :, :, ::2], ([3],)), (x, ([4],)), (x.bfloat16(), ([5], weight.bfloat16())),
            (x.bfloat16(), ([4],)), (x.half(), ([5],))]


@pytest.mark.parametrize("case", ["group_norm", "layer_norm", "rms_norm"])
def test_inference_calls_give_the_full_paths_results(case, monkeypatch):
    """Calls that record no gradient take the verdict of the full path's checks kept for their input's shape,
    strides and dtype and their parameters' shapes: the full path's results and errors, for inputs of one shape in
    other layouts and dtypes, with parameters of other kinds, and on the call that finds the verdict kept as on the
    one that made it.  Calls that record a gradient, for some or all of the tensors, between them take verdicts of
    their own, with the full path's results and gradients."""
    function = getattr(ct, case)
    taken = []   # the kernels' verdicts taken
    monkeypatch.setattr(ct, "_inference_forward", functools.partial(_counted, taken, ct._inference_forward))
    ct._eager_verdicts.clear()

    def call(x, arguments, grads):
        x = x.detach().requires_grad_(grads in ("input", "all"))
        arguments = tuple(a.detach().requires_grad_(grads in ("parameters", "all")) if isinstance(a, Tensor) else a
                          for a in arguments)
        output = _result_or_error(function, x, *arguments)
        if not isinstance(output, Tensor) or not output.requires_grad:
            return output, ()
        leaves = [t for t in (x, *arguments) if isinstance(t, Tensor) and t.requires_grad]
        return output, torch.autograd.grad(output, leaves, torch.ones_like(output))

    def full_path(x, arguments, grads):
        with monkeypatch.context() as patched:
            patched.setattr(ct, "_eager_verdict", lambda *verdict_args: None)
            return call(x, arguments, grads)

    for grads in ("none", "input", "parameters", "all", "none"):
        with torch.set_grad_enabled(grads != "none"):
            for x, arguments in _inference_variants(case):
                expected, expected_grads = full_path(x, arguments, grads)
                for _ in range(2):
                    got, got_grads = call(x, arguments, grads)
                    if isinstance(expected, Tensor):
                        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
                        assert got.stride() == expected.stride() and got.requires_grad == expected.requires_grad
                        torch.testing.assert_close(got_grads, expected_grads, rtol=0, atol=0, equal_nan=True)
                    else:
                        assert type(got) is type(expected) and str(got) == str(expected)
    assert len(taken) >= 2 * 2 * 5   # (twice without gradients: the layouts, dtypes and parameters above)


@pytest.mark.parametrize("case, dtype, layout", [("group_norm", "bfloat16", "contiguous"),
                                                  ("group_norm", "bfloat16", "channels_last"),
                                                  ("group_norm", "float16", "channels_last"),
                                                  ("layer_norm", "bfloat16", "contiguous"),
                                                  ("layer_norm", "float16", "contiguous"),
                                                  ("rms_norm", "bfloat16", "contiguous")])
def test_inference_calls_for_torch_ask_nothing_more(case, dtype, layout, monkeypatch):
    """Calls that record no gradient and that the full path would hand to torch's function whatever else holds
    (bfloat16, which the kernels do not take; float16 where torch's function is the faster) go there without the
    full path's checks or a verdict of their own, with torch's results."""
    dtype = getattr(torch, dtype)
    x = random_tensor((4, 64, 16, 16), torch.float32).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = random_tensor((16,) if case != "group_norm" else (64,), dtype, seed=1)
    _assert_torchs_without_checks(*_ours_and_torchs(case, x, weight, 8 if case == "group_norm" else 16), monkeypatch)


def _ours_and_torchs(case, x, weight, arg):
    """Calls of our function and torch's of ``case`` on ``x``, in ``arg`` groups (a default argument, group norm)
    or over its last ``arg`` values, with ``weight`` as the weight and the bias."""
    if case == "group_norm":
        return (lambda groups=arg: ct.group_norm(x, groups, weight, weight),
                lambda groups=arg: F.group_norm(x, groups, weight, weight))
    if case == "layer_norm":
        return lambda: ct.layer_norm(x, [arg], weight, weight), lambda: F.layer_norm(x, [arg], weight, weight)
    return lambda: ct.rms_norm(x, [arg], weight), lambda: F.rms_norm(x, [arg], weight)


def _assert_torchs_without_checks(function, expected, monkeypatch):
    """``function()``, called twice without recording gradients, gives ``expected()``'s bits without any of the
    full path's checks and without keeping a verdict."""
    asked = _spied(monkeypatch, "_torch_takes", "_kernels_take", "_full_path_route")
    ct._eager_verdicts.clear()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(function(), expected(), rtol=0, atol=0)
    assert not asked and not ct._eager_verdicts


@pytest.mark.parametrize("case, shape, layout", [("group_norm", (1, 32, 8, 8), "contiguous"),
                                                  ("group_norm", (1, 32, 8, 8), "channels_last"),
                                                  ("group_norm", (2, 6, 5), "strided"),
                                                  ("layer_norm", (4, 64), "contiguous"),
                                                  ("rms_norm", (8, 128), "contiguous")])
def test_small_inference_calls_ask_nothing_more(case, shape, layout, monkeypatch):
    """Inputs small enough for torch's function to run them whatever their shape (see
    _TORCHS_AT_ANY_SHAPE_BELOW) go there without the full path's checks or a verdict of their own, with torch's
    results and torch's errors."""
    if math.prod(shape) >= ct._TORCHS_AT_ANY_SHAPE_BELOW[case][0]:   # (RMS norm without AVX-512: every input's
        # the kernels'; the route is the other norms', so it is checked with the AVX-512 build's limit)
        monkeypatch.setattr(ct, "_TORCH_FASTER_BELOW", ct._TORCH_FASTER_BELOW_AVX512)
        monkeypatch.setitem(ct._TORCHS_AT_ANY_SHAPE_BELOW, case, (ct._torchs_at_any_shape_below(case), 0))
    ct.use_torch_for_small_inputs(True)
    x = in_layout(random_tensor(shape, torch.float32), layout)
    weight = random_tensor(shape[1:2] if case == "group_norm" else shape[-1:], torch.float32, seed=1)
    function, expected = _ours_and_torchs(case, x, weight, shape[1] // 2 if case == "group_norm" else shape[-1])
    _assert_torchs_without_checks(function, expected, monkeypatch)
    if case == "group_norm":   # (groups that do not divide the channels: torch's error)
        with torch.no_grad():
            assert str(_result_or_error(function, 5)) == str(_result_or_error(expected, 5))


@pytest.mark.parametrize("shape", [(128, 768), (4, 32, 768), (1000, 10), (2048, 64)])
def test_routed_layer_norms_ask_nothing_more(shape, monkeypatch):
    """Contiguous layer norms that the limits give torch's function, larger than the least limit at any shape, go
    there by their size and row length, without the full path's checks or a verdict: torch's bits.  Rows of 64
    values run torch's at every size without AVX-512, the kernels' from 2**17 values with it."""
    ct.use_torch_for_small_inputs(True)
    x = random_tensor(shape, torch.float32)
    weight = random_tensor(shape[-1:], torch.float32, seed=1)
    assert x.numel() >= ct._TORCHS_AT_ANY_SHAPE_BELOW["layer_norm"][0]
    with torch.no_grad():
        routed = ct._torch_takes("layer_norm", x, weight, weight, shape[-1:])
    assert routed == (shape != (2048, 64) or ct._kernels.BUILD != "x86_64_v4")
    if routed:
        _assert_torchs_without_checks(*_ours_and_torchs("layer_norm", x, weight, shape[-1]), monkeypatch)
    else:
        assert ct._eager_verdict("layer_norm", x, weight, weight, shape[-1:]) not in (None, ct._TORCHS)


@pytest.mark.parametrize("case, shape, layout", [("group_norm", (1, 32, 8, 8), "contiguous"),
                                                  ("group_norm", (1, 32, 8, 8), "channels_last"),
                                                  ("group_norm", (2, 6, 5), "strided"),
                                                  ("layer_norm", (4, 64), "contiguous"),
                                                  ("layer_norm", (128, 768), "contiguous"),   # (by its rows)
                                                  ("layer_norm", (2, 3, 64), "strided")])
def test_small_recording_calls_ask_nothing_more(case, shape, layout, monkeypatch):
    """Calls that record a gradient on inputs that the limits of such calls give torch's function by their size
    (whatever their shape, or a contiguous layer norm's rows) go there without the full path's checks or a verdict
    of their own: torch's output and gradients, bit for bit.  Strided layer norms go to the kernels, on the verdict
    of the full path's checks."""
    ct.use_torch_for_small_inputs(True)
    asked = _spied(monkeypatch, "_torch_takes", "_kernels_take", "_full_path_route",
                   "_torch_group_norm_backward_crashes")
    x = in_layout(random_tensor(shape, torch.float32), layout)
    weight = random_tensor(shape[1:2] if case == "group_norm" else shape[-1:], torch.float32, seed=1)
    weight.requires_grad_()
    dy = random_tensor(shape, torch.float32, seed=3)
    results = []
    for which in (0, 1):   # ours, then torch's, each on a leaf of its own
        leaf = x.detach().requires_grad_()
        y = _ours_and_torchs(case, leaf, weight, shape[1] // 2 if case == "group_norm" else shape[-1])[which]()
        results.append((y, *torch.autograd.grad(y, (leaf, weight), dy)))
    full_path = layout == "strided" and case == "layer_norm"
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **({} if full_path else {"rtol": 0, "atol": 0}))
    assert bool(asked) == full_path
    assert bool(ct._eager_verdicts) == full_path


@pytest.mark.parametrize("case, shape, layout", [("group_norm", (2, 8, 4, 4), "contiguous"),
                                                  ("group_norm", (2, 8, 4, 4), "channels_last"),
                                                  ("group_norm", (2, 8, 5), "strided"),
                                                  ("layer_norm", (4, 64), "contiguous"),
                                                  ("layer_norm", (2, 3, 64), "strided"),
                                                  ("rms_norm", (8, 128), "contiguous")])
def test_recording_calls_keep_their_verdict(case, shape, layout, monkeypatch):
    """A call that records a gradient takes the verdict of the full path's checks kept from the first call of its
    signature: the next call asks none of them, and runs the kernels' autograd Function with the first call's
    output and gradients, bit for bit."""
    ct.use_torch_for_small_inputs(False)
    asked = _spied(monkeypatch, "_torch_takes", "_full_path_route", "_torch_group_norm_backward_crashes",
                   "_group_norm_takes", "_layer_norm_takes", "_rms_norm_takes", "_run")
    ct._eager_verdicts.clear()
    x = in_layout(random_tensor(shape, torch.float32), layout)
    weight = random_tensor(shape[1:2] if case == "group_norm" else shape[-1:], torch.float32, seed=1)
    weight.requires_grad_()
    dy = random_tensor(shape, torch.float32, seed=3)
    results = []
    for call in range(2):
        asked.clear()
        leaf = x.detach().requires_grad_()
        y = _ours_and_torchs(case, leaf, weight, shape[1] // 2 if case == "group_norm" else shape[-1])[0]()
        results.append((y, *torch.autograd.grad(y, (leaf, weight), dy)))
        assert type(y.grad_fn).__name__ == f"cynorm_{case}Backward"
        assert bool(asked) == (call == 0)
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_recording_and_inference_verdicts_are_kept_apart(kernel_calls):
    """A signature keeps a verdict for calls that record a gradient and one for calls that do not, whose limits
    differ: a channels-first GroupNorm of 2**20 values (2**17 with AVX-512) runs the kernels without a gradient to
    record and torch's function with one, whichever call comes first."""
    ct.use_torch_for_small_inputs(True)
    shape = (2, 64, 32, 32) if ct._kernels.BUILD == "x86_64_v4" else (16, 64, 32, 32)
    x = random_tensor(shape, torch.float32)
    weight = random_tensor(shape[1:2], torch.float32, seed=1)
    for first_recording in (False, True):
        ct._eager_verdicts.clear()
        for recording in (first_recording, not first_recording, first_recording):
            kernel_calls.clear()
            leaf = x.detach().requires_grad_(recording)
            y = ct.group_norm(leaf, 32, weight, weight)
            assert bool(kernel_calls) == (not recording)
            if recording:
                assert type(y.grad_fn).__name__ == "NativeGroupNormBackward0"
        assert len(ct._eager_verdicts) == 2


def test_small_frozen_input_group_norm_takes_the_full_path(monkeypatch):
    """A small channels-last group norm of an input that records no gradient, under parameters that do, takes the
    full path, which keeps it from torch's backward (which would crash there): the kernels' gradients."""
    ct.use_torch_for_small_inputs(True)
    asked = _spied(monkeypatch, "_torch_group_norm_backward_crashes")
    x = in_layout(random_tensor((2, 8, 4, 4), torch.float64), "channels_last")
    weight, bias = (random_tensor((8,), torch.float64, seed=seed).requires_grad_() for seed in (1, 2))
    y = ct.group_norm(x, 2, weight, bias)
    assert asked and type(y.grad_fn).__name__.startswith("cynorm")
    expected = F.group_norm(x.contiguous(), 2, weight, bias)
    torch.testing.assert_close(y, expected)
    dy = random_tensor((2, 8, 4, 4), torch.float64, seed=3)
    for got, want in zip(torch.autograd.grad(y, (weight, bias), dy), torch.autograd.grad(expected, (weight, bias), dy)):
        torch.testing.assert_close(got, want)


def _small_input_shapes(norm):
    """(shape, layout, argument) of inputs of ``norm`` in many shapes and layouts, groups or normalized shapes."""
    if norm != "group_norm":
        for rows, row in itertools.product([(1,), (3,), (2, 7), (16,), (64,), (1000,), (2047,), (4095,)],
                                           [(1,), (2,), (5,), (16,), (64,), (100, 3), (256,), (768,), (2, 2, 3)]):
            for axes in range(1, len(row) + 1):
                yield rows + row, "contiguous", row[len(row) - axes:]
        return
    for samples, channels, maps in itertools.product([1, 3, 8], [1, 4, 6, 32, 96, 2048],
                                                     [(), (1,), (4,), (2, 2), (7, 7), (16, 16), (2, 3, 3)]):
        shape = (samples, channels, *maps)
        for layout in ["contiguous", "strided"] + (["channels_last"] if len(shape) in (4, 5) else []):
            for groups in {1, 2, 3, channels, 0}:
                yield shape, layout, groups


@pytest.mark.parametrize("recording", [False, True])
@pytest.mark.parametrize("limits", ["AVX512", "WITHOUT_AVX512"])
@pytest.mark.parametrize("norm", ["group_norm", "layer_norm", "rms_norm"])
def test_small_input_limit_is_the_full_paths_at_any_shape(norm, limits, recording, monkeypatch):
    """Every input of fewer values than _TORCHS_AT_ANY_SHAPE_BELOW (contiguous, or any group norm's) goes to
    torch's function by the full path's rule, and some input of that many values does not: with the limits of
    either kind of build, for calls that record a gradient and for those that do not.  A limit of 0 (RMS norm's
    recording calls; all its calls without AVX-512): no input goes there by its size."""
    assert ct._TORCHS_AT_ANY_SHAPE_BELOW[norm] == (ct._torchs_at_any_shape_below(norm),   # (this build's limits)
                                                   ct._torchs_at_any_shape_below(norm, True))
    rows = {} if limits == "AVX512" else ct._TORCH_FASTER_ON_ROWS_WITHOUT_AVX512
    monkeypatch.setattr(ct, "_TORCH_FASTER_BELOW", getattr(ct, f"_TORCH_FASTER_BELOW_{limits}"))
    monkeypatch.setattr(ct, "_TORCH_FASTER_ON_ROWS", rows)
    limit = ct._torchs_at_any_shape_below(norm, recording)
    ct.use_torch_for_small_inputs(True)
    checked = 0
    with torch.set_grad_enabled(recording):
        for shape, layout, argument in _small_input_shapes(norm):
            if not 0 < math.prod(shape) < (limit or 2 ** 14):
                continue
            x = in_layout(torch.zeros(shape, requires_grad=recording), layout)
            arguments = {"num_groups": argument} if norm == "group_norm" else {"normalized_shape": argument}
            assert ct._torch_takes(norm, x, None, None, **arguments) == (limit > 0), (shape, layout, argument)
            checked += 1
        # (a channels-first group norm or a channels-last one on large maps, whichever category sets the limit)
        at_limit = ([((limit // 16, 16, 1, 1), "contiguous", {"num_groups": 16}),
                     ((1, limit // 1024, 32, 32), "channels_last", {"num_groups": max(limit // 1024, 1)})]
                    if norm == "group_norm" else [((limit, 1), "contiguous", {"normalized_shape": (1,)})])
        assert any(not ct._torch_takes(norm, in_layout(torch.zeros(shape, requires_grad=recording), layout), None,
                                       None, **argument) for shape, layout, argument in at_limit)
    assert checked >= 40


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchs_group_norm_is_torchs_function(layout, dtype):
    """_torchs_group_norm, which calls torch's operator without F.group_norm's checks where they pass, gives
    F.group_norm's bits and errors, around the shapes those checks refuse and with groups torch refuses."""
    cases = [((1, 2), 2), ((1, 3), 2), ((1, 4), 2), ((2, 2), 2), ((1, 3, 1), 2), ((1, 3, 2), 2), ((1, 2, 1, 1), 2),
             ((1, 2, 1, 1), 1), ((1, 4, 1, 1), 2), ((2, 6, 3, 3), 3), ((2, 6, 3, 3), 4), ((2, 6, 3, 3), 0),
             ((2, 6, 3, 3), -3), ((2, 6, 3, 3), 3.0), ((2, 6, 3, 3), True), ((4,), 2), ((1, 8, 2, 2, 2), 4)]
    for (shape, groups), parameters in itertools.product(cases, [False, True]):
        x = random_tensor(shape, dtype)
        if layout == "channels_last" and x.dim() in (4, 5):
            x = in_layout(x, layout)
        weight, bias = ((random_tensor(shape[1:2], dtype, seed=1), random_tensor(shape[1:2], dtype, seed=2))
                        if parameters and x.dim() > 1 else (None, None))
        got = _result_or_error(ct._torchs_group_norm, x, groups, weight, bias, 1e-5)
        expected = _result_or_error(F.group_norm, x, groups, weight, bias, 1e-5)
        if isinstance(expected, Tensor):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            assert got.stride() == expected.stride()
        else:
            assert type(got) is type(expected) and str(got) == str(expected), (shape, groups)


def _counted(calls, function, *args, **kwargs):
    calls.append(args)
    return function(*args, **kwargs)


def _spied(monkeypatch, *names):
    """The list into which the adapter's functions ``names``, from now on, put the arguments of each call."""
    calls = []
    for name in names:
        monkeypatch.setattr(ct, name, functools.partial(_counted, calls, getattr(ct, name)))
    return calls


def _result_or_error(function, *args):
    try:
        return function(*args)
    except Exception as error:   # noqa: BLE001 (compared with the full path's)
        return error


def test_a_parameters_fault_is_not_kept_for_its_signature(kernel_calls):
    """A call whose weight the kernels do not take gets torch's answer, and leaves no verdict behind: the next
    call of the same shapes, with a weight they take, runs on them."""
    ct._eager_verdicts.clear()
    x = random_tensor((2, 8, 3, 5), torch.float32)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="mixed dtype"):   # torch's error
            ct.group_norm(x, 4, torch.ones(8, dtype=torch.float64))
        ct.group_norm(x, 4, torch.ones(8))
    assert len(kernel_calls["forward"]) == 1


def test_inference_calls_follow_the_small_input_setting(kernel_calls):
    """The verdicts kept for inputs of one signature depend on use_torch_for_small_inputs."""
    x = random_tensor((2, 8, 4, 4), torch.float32)
    with torch.no_grad():
        ct.use_torch_for_small_inputs(True)
        routed = ct.group_norm(x, 4)
        assert not kernel_calls
        ct.use_torch_for_small_inputs(False)
        computed = ct.group_norm(x, 4)
    assert len(kernel_calls["forward"]) == 1
    torch.testing.assert_close(computed, routed, rtol=1e-5, atol=1e-5)


def test_inference_calls_from_threads_keep_their_statistics_apart(monkeypatch):
    """The statistics of calls that record no gradient go to each thread's own scratch memory (the kernels read
    them back as they normalize): threads that normalize inputs of different sizes at once write theirs to
    different memory, and get the results of calls made one at a time."""
    inputs = [random_tensor((n, 16, 24, 24), torch.float32, seed=n) for n in (1, 3, 8)]
    with torch.no_grad():
        expected = [ct.group_norm(x, 8) for x in inputs]
    statistics_at = {}   # thread -> addresses of its calls' means
    forward_kernel = ct._forward_kernel

    def spied(x, plan, weight, bias, eps, centered, mean, rstd, float64):
        statistics_at.setdefault(threading.get_ident(), set()).add(mean)
        return forward_kernel(x, plan, weight, bias, eps, centered, mean, rstd, float64)

    monkeypatch.setattr(ct, "_forward_kernel", spied)
    all_started = threading.Barrier(3)

    def normalize_repeatedly(index):
        all_started.wait()
        with torch.no_grad():
            return [ct.group_norm(inputs[(index + k) % 3], 8) for k in range(30)]

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(normalize_repeatedly, range(3)))
    for index, outputs in enumerate(results):
        for k, output in enumerate(outputs):
            torch.testing.assert_close(output, expected[(index + k) % 3], rtol=0, atol=0)
    addresses = list(statistics_at.values())
    assert len(addresses) == 3 and all(a.isdisjoint(b) for a, b in itertools.combinations(addresses, 2))


@pytest.fixture
def every_output_cached(monkeypatch):
    """An output cache of its own, used for outputs of any size."""
    cache = ct._new_output_cache(limit=2 ** 30)
    monkeypatch.setattr(ct, "_output_cache", cache)
    monkeypatch.setattr(ct, "_CACHED_OUTPUT_BYTES", 0)
    return cache


def test_cache_blocks_are_offered_as_huge_pages(every_output_cached, monkeypatch):
    advised = []
    monkeypatch.setattr(ct._kernels, "advise_huge_pages", lambda address, nbytes: advised.append((address, nbytes)))
    x = random_tensor((2, 64, 64, 64), torch.float32)   # 2 MiB
    y = ct.group_norm(x, 8)
    ((address, nbytes),) = advised   # the whole block, the output somewhere within its first page
    assert address <= y.data_ptr() < address + PAGE_BYTES and nbytes == y.nbytes + PAGE_BYTES
    torch.testing.assert_close(y, F.group_norm(x, 8), rtol=1e-5, atol=1e-5)
    ct.group_norm(x, 8)   # a second block: y still holds the first
    del y
    ct.group_norm(x, 8)   # the first block again, not offered twice
    assert len(advised) == 2


def _block_address(output):
    """Where the memory of the cache block holding ``output`` starts."""
    return output.untyped_storage().data_ptr()


@pytest.mark.parametrize("module_case, layout", [("group_norm_2d", "contiguous"), ("group_norm_2d", "channels_last"),
                                                 ("instance_norm_3d", "channels_last"), ("layer_norm", "strided"),
                                                 ("rms_norm", "contiguous")])
def test_inference_output_memory_is_reused_only_once_freed(module_case, layout, every_output_cached):
    theirs, ours = module_pair(module_case, affine=True)
    shape = MODULE_CASES[module_case][-1]
    x1, x2 = (in_layout(random_tensor(shape, torch.float32, seed=seed), layout) for seed in (3, 4))
    with torch.no_grad():
        expected1, expected2 = theirs(x1), theirs(x2)
        first = ours(x1)
        # the layout the adapter gives without the cache: the input's for group and instance norm
        assert first.stride() == (x1.stride() if "_norm_" in module_case else expected1.stride())
        block = _block_address(first)
        kept_view, kept_array = first[0], first.numpy()
        del first
        # memory still in use by a view or an array is not handed out again
        second = ours(x2)
        assert _block_address(second) != block
        assert_close_scaled(kept_view, expected1[0], 1e-5)
        del kept_view
        assert _block_address(ours(x2)) != block
        assert_close_scaled(torch.from_numpy(kept_array), expected1, 1e-5)
        del kept_array
        third = ours(x2)
    assert _block_address(third) == block
    assert_close_scaled(third, expected2, 1e-5)
    assert_close_scaled(second, expected2, 1e-5)


@pytest.mark.parametrize("module_case", ["group_norm_2d", "layer_norm"])
def test_training_outputs_and_gradients_use_the_cache(module_case, every_output_cached):
    theirs, ours = module_pair(module_case, affine=True)
    shape = MODULE_CASES[module_case][-1]
    x = random_tensor(shape, torch.float32).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    grad_output = random_tensor(shape, torch.float32, seed=5)
    for step in range(2):   # the second step runs in the memory the first one gave back
        output = ours(x)
        output.backward(grad_output)
        expected = theirs(x_theirs)
        expected.backward(grad_output)
        assert_close_scaled(output, expected, 1e-5)
        assert_close_scaled(x.grad, x_theirs.grad, 1e-5)
        for mine, reference in zip(ours.parameters(), theirs.parameters()):
            assert_close_scaled(mine.grad, reference.grad, 1e-5)
        assert every_output_cached.free_bytes == 0   # the output and x.grad still hold their blocks
        del output
        x.grad = None
        ours.zero_grad(), theirs.zero_grad()
        x_theirs.grad = None
        assert every_output_cached.free_bytes == 2 * x.numel() * x.element_size()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cached_outputs_are_placed_half_a_page_from_their_input(layout, every_output_cached):
    """Outputs and input gradients start on a line, half a page from the input's line in the page (see
    cynorm._blocks.placement), wherever the input starts, and give the results they would anywhere."""
    theirs, ours = module_pair("group_norm_2d", affine=True)
    shape = MODULE_CASES["group_norm_2d"][-1]
    grad_output = in_layout(random_tensor(shape, torch.float32, seed=5), layout)
    memory = torch.empty(math.prod(shape) + PAGE_BYTES)
    for skipped in (0, 4, 16, 500, 1023):   # values of `memory` before the input's
        x = in_layout(random_tensor(shape, torch.float32, seed=skipped), layout)
        x = memory[skipped:skipped + x.numel()].as_strided(x.shape, x.stride()).copy_(x).requires_grad_()
        x_theirs = x.detach().clone().requires_grad_()
        (grad_input,) = torch.autograd.grad(output := ours(x), [x], grad_output)
        (expected_grad,) = torch.autograd.grad(expected := theirs(x_theirs), [x_theirs], grad_output)
        input_line = x.data_ptr() - x.data_ptr() % 64
        for tensor in (output, grad_input):
            assert tensor.data_ptr() % 64 == 0 and (tensor.data_ptr() - input_line) % PAGE_BYTES == PAGE_BYTES // 2
        assert output.stride() == x.stride() and grad_input.stride() == x.stride()
        assert_close_scaled(output, expected, 1e-5)
        assert_close_scaled(grad_input, expected_grad, 1e-5)


def test_cached_outputs_take_in_place_operations(every_output_cached):
    """A cached output is a tensor of its own, not a view of the cache's memory: a residual added in place (as
    in a ResNet block) records its gradient like on torch's output."""
    theirs, ours = module_pair("group_norm_2d", affine=True)
    shape = MODULE_CASES["group_norm_2d"][-1]
    inputs = [random_tensor(shape, torch.float32, seed=seed).requires_grad_() for seed in (3, 4)]
    grad_output = random_tensor(shape, torch.float32, seed=5)
    for step in range(2):   # the second step runs in the memory the first one gave back
        results = []
        for module in (ours, theirs):
            x, residual = (t.detach().clone().requires_grad_() for t in inputs)
            output = module(x)
            output += residual
            output.backward(grad_output)
            results.append((output.detach(), x.grad, residual.grad))
        assert not ours(inputs[0].detach())._is_view()
        for mine, reference in zip(*results):
            assert_close_scaled(mine, reference, 1e-5)
    assert every_output_cached.free_bytes > 0


def test_a_cache_block_serves_other_layouts_dtypes_and_inference_mode(every_output_cached, monkeypatch):
    """A block's outputs take the shape, strides and dtype each call asks for, and are inference tensors exactly
    when torch's would be; a block keeps a bounded number of the tensors it makes them from."""
    monkeypatch.setattr(ct, "_TEMPLATES_HELD", 3)
    x = random_tensor((2, 8, 6, 4), torch.float64)
    calls = [(x.float(), torch.no_grad), (x.float().contiguous(memory_format=torch.channels_last), torch.no_grad),
             (x.float(), torch.inference_mode), (x[:1], torch.no_grad), (x.float().transpose(2, 3).contiguous(),
             torch.no_grad), (x.float(), torch.no_grad)]
    addresses = set()
    for input, grad_mode in calls:   # each output freed before the next call: all of them on one block
        with grad_mode():
            output, expected = ct.group_norm(input, 4), F.group_norm(input, 4)
        assert output.stride() == input.stride() and output.dtype == input.dtype
        assert output.is_inference() == expected.is_inference() and not output._is_view()
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        addresses.add(_block_address(output))
        del output
    assert len(addresses) == 1 and every_output_cached.blocks_of(x.nbytes // 2) == 1
    (block,) = every_output_cached._blocks[x.nbytes // 2]
    assert 0 < len(block.templates) <= 3 and block.is_free()


def test_cached_outputs_under_concurrent_steps(every_output_cached):
    """Steps from several Python threads at once (the kernels release the GIL, as in a server's thread pool) each
    get cache blocks of their own: the bits of the same steps made one at a time."""
    _, ours = module_pair("group_norm_2d", affine=True)
    shape = MODULE_CASES["group_norm_2d"][-1]
    inputs = [(random_tensor(shape, torch.float32, seed=2 * k), random_tensor(shape, torch.float32, seed=2 * k + 1))
              for k in range(6)]

    def step(x, grad_output):
        x = x.detach().requires_grad_()
        y = ours(x)
        (dx,) = torch.autograd.grad(y, [x], grad_output)
        return y.detach().clone(), dx.clone()

    one_at_a_time = [step(*pair) for pair in inputs]
    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(lambda pair: step(*pair), inputs * 4))
    for index, (y, dx) in enumerate(side_by_side):
        expected_y, expected_dx = one_at_a_time[index % len(inputs)]
        torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
        torch.testing.assert_close(dx, expected_dx, rtol=0, atol=0)


def test_kernels_follow_torch_threads_in_every_thread(monkeypatch):
    """torch.set_num_threads sets the kernels' thread count too, in every thread (the OpenMP count it sets is its
    caller's thread's), for forwards and backwards of both kinds of norm, on the eager path and through the
    operators; cynorm.set_num_threads still overrides it."""
    counts = []

    def thread_count(size):
        counts.append(cynorm.get_num_threads())
        return 1

    monkeypatch.setattr(cynorm._api, "_thread_count", thread_count)
    x = random_tensor((2, 8, 16, 16), torch.float32).requires_grad_()

    def norms():
        ct.group_norm(x, 2).sum().backward()
        ct.layer_norm(x, [16, 16]).sum().backward()
        for op, args in [(torch.ops.cynorm.group_norm, (2, None, None, 1e-5)),
                         (torch.ops.cynorm.layer_norm, ([16, 16], None, None, 1e-5))]:
            op(x.detach(), *args)

    previous = torch.get_num_threads()
    try:
        for torch_threads, cynorm_threads, expected in [(1, None, 1), (3, None, 3), (1, 2, 2)]:
            torch.set_num_threads(torch_threads)
            counts.clear()
            with cynorm.num_threads(cynorm_threads), ThreadPoolExecutor(1) as pool:
                pool.submit(norms).result()
            assert len(counts) == 6 and set(counts) == {expected}
    finally:
        torch.set_num_threads(previous)

def test_output_cache_limit(every_output_cached):
    _, ours = module_pair("group_norm_2d", affine=True)
    x = random_tensor(MODULE_CASES["group_norm_2d"][-1], torch.float32)
    block_bytes = x.numel() * x.element_size()
    every_output_cached.set_limit(block_bytes)
    with torch.no_grad():
        outputs = [ours(x) for _ in range(3)]
        del outputs
    assert every_output_cached.free_bytes == block_bytes   # one block kept, two released
    previous = ct.set_output_cache_limit(0)
    try:
        assert ct._output_cache is every_output_cached and every_output_cached.free_bytes == 0
    finally:
        ct.set_output_cache_limit(previous)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="number of bytes"):
            ct.set_output_cache_limit(bad)


def test_inputs_of_one_shape_in_other_layouts_get_their_own_plans():
    """The eager paths keep what they work out from an input's shape and strides (its plan): inputs of one shape
    in other layouts, one after the other and then again, each get theirs."""
    x = random_tensor((2, 6, 5, 3))
    layouts = [x, x.contiguous(memory_format=torch.channels_last), in_layout(x, "strided"),
               x.transpose(0, 1).contiguous().transpose(0, 1)]   # (the batch axis inside the channel axis)
    norms = [(lambda t: ct.group_norm(t, 3), lambda t: F.group_norm(t, 3)),
             (lambda t: ct.layer_norm(t, (5, 3)), lambda t: F.layer_norm(t, (5, 3)))]
    grad_output = random_tensor(x.shape, seed=1)
    for _ in range(2):
        for layout in layouts:
            for ours, theirs in norms:
                inputs = [layout.detach().requires_grad_() for _ in range(2)]
                y, expected = ours(inputs[0]), theirs(inputs[1])
                assert_close_scaled(y, expected, TOLERANCES[torch.float64])
                grads = [torch.autograd.grad(out, input, grad_output)[0] for out, input in zip((y, expected), inputs)]
                assert_close_scaled(grads[0], grads[1], TOLERANCES[torch.float64])


# --------------------------------------------------------------------------------------------------------
# Small inputs: torch's own function, where it is faster
# --------------------------------------------------------------------------------------------------------

SMALL_INPUT_NORMS = {   # norm: (ours, torch's), on an input and a parameter for each of its normalized values
    "group_norm": (lambda x, w: ct.group_norm(x, 32, w), lambda x, w: F.group_norm(x, 32, w)),
    "layer_norm": (lambda x, w: ct.layer_norm(x, w.shape, w), lambda x, w: F.layer_norm(x, w.shape, w)),
    "rms_norm": (lambda x, w: ct.rms_norm(x, w.shape, w), lambda x, w: F.rms_norm(x, w.shape, w)),
}


@pytest.mark.parametrize("norm, shape, layout, requires_grad, runs", [
    ("layer_norm", (1, 768), "contiguous", False, "torch"),
    ("layer_norm", (128, 768), "contiguous", True, "torch"),           # 98K elements, 128 rows
    ("layer_norm", (256, 768), "contiguous", False, ("kernels", "torch")),   # 196K elements
    ("layer_norm", (64, 4096), "contiguous", True, "torch"),           # 262K elements, recording
    ("layer_norm", (512, 768), "contiguous", True, ("kernels", "torch")),    # 3 * 2**17 elements, recording
    ("layer_norm", (1024, 1024), "contiguous", True, "kernels"),       # 2**20 elements, recording
    ("layer_norm", (1024, 512), "contiguous", False, "kernels"),       # 2**19 elements
    ("layer_norm", (640, 768), "contiguous", False, "kernels"),        # 491K elements
    ("layer_norm", (64, 4096), "contiguous", False, "kernels"),        # 2**18 elements
    ("layer_norm", (255, 1024), "contiguous", False, ("kernels", "torch")),  # just below 2**18
    ("layer_norm", (8192, 16), "contiguous", True, ("kernels", "torch")),    # 2**17 elements, 8192 short rows
    ("layer_norm", (65536, 4), "contiguous", True, "kernels"),         # 2**18 elements, 65536 rows of 4
    ("layer_norm", (32, 26, 26, 10), "contiguous", True, "kernels"),   # the tutorial's 21632 rows of 10
    ("layer_norm", (4096, 8), "contiguous", True, ("kernels", "torch")),  # 4096 rows of 8, recording
    ("layer_norm", (8192, 4), "contiguous", True, "kernels"),          # 8192 rows of 4, recording
    ("layer_norm", (16384, 64), "contiguous", False, ("kernels", "torch")),  # 2**20 elements in rows of 64
    ("layer_norm", (4096, 128), "contiguous", False, "four rows"),     # 2**19 elements in rows taken four at a time
    ("layer_norm", (4096, 128), "contiguous", True, ("kernels", "torch")),   # the same, recording
    ("layer_norm", (2048, 256), "contiguous", False, "four rows"),     # 2**19 elements in rows taken four at a time
    ("layer_norm", (8192, 100), "contiguous", False, ("kernels", "torch")),  # 819K elements in rows of 100
    ("layer_norm", (32768, 64), "contiguous", True, ("kernels", "torch")),   # 2**21 elements in rows of 64
    ("layer_norm", (32768, 32), "contiguous", False, "kernels"),       # 2**20 elements in rows of 32
    ("layer_norm", (4096, 512), "contiguous", True, "kernels"),        # 2**21 elements in rows of 512
    ("layer_norm", (4096, 16), "contiguous", False, "kernels"),        # 64K elements, but 4096 short rows
    ("layer_norm", (8, 16, 32), "permuted", False, "kernels"),         # a layout torch would copy
    ("rms_norm", (2, 4096), "contiguous", False, ("torch", "kernels")),   # 8K elements
    ("rms_norm", (2, 4096), "contiguous", True, "kernels"),            # RMS norm steps are faster at every size
    ("group_norm", (2, 64, 16, 16), "contiguous", True, "torch"),      # 32K elements
    ("group_norm", (4, 64, 32, 32), "contiguous", True, ("kernels", "torch")),   # 262K elements
    ("group_norm", (8, 64, 32, 32), "contiguous", False, "kernels"),   # 2**19 elements
    ("group_norm", (8, 64, 32, 32), "contiguous", True, ("kernels", "torch")),   # 2**19 elements, recording
    ("group_norm", (16, 64, 32, 32), "contiguous", False, "kernels"),  # 2**20 elements
    ("group_norm", (16, 64, 32, 32), "contiguous", True, ("kernels", "torch")),   # 2**20 elements, recording
    ("group_norm", (1, 512, 64, 64), "contiguous", True, "kernels"),   # 2**21 elements, recording
    ("group_norm", (16, 512, 7, 7), "contiguous", True, "torch"),      # 401K elements on maps of 49
    ("group_norm", (16, 512, 8, 8), "contiguous", True, "torch"),      # 2**19 elements on maps of 64
    ("group_norm", (32, 512, 8, 8), "contiguous", True, ("kernels", "torch")),   # 2**20 elements on maps of 64
    ("group_norm", (32, 512, 8, 8), "contiguous", False, "kernels"),
    ("group_norm", (8, 512, 10, 10), "contiguous", True, ("kernels", "torch")),   # 409K elements on maps of 100
    ("group_norm", (256, 64, 8), "contiguous", False, "kernels"),      # 2**17 elements on maps of 8
    ("group_norm", (256, 64, 8), "contiguous", True, "torch"),
    ("group_norm", (64, 256), "contiguous", True, "torch"),            # 16K elements on maps of 1
    ("group_norm", (128, 256), "contiguous", True, ("kernels", "torch")),   # 2**15 elements on maps of 1
    ("group_norm", (256, 256), "contiguous", True, "kernels"),         # 2**16 elements
    ("group_norm", (32, 64, 4), "contiguous", False, "torch"),         # 8K elements on maps of 4
    ("group_norm", (64, 64, 4), "contiguous", False, ("kernels", "torch")),   # 2**14 elements
    ("group_norm", (8, 512, 2, 2), "contiguous", False, ("kernels", "torch")),   # 2**14 elements on maps of 4
    ("group_norm", (256, 64, 4), "contiguous", False, "kernels"),      # 2**16 elements
    ("group_norm", (64, 256), "contiguous", False, "kernels"),         # 2**14 elements on maps of 1
    ("group_norm", (64, 256, 1, 1), "contiguous", False, "kernels"),
    ("group_norm", (32, 256), "contiguous", False, "torch"),           # 8K elements on maps of 1
    ("group_norm", (128, 64, 4), "contiguous", True, ("kernels", "torch")),   # 2**15 elements, recording
    ("group_norm", (256, 64, 4), "contiguous", True, "kernels"),       # 2**16 elements, recording
    ("group_norm", (16, 512, 7, 7), "contiguous", False, "kernels"),
    ("group_norm", (2, 64, 16, 16), "channels_last", False, ("kernels", "torch")),   # 32K elements
    ("group_norm", (2, 256, 7, 7), "channels_last", False, "torch"),   # 25K elements
    # channels-last maps of up to 64 values: groups of 16 channels, of 40 and 80; on maps of 256: of 40, 32 and 16
    ("group_norm", (16, 512, 8, 8), "channels_last", False, "kernels"),                # 2**19 elements
    ("group_norm", (16, 512, 8, 8), "channels_last", True, ("kernels", "torch")),
    ("group_norm", (2, 1280, 8, 8), "channels_last", True, ("kernels", "torch")),      # 164K elements
    ("group_norm", (8, 2560, 8, 8), "channels_last", False, ("kernels", "torch")),     # 1.3M elements
    ("group_norm", (1, 1280, 16, 16), "channels_last", False, ("kernels", "torch")),   # 328K elements
    ("group_norm", (4, 1024, 16, 16), "channels_last", False, "kernels"),              # 2**20 elements
    ("group_norm", (2, 512, 16, 16), "channels_last", True, ("kernels", "torch")),     # 2**18 elements
    ("group_norm", (4, 512, 16, 16), "channels_last", True, "kernels"),                # 2**19 elements
    ("group_norm", (1, 256, 24, 24), "channels_last", True, "kernels"),                # 147K elements, maps of 576
    ("group_norm", (1, 256, 32, 32), "channels_last", False, ("kernels", "torch")),   # 2**18 elements, maps of 1024
    ("group_norm", (1, 256, 32, 32), "channels_last", True, "kernels"),
    ("group_norm", (4, 256, 16, 16), "channels_last", False, "kernels"),   # 2**18 elements on maps of 256
    ("group_norm", (1, 256, 64, 128), "channels_last", False, "kernels"),  # 2**21 elements, maps of 8192
])
def test_small_inputs_run_torch(norm, shape, layout, requires_grad, runs, kernel_calls):
    """Small inputs run torch's function (torch's very bits and gradient function), others the kernels; where the
    limits differ by build, `runs` gives what runs with the AVX-512 build, then with the others ("four rows": the
    kernels where the build takes the rows' forward four at a time, else torch)."""
    if isinstance(runs, tuple):
        runs = runs[0] if ct._kernels.BUILD == "x86_64_v4" else runs[1]
    if runs == "four rows":
        runs = "kernels" if ct._kernels.BUILD == "x86_64_v4" or ct._four_row_forward(shape[-1]) else "torch"
    ours, theirs = SMALL_INPUT_NORMS[norm]
    x = random_tensor(shape, torch.float32)
    # (permuted: the view's last axis is the middle one in memory)
    x = x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "permuted" else in_layout(x, layout)
    w = random_tensor(shape[1:2] if norm == "group_norm" else shape[-1:], torch.float32, seed=1)
    x.requires_grad_(requires_grad)
    ct.use_torch_for_small_inputs(True)
    y = ours(x, w)
    with torch.no_grad():
        expected = theirs(x, w)
    if runs == "torch":
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        assert "forward" not in kernel_calls
    else:
        assert_close_scaled(y, expected, 1e-5)
        assert len(kernel_calls["forward"]) == 1
    if requires_grad:
        assert type(y.grad_fn).__name__.startswith("cynorm") == (runs == "kernels")


def test_small_inputs_setting(kernel_calls):
    assert ct.use_torch_for_small_inputs(True) is False   # (the autouse fixture's setting)
    x = random_tensor((2, 3, 4, 4), torch.float32)
    ct.instance_norm(x)   # instance norm has no threshold: torch's is slower at every size
    assert len(kernel_calls["forward"]) == 1
    assert ct.use_torch_for_small_inputs(False) is True
    ct.layer_norm(x, (4,))
    assert len(kernel_calls["forward"]) == 2
    for bad in (0, 1, None, "yes"):
        with pytest.raises(TypeError, match="True or False"):
            ct.use_torch_for_small_inputs(bad)


# --------------------------------------------------------------------------------------------------------
# Instance norm running statistics
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_instance_norm_running_stats(momentum):
    theirs, ours = (cls(6, momentum=momentum, affine=True, track_running_stats=True)
                    for cls in (nn.InstanceNorm2d, ct.InstanceNorm2d))
    for step in range(3):  # training: batch statistics, buffers updated
        x = random_tensor((4, 6, 5, 3), torch.float32, seed=step)
        assert_close_scaled(ours(x), theirs(x), 1e-5)
    for name in ["running_mean", "running_var", "num_batches_tracked"]:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = random_tensor((2, 6, 5, 3), torch.float32, seed=9)
    assert_close_scaled(ours(x), theirs(x), 1e-5)


@st.composite
def norm_modules(draw):
    """A torch.nn norm module with drawn arguments, its dtype, its input's shape and layout, and whether it trains
    (two training steps, then an evaluation) or only evaluates."""
    kind = draw(st.sampled_from(["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm",
                                 "RMSNorm"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    channels = draw(st.integers(1, 6))
    if kind == "GroupNorm":
        num_groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
        module = nn.GroupNorm(num_groups, channels, eps=eps, affine=draw(st.booleans()), dtype=dtype)
        # (torch refuses a batch of a single value in each group)
        shape = draw(st.tuples(st.integers(1, 3), st.just(channels), *[st.integers(1, 5)] * draw(st.integers(0, 3)))
                     .filter(lambda shape: math.prod(shape) > num_groups))
    elif kind.startswith("InstanceNorm"):
        spatial_dims = int(kind[-2])
        module = getattr(nn, kind)(channels, eps=eps, momentum=draw(st.sampled_from([0.1, 0.5, None])),
                                   affine=draw(st.booleans()), track_running_stats=draw(st.booleans()), dtype=dtype)
        # (torch refuses instances of a single value)
        spatial = draw(st.lists(st.integers(1, 5), min_size=spatial_dims, max_size=spatial_dims).filter(
            lambda sizes: math.prod(sizes) > 1))
        batch = draw(st.sampled_from([(), (1,), (3,)]))   # (): unbatched
        shape = (*batch, channels, *spatial)
    else:
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
        normalized_shape = shape[len(shape) - draw(st.integers(1, min(2, len(shape)))):]
        if kind == "LayerNorm":
            module = nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=draw(st.booleans()),
                                  bias=draw(st.booleans()), dtype=dtype)
        else:
            module = nn.RMSNorm(normalized_shape, eps=draw(st.sampled_from([eps, None])),
                                elementwise_affine=draw(st.booleans()), dtype=dtype)
    channels_last = len(shape) in MEMORY_FORMATS and draw(st.booleans())
    return module, dtype, shape, channels_last, draw(st.booleans())


@given(norm_modules())
def test_drawn_converted_modules_match_torch(drawn):
    """A converted module gives torch.nn's outputs, gradients and running statistics, training then evaluating,
    against the same module in float64."""
    theirs, dtype, shape, channels_last, trains = drawn
    generator = torch.Generator().manual_seed(sum(shape))
    with torch.no_grad():   # (parameters and buffers away from their defaults)
        for tensor in [*theirs.parameters(), *theirs.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    reference = copy.deepcopy(theirs).double()
    if isinstance(theirs, nn.RMSNorm) and theirs.eps is None:   # (None: the input dtype's epsilon)
        reference.eps = torch.finfo(dtype).eps
    ours = ct.convert(theirs)
    assert type(ours) is not type(theirs)
    for step, training in enumerate([trains, trains, False]):
        x = in_layout(random_tensor(shape, seed=step), "channels_last" if channels_last else "contiguous")
        grad_output = random_tensor(shape, seed=10 + step)
        results = []
        for m, x_dtype in ((ours, dtype), (theirs, dtype), (reference, torch.float64)):
            m.train(training)
            x_in = x.to(x_dtype).requires_grad_(training)
            y = m(x_in)
            grads = torch.autograd.grad(y, [x_in, *m.parameters()], grad_output.to(x_dtype)) if training else ()
            results.append([y, *grads, *m.buffers()])
        assert len({len(result) for result in results}) == 1
        for actual, torchs, exact in zip(*results):
            if actual.is_floating_point():
                assert_as_close_as_torch(actual, torchs, exact, DRAWN_TOLERANCES[dtype])
            else:   # (num_batches_tracked)
                assert torch.equal(actual, exact)


# --------------------------------------------------------------------------------------------------------
# Fallbacks: torch's exact semantics where the kernels do not apply
# --------------------------------------------------------------------------------------------------------

# (case, dtype, layout, whether a gradient is recorded): bfloat16 always, float16 where torch's is the faster
HALF_PRECISION_TO_TORCH = (
    [(case, torch.bfloat16, "contiguous", True) for case in ("group_norm_2d", "instance_norm_2d", "layer_norm",
                                                             "rms_norm")]
    + [(case, torch.float16, "contiguous", True) for case in ("instance_norm_2d", "layer_norm", "rms_norm")]
    + [("group_norm_2d", torch.float16, "channels_last", records_grad) for records_grad in (False, True)])
FLOAT16_ON_KERNELS = [("group_norm_2d", "contiguous", False), ("group_norm_2d", "contiguous", True),
                      ("instance_norm_2d", "channels_last", False), ("instance_norm_2d", "channels_last", True)]


def _half_precision_step(case, dtype, layout, records_grad):
    """Forward, and backward where a gradient is recorded, of our module and torch's on the same float16 or
    bfloat16 input: ((y, x grad, parameter grads...) of ours, the same of torch's, x)."""
    theirs, ours = module_pair(case, affine=True, dtype=dtype)
    x = in_layout(random_tensor(MODULE_CASES[case][-1], dtype), layout)
    results = []
    for module in (ours, theirs):
        x_in = x.clone().requires_grad_(records_grad)
        with torch.set_grad_enabled(records_grad):
            y = module(x_in)
        grads = ()
        if records_grad:
            grads = torch.autograd.grad(y, [x_in, *module.parameters()], random_tensor(y.shape, dtype, seed=5))
        results.append((y.detach(), *grads))
    return results[0], results[1], x


@pytest.mark.parametrize("case, dtype, layout, records_grad", HALF_PRECISION_TO_TORCH,
                         ids=lambda value: str(value).replace("torch.", ""))
def test_half_precision_falls_back_to_torch(case, dtype, layout, records_grad, kernel_calls):
    ours, theirs, _ = _half_precision_step(case, dtype, layout, records_grad)
    for mine, torchs in zip(ours, theirs):
        assert torch.equal(mine, torchs)
    assert not kernel_calls


@pytest.mark.parametrize("case, layout, records_grad", FLOAT16_ON_KERNELS, ids=str)
def test_float16_on_the_kernels(case, layout, records_grad, kernel_calls):
    """float16 channels-first GroupNorm and channels-last InstanceNorm run on the kernels (in float32), as close
    to the float32 results as torch's float16 ones or closer, with float16 outputs and gradients in the input's
    layout."""
    ours, theirs, x = _half_precision_step(case, torch.float16, layout, records_grad)
    assert kernel_calls
    theirs_module, _ = module_pair(case, affine=True, dtype=torch.float16)
    reference_module = theirs_module.float()
    x_ref = x.float().requires_grad_(records_grad)
    with torch.set_grad_enabled(records_grad):
        y_ref = reference_module(x_ref)
    references = [y_ref.detach()]
    if records_grad:
        references += torch.autograd.grad(y_ref, [x_ref, *reference_module.parameters()],
                                          random_tensor(y_ref.shape, torch.float16, seed=5).float())
    assert ours[0].is_contiguous(memory_format=MEMORY_FORMATS[4] if layout == "channels_last" else
                                 torch.contiguous_format)
    for mine, torchs, reference in zip(ours, theirs, references):
        assert mine.dtype == torch.float16 and mine.shape == reference.shape
        scale = reference.abs().max().item()
        torch_error = (torchs.float() - reference).abs().max().item()
        assert (mine.float() - reference).abs().max().item() <= max(torch_error, 2 ** -11 * scale)


def test_float16_channels_last_instance_norm_of_large_samples_goes_to_torch():
    """(on the kernels, a channels-last float16 sample of over 2**21 values computed in float32 ran 0.53-0.78x)"""
    def layout(shape):
        return torch.empty(shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last)

    assert not ct._float16_to_torch("instance_norm", layout((2, 8, 512, 512)))
    assert ct._float16_to_torch("instance_norm", layout((2, 8, 512, 513)))


# torch's own group_norm on these, eagerly, crashed the process in its backward (a segmentation fault); so the
# checks run in a process of their own, where a crash fails the test instead of ending the test run.
_FROZEN_CHANNELS_LAST_INPUT = """
import torch
import torch.nn.functional as F
import cynorm.adapters.torch as ct
assert ct.use_torch_for_small_inputs(True)   # (small inputs would have run torch's function)
# (one channel: contiguous both ways, and read as channels-last by torch)
cases = [((8, 6, 4, 4), 2, torch.float32), ((8, 64, 32, 32), 32, torch.float32), ((2, 6, 3, 4, 4), 2, torch.float32),
         ((8, 1, 8, 8), 1, torch.float32), ((8, 6, 4, 4), 2, torch.float64), ((8, 6, 4, 4), 2, torch.float16),
         ((8, 6, 4, 4), 2, torch.bfloat16), ((8, 1, 8, 8), 1, torch.bfloat16)]
for shape, groups, dtype in cases:
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    weight_values, upstream = torch.rand(shape[1], generator=generator), torch.randn(shape, generator=generator)
    results = []
    # (torch's channels-first kernel, on a contiguous copy, survives its backward: the reference)
    for function, x_in in ((ct.group_norm, x), (F.group_norm, x.contiguous())):
        weight = weight_values.to(dtype).requires_grad_()
        bias = torch.zeros(shape[1], dtype=dtype, requires_grad=True)
        y = function(x_in, groups, weight, bias, 1e-5)
        (y.float() * upstream).sum().backward()
        results.append((y, weight.grad, bias.grad))
    (y, *grads), (y_ref, *grads_ref) = results
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format), (shape, dtype)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 0.0}.get(dtype, 1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tolerance, atol=tolerance)
    for grad, grad_ref in zip(grads, grads_ref):
        scale = grad_ref.float().abs().max().item()
        torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=tolerance, atol=tolerance * scale)
# a converted model's first layer in training: the input never records a gradient
model = ct.convert(torch.nn.Sequential(torch.nn.GroupNorm(2, 6), torch.nn.Conv2d(6, 2, 1)))
x = torch.randn(8, 6, 4, 4).contiguous(memory_format=torch.channels_last)
model(x).sum().backward()
assert model[0].weight.grad is not None and model[0].bias.grad is not None
print("ok")
"""


def test_frozen_channels_last_input_with_trainable_group_norm_parameters():
    """torch 2.13's channels-last group norm backward, asked for the parameters' gradients without the input's,
    crashes the process (see _torch_group_norm_backward_crashes): such calls take the kernels, and bfloat16, which
    they do not take, torch's channels-first kernel on a copy, the output in the input's layout."""
    result = subprocess.run([sys.executable, "-c", _FROZEN_CHANNELS_LAST_INPUT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-3000:])


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double_backward"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("small_inputs_to_torch", [True, False], ids=["small_to_torch", "small_on_kernels"])
def test_group_norm_bias_without_weight_gets_its_gradient(small_inputs_to_torch, dtype, layout, create_graph):
    """torch 2.13's group norm backward raises "tensor does not have a device" for a bias without a weight: the
    kernels compute that gradient, and the calls that go to torch's function (small inputs, bfloat16, double
    backward) get torch's results for a weight of ones."""
    ct.use_torch_for_small_inputs(small_inputs_to_torch)
    x = in_layout(random_tensor((2, 6, 3, 4), dtype, seed=6), layout)
    bias = random_tensor(6, dtype, seed=7).requires_grad_()
    grad_output = random_tensor(x.shape, dtype, seed=8)
    with pytest.raises(RuntimeError, match="tensor does not have a device"):   # (torch's, as it stands)
        torch.autograd.grad(F.group_norm(x.contiguous(), 3, None, bias), bias, grad_output)
    for x_records in (False, True):
        x = x.detach().requires_grad_(x_records)
        inputs = [x, bias] if x_records else [bias]
        grads = torch.autograd.grad(ct.group_norm(x, 3, None, bias), inputs, grad_output, create_graph=create_graph)
        x_torch = x.detach().contiguous().requires_grad_(x_records)   # (see _torch_group_norm_backward_crashes)
        bias_torch = bias.detach().requires_grad_()
        expected = torch.autograd.grad(F.group_norm(x_torch, 3, torch.ones(6, dtype=dtype), bias_torch),
                                       [x_torch, bias_torch] if x_records else [bias_torch], grad_output)
        for grad, grad_expected in zip(grads, expected, strict=True):
            # (bfloat16 runs torch's function on either side; with create_graph its backward rounds otherwise)
            tolerance = TOLERANCES.get(dtype, 2 ** -7 if create_graph else 0.0)
            assert_close_scaled(grad, grad_expected, tolerance)


@pytest.mark.parametrize("case", ["group_norm_2d", "instance_norm_2d", "layer_norm", "rms_norm"])
def test_other_devices_fall_back_to_torch(case):
    theirs, ours = module_pair(case, affine=True)
    theirs.to("meta"), ours.to("meta")
    x = torch.empty(MODULE_CASES[case][-1], device="meta")
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.device.type == "meta" and y_ours.shape == y_theirs.shape and y_ours.stride() == y_theirs.stride()


def test_mixed_dtypes_behave_as_torch(kernel_calls):
    x = random_tensor((2, 4, 3), torch.float32)
    weight = random_tensor(4, torch.float64)
    with pytest.raises(RuntimeError) as theirs:
        F.group_norm(x, 2, weight)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        ct.group_norm(x, 2, weight)
    assert not kernel_calls


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_torch_ops(kernel_calls):
    theirs, ours = module_pair("group_norm_2d", affine=True)
    x = random_tensor((2, 8, 3, 3), torch.float32)
    traced = torch.jit.trace(ours, x, check_trace=False)
    assert "aten::group_norm" in str(traced.graph) and not kernel_calls
    assert_close_scaled(traced(x), theirs(x), 1e-5)


def _every_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8),
                         nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.Flatten(1),
                         nn.LayerNorm(288), nn.RMSNorm(288), nn.Unflatten(1, (8, 36)), nn.InstanceNorm1d(8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_runs_torch_functions(kernel_calls, tmp_path):
    """TorchScript cannot compile the adapter's Python: a scripted model of our modules computes with torch's
    functions, as a traced one does, with torch's results and running statistics, and saves and loads as
    torch.nn's would.  The model itself keeps the kernels."""
    theirs = _every_norm_model()
    ours = ct.convert(theirs)
    scripted = torch.jit.script(ours)
    graph = str(scripted.inlined_graph)
    for op in ("group_norm", "instance_norm", "layer_norm", "rms_norm"):
        assert f"aten::{op}" in graph
    x = random_tensor((4, 3, 8, 8), torch.float32)
    for training in (True, False):
        theirs.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(dict(scripted.named_buffers()), dict(theirs.named_buffers()), rtol=0, atol=0)
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "scripted.pt")(x), theirs(x), rtol=0, atol=0)
    assert not kernel_calls
    assert all(type(module).__module__ == ct.__name__ for module in ours if "Norm" in type(module).__name__)
    ours(x)
    assert kernel_calls


class _UsesTheFunctionalAPI(nn.Module):
    def forward(self, x):
        x = ct.group_norm(x, 2)
        x = ct.instance_norm(x)
        x = ct.layer_norm(x, [x.shape[-1]])
        return ct.rms_norm(x, [x.shape[-1]])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_of_the_functional_api(kernel_calls):
    """User code calling our functions scripts too, into torch.nn.functional's."""
    x = random_tensor((4, 6, 5), torch.float32)
    expected = F.rms_norm(F.layer_norm(F.instance_norm(F.group_norm(x, 2)), [5]), [5])
    torch.testing.assert_close(torch.jit.script(_UsesTheFunctionalAPI())(x), expected, rtol=0, atol=0)
    assert not kernel_calls


SMALL_INPUTS_TO_TORCH = pytest.mark.parametrize("small_inputs_to_torch", [False, True],
                                                ids=["small_to_kernels", "small_to_torch"])


@SMALL_INPUTS_TO_TORCH
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_torch_export_records_torch_functions(strict, small_inputs_to_torch, kernel_calls, tmp_path):
    """torch.export gives a program of torch's own operators, for any batch size (the adapter's choice between
    torch's function and the kernels by size makes no guard on it), which loads and runs without cynorm."""
    ct.use_torch_for_small_inputs(small_inputs_to_torch)
    theirs = _every_norm_model().eval()
    x = random_tensor((4, 3, 8, 8), torch.float32)
    exported = torch.export.export(ct.convert(theirs), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                   strict=strict)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {f"aten.{op}.default" for op in ("group_norm", "instance_norm", "layer_norm", "rms_norm")} <= targets
    assert not any("cynorm" in target for target in targets)
    torch.export.save(exported, tmp_path / "exported.pt2")
    loaded = torch.export.load(tmp_path / "exported.pt2").module()
    for batch in (4, 2, 1000):
        x = random_tensor((batch, 3, 8, 8), torch.float32, seed=batch)
        torch.testing.assert_close(loaded(x), theirs(x), rtol=0, atol=0)
    assert not kernel_calls


@SMALL_INPUTS_TO_TORCH
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_export_with_dynamic_maps(layout, small_inputs_to_torch, kernel_calls):
    """Group norm, whose choice between torch's function and the kernels looks at the maps' size too, exports
    with dynamic map sizes."""
    ct.use_torch_for_small_inputs(small_inputs_to_torch)
    theirs = nn.Sequential(nn.GroupNorm(2, 8), nn.InstanceNorm2d(8)).eval()
    x = in_layout(random_tensor((2, 8, 6, 6), torch.float32), layout)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    exported = torch.export.export(ct.convert(theirs), (x,), dynamic_shapes=(dims,)).module()
    for shape in [(2, 8, 6, 6), (3, 8, 2, 5), (16, 8, 48, 40)]:
        x = in_layout(random_tensor(shape, torch.float32), layout)
        torch.testing.assert_close(exported(x), theirs(x), rtol=0, atol=0)
    assert not kernel_calls


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 4)], ids=["no_samples", "no_channels"])
def test_empty_input_behaves_as_torch(shape, kernel_calls):
    # (instance norm of no channels once reached the kernels' geometry, and raised ZeroDivisionError)
    for function, arguments in [("group_norm", (1,)), ("instance_norm", ()), ("layer_norm", ([4],)),
                                ("rms_norm", ([4],))]:
        x = torch.empty(shape)
        torch.testing.assert_close(getattr(ct, function)(x, *arguments), getattr(F, function)(x, *arguments))
    assert not kernel_calls


# --------------------------------------------------------------------------------------------------------
# Errors for bad arguments: torch's types and messages
# --------------------------------------------------------------------------------------------------------

def _channels_last_ones(*shape):
    return torch.ones(shape).contiguous(memory_format=torch.channels_last)


# Each takes (functional namespace, module namespace): (torch.nn.functional, torch.nn) or (ours, ours).
BAD_CALLS = {
    "group_norm_channels_not_divisible": lambda f, m: f.group_norm(torch.ones(2, 6, 4), 4),
    "group_norm_one_dimensional": lambda f, m: f.group_norm(torch.ones(6), 3),
    "group_norm_weight_shape": lambda f, m: f.group_norm(torch.ones(2, 6, 4), 3, torch.ones(4)),
    "group_norm_bias_shape": lambda f, m: f.group_norm(torch.ones(2, 6, 4), 3, None, torch.ones(5)),
    "group_norm_single_value_groups": lambda f, m: f.group_norm(torch.ones(1, 3), 3),
    # (channels-last maps of up to 256 values are routed by their groups' size, asked before any check)
    "group_norm_channels_last_not_divisible": lambda f, m: f.group_norm(_channels_last_ones(2, 6, 4, 4), 4),
    "group_norm_channels_last_no_groups": lambda f, m: f.group_norm(_channels_last_ones(2, 6, 4, 4), 0),
    "group_norm_channels_last_float_groups": lambda f, m: f.group_norm(_channels_last_ones(2, 6, 4, 4), 2.0),
    "group_norm_module_channels": lambda f, m: m.GroupNorm(4, 6),
    "group_norm_module_input_channels": lambda f, m: m.GroupNorm(2, 6)(torch.ones(2, 4, 3)),
    "instance_norm_no_spatial": lambda f, m: f.instance_norm(torch.ones(2, 3)),
    "instance_norm_single_spatial": lambda f, m: f.instance_norm(torch.ones(2, 3, 1, 1)),
    "instance_norm_weight_shape": lambda f, m: f.instance_norm(torch.ones(2, 3, 4), weight=torch.ones(4)),
    "instance_norm_module_rank": lambda f, m: m.InstanceNorm2d(3)(torch.ones(3, 4)),
    "instance_norm_module_features": lambda f, m: m.InstanceNorm1d(3, affine=True)(torch.ones(2, 4, 5)),
    "layer_norm_shape_mismatch": lambda f, m: f.layer_norm(torch.ones(2, 3, 4), [5]),
    "layer_norm_too_many_axes": lambda f, m: f.layer_norm(torch.ones(3, 4), [2, 3, 4]),
    "layer_norm_weight_shape": lambda f, m: f.layer_norm(torch.ones(2, 3, 4), [4], torch.ones(3)),
    "layer_norm_module_input": lambda f, m: m.LayerNorm((3, 5))(torch.ones(2, 3, 4)),
    "rms_norm_shape_mismatch": lambda f, m: f.rms_norm(torch.ones(2, 3, 4), [3]),
    "rms_norm_weight_shape": lambda f, m: f.rms_norm(torch.ones(2, 3, 4), [4], torch.ones(2, 2)),
    # (arguments that cannot be kept as the signature of a verdict, or compared with a size)
    "group_norm_list_of_groups": lambda f, m: f.group_norm(torch.ones(2, 6, 4), [2]),
    "group_norm_list_weight": lambda f, m: f.group_norm(torch.ones(2, 6, 4), 3, [1.0] * 6),
    "layer_norm_nested_shape": lambda f, m: f.layer_norm(torch.ones(2, 3, 4), [[4]]),
    "rms_norm_nested_shape": lambda f, m: f.rms_norm(torch.ones(2, 3, 4), [[4]]),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_arguments_raise_like_torch(case):
    with pytest.raises(Exception) as theirs:
        BAD_CALLS[case](F, nn)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        BAD_CALLS[case](ct, ct)


# --------------------------------------------------------------------------------------------------------
# state_dict compatibility and conversion
# --------------------------------------------------------------------------------------------------------

STATE_CASES = {
    "group_norm": (nn.GroupNorm, ct.GroupNorm, dict(num_groups=2, num_channels=4)),
    "instance_norm_tracking": (nn.InstanceNorm3d, ct.InstanceNorm3d, dict(num_features=4, affine=True,
                                                                           track_running_stats=True)),
    "instance_norm_plain": (nn.InstanceNorm1d, ct.InstanceNorm1d, dict(num_features=4)),
    "layer_norm_no_bias": (nn.LayerNorm, ct.LayerNorm, dict(normalized_shape=(2, 3), bias=False)),
    "rms_norm": (nn.RMSNorm, ct.RMSNorm, dict(normalized_shape=5)),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_state_dict_round_trip_and_repr(case):
    torch_class, our_class, arguments = STATE_CASES[case]
    torch.manual_seed(0)
    source, ours, theirs = torch_class(**arguments), our_class(**arguments), torch_class(**arguments)
    with torch.no_grad():
        for index, tensor in enumerate(source.state_dict().values()):
            tensor.copy_(random_tensor(tensor.shape, seed=index).to(tensor.dtype))
    ours.load_state_dict(source.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor) and torch.equal(theirs.state_dict()[name], tensor)
    assert repr(ours) == repr(source)
    ours.reset_parameters()
    source.reset_parameters()
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor)


class ResidualBlock(nn.Module):
    """A ResNet-style basic block with GroupNorm, plus norms kept in a ModuleList and a ModuleDict."""

    def __init__(self, channels=8, pixels=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(2, channels))
        self.extra = nn.ModuleList([nn.InstanceNorm2d(channels, affine=True)])
        self.heads = nn.ModuleDict({"out": nn.Sequential(nn.Flatten(1), nn.LayerNorm(channels * pixels))})

    def forward(self, x):
        y = self.extra[0](torch.relu(self.body(x) + x))
        return self.heads["out"](y)


class ForwardOverridingLayerNorm(nn.LayerNorm):
    def forward(self, input):
        return super().forward(input) * 2


def transformer_block():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, ForwardOverridingLayerNorm(16), nn.RMSNorm(16))


CONVERSION_CASES = {
    # name: (model factory, input shape, replaced modules, modules left alone)
    "residual_block": (ResidualBlock, (2, 8, 4, 4), 4, 0),
    "transformer_block": (transformer_block, (2, 5, 16), 3, 1),
}


@pytest.mark.parametrize("case", CONVERSION_CASES)
def test_convert_gives_same_outputs_and_gradients(case, caplog):
    make_model, shape, num_replaced, num_left_alone = CONVERSION_CASES[case]
    torch.manual_seed(0)
    # float64: some gradients here are sums that nearly cancel, which float32 cannot compare.
    model = make_model().double()
    x = random_tensor(shape)
    with caplog.at_level(logging.INFO, logger="cynorm.adapters.torch"):
        converted = ct.convert(model)
    assert f"replaced {num_replaced} modules" in caplog.text
    assert (f"left {num_left_alone} subclasses alone" in caplog.text) == (num_left_alone > 0)
    assert not any(type(m) in KERNEL_OF_MODULE for m in model.modules())  # the original is untouched
    ours = [m for m in converted.modules() if type(m) in KERNEL_OF_MODULE]
    assert len(ours) == num_replaced

    outputs = [m(x) for m in (model, converted)]
    assert_close_scaled(outputs[1], outputs[0], 1e-12)
    grad_output = random_tensor(outputs[0].shape, seed=1)
    for output in outputs:
        output.backward(grad_output)
    for original, parameter in zip(model.parameters(), converted.parameters(), strict=True):
        assert_close_scaled(parameter.grad, original.grad, 1e-10)

    reverted = ct.revert(converted)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]


def test_convert_inplace_keeps_module_objects_and_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.GroupNorm(2, 4)))
    model.append(model[1])  # a shared module
    parameters = list(model.parameters())
    norms = [model[1], model[2][0]]
    assert ct.convert(model, inplace=True) is model
    assert [type(m) for m in model.modules()][1:] == [nn.Linear, ct.LayerNorm, nn.Sequential, ct.GroupNorm]
    assert model[3] is model[1] is norms[0] and model[2][0] is norms[1]
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert type(ct.convert(nn.InstanceNorm1d(3))) is ct.InstanceNorm1d


# --------------------------------------------------------------------------------------------------------
# torch.compile and torch.fx
# --------------------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = ct.GroupNorm(4, 8)
        self.instance_norm = ct.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.linear = nn.Linear(8 * 6 * 6, 8)
        self.layer_norm = ct.LayerNorm(8)
        self.rms_norm = ct.RMSNorm(8)

    def forward(self, x):
        y = self.instance_norm(torch.relu(self.group_norm(self.conv(x))))
        return self.rms_norm(self.layer_norm(self.linear(y.flatten(1))))


def _eager_and_compiled(backend):
    """Two SmallNets with the same parameters, the second also compiled with ``backend`` ("graph_capture": the
    graphs Dynamo captures, run as they are, appended to the list returned last)."""
    graphs = []

    def graph_capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    eager = SmallNet()
    compiled_net = SmallNet()
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net, backend=graph_capture if backend == "graph_capture" else backend,
                             fullgraph=True)
    return eager, compiled_net, compiled, graphs


@pytest.mark.parametrize("backend", ["graph_capture", "inductor"])
def test_torch_compile_matches_eager(backend):
    eager, compiled_net, compiled, graphs = _eager_and_compiled(backend)
    for step in range(2):
        x = random_tensor((2, 3, 6, 6), torch.float32, seed=step).contiguous(memory_format=torch.channels_last)
        outputs = [eager(x), compiled(x)]
        assert_close_scaled(outputs[1], outputs[0], 1e-5)
        for output in outputs:
            output.sum().backward()
    for (name, tensor), (_, compiled_tensor) in zip(eager.state_dict().items(), compiled_net.state_dict().items()):
        assert_close_scaled(compiled_tensor, tensor, 1e-5)
    for parameter, compiled_parameter in zip(eager.parameters(), compiled_net.parameters()):
        assert_close_scaled(compiled_parameter.grad, parameter.grad, 1e-5)
    if backend == "graph_capture":
        assert len(graphs) == 1
        code = graphs[0].code
        assert all(f"torch.ops.cynorm.{name}" in code for name in KERNEL_NAMES)


def test_torch_compile_traces_torch_functions_for_small_inputs():
    """With the small-input setting on (the default), torch.compile traces torch's own functions where an eager
    call would run them (group and layer norm here), the kernels' operators elsewhere (instance norm; RMS norm,
    which records a gradient), and gives the eager results."""
    assert ct.use_torch_for_small_inputs(True) is False
    eager, compiled_net, compiled, graphs = _eager_and_compiled("graph_capture")
    x = random_tensor((2, 3, 6, 6), torch.float32).contiguous(memory_format=torch.channels_last)
    outputs = [eager(x), compiled(x)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for output in outputs:
        output.sum().backward()
    for parameter, compiled_parameter in zip(eager.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(compiled_parameter.grad, parameter.grad, rtol=0, atol=0)
    code = graphs[0].code
    for name in ("instance_norm", "rms_norm"):
        assert f"torch.ops.cynorm.{name}" in code
    for name in ("group_norm", "layer_norm"):
        assert f"torch.ops.cynorm.{name}" not in code and f"torch.nn.functional.{name}" in code


def test_fx_symbolic_trace_takes_our_modules_whole(kernel_calls):
    """torch.fx.symbolic_trace gives ours the graph of torch.nn's model, a call_module node per norm (it takes
    torch.nn's modules whole), so the traced model runs our modules in the mode they are in when it runs."""
    theirs = _every_norm_model()
    ours = ct.convert(theirs)
    traced = torch.fx.symbolic_trace(ours)

    def nodes(model):
        return [(node.op, node.target) for node in model.graph.nodes]

    assert nodes(traced) == nodes(torch.fx.symbolic_trace(theirs))
    x = random_tensor((4, 3, 8, 8), torch.float32)
    for training in (True, False):   # evaluation after training: the running statistics training moved
        theirs.train(training)
        traced.train(training)
        kernel_calls.clear()
        assert_close_scaled(traced(x), theirs(x), 1e-5)
        assert kernel_calls
        torch.testing.assert_close(dict(traced.named_buffers()), dict(theirs.named_buffers()))


def test_fx_symbolic_trace_keeps_our_functions():
    """Calls of our functions from other modules are single call_function nodes, which run the kernels."""
    traced = torch.fx.symbolic_trace(_UsesTheFunctionalAPI())
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert {ct.group_norm, ct.instance_norm, ct.layer_norm, ct.rms_norm} <= targets
    x = random_tensor((4, 6, 5), torch.float32)
    torch.testing.assert_close(traced(x), _UsesTheFunctionalAPI()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_training_matches_single_process(tmp_path):
    batch_size, steps, world_size, timeout = 8, 3, 2, 120
    result_path = tmp_path / "rank0.pt"
    context = torch.multiprocessing.spawn(
        ddp_train_worker, nprocs=world_size, join=False,
        args=(world_size, f"tcp://127.0.0.1:{free_port()}", batch_size, steps, str(result_path)))
    deadline = time.monotonic() + timeout
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))
    if any(process.is_alive() for process in context.processes):
        for process in context.processes:
            process.kill()
        pytest.fail(f"DDP workers did not finish within {timeout} s")
    for rank, process in enumerate(context.processes):
        # Even after the barrier, gloo's threads have aborted a rank's exit ("terminate called without an active
        # exception", SIGABRT; once in CI): accepted from a rank that had finished its work and its process
        # group, a failure anywhere before.  (The ranks are waited for one by one: torch's own join stops the
        # others as soon as one fails.)
        if process.exitcode != 0 and not (process.exitcode == -signal.SIGABRT
                                          and finished_marker(result_path, rank).exists()):
            error_file = pathlib.Path(context.error_files[rank])   # the worker's traceback, pickled by torch
            trace = pickle.loads(error_file.read_bytes()) if error_file.exists() else ""
            pytest.fail(f"DDP rank {rank} exited with code {process.exitcode}\n{trace}")

    torch.manual_seed(0)
    model = train(small_conv_net(), *training_batch(batch_size), steps)
    distributed = torch.load(result_path)
    assert distributed.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(distributed[name], tensor, rtol=1e-4, atol=1e-5)
    # The run changed the parameters: the comparison is not between two untrained models.
    torch.manual_seed(0)
    untrained = small_conv_net().state_dict()
    assert not torch.allclose(untrained["0.weight"], model.state_dict()["0.weight"])
