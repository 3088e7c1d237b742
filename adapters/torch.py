"""PyTorch adapter: the cynorm kernels behind torch autograd, as drop-in ``torch.nn`` modules.

Three layers:

* ``torch.library`` custom operators ``cynorm::<norm>`` and ``cynorm::<norm>_backward`` that hand the
  tensors' memory to the kernels (``.numpy()`` views, outputs filled through ``out=``), with fake
  implementations so ``torch.compile`` keeps them in one graph, and autograd formulas that call the backward
  kernels;
* a functional API with the signatures of ``torch.nn.functional`` that runs those operators where the kernels
  apply (CPU, float32/float64, valid arguments) and otherwise calls torch's own function, which gives torch's
  results, and torch's exceptions for bad arguments.  In eager mode the operators are skipped: a call with a
  gradient to record runs an autograd Function on the kernels, one without calls the kernels directly;
* modules that subclass the ``torch.nn`` ones, so arguments, parameters, buffers, ``state_dict`` keys,
  ``reset_parameters`` and ``repr`` are torch's; plus :func:`convert` / :func:`revert` for existing models.

Example::

    from cynorm.adapters.torch import GroupNorm, convert
    norm = GroupNorm(32, 256)              # instead of torch.nn.GroupNorm(32, 256)
    model = convert(model)                 # or swap every torch.nn norm of a model
"""
import copy
import functools
import logging
import math
import operator
import threading
import types
from typing import List, NamedTuple, Optional

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import has_torch_function_variadic

import cynorm
from cynorm import _api, _kernels
from cynorm._blocks import PAGE_BYTES, BlockPool, placement
from cynorm._threads import framework_threads

__all__ = [
    "group_norm", "instance_norm", "layer_norm", "rms_norm",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
    "convert", "revert", "set_output_cache_limit", "use_torch_for_small_inputs",
]

_logger = logging.getLogger(__name__)

# (float16 through the NumPy API, which computes it in float32 a chunk at a time; see _float16_to_torch)
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16)
# torch's queries that every eager call makes, bound once (each lookup through torch's modules cost up to a µs
# after a kernel had swept the caches)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor   # (autograd.grad's is_grads_batched=True)
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_dispatch_mode_count = torch._C._len_torch_dispatch_stack
_storage_use_count = torch._C._storage_Use_Count
_inference_mode_enabled = torch.is_inference_mode_enabled
_is_exporting = torch.compiler.is_exporting
_FxProxy = torch.fx.Proxy


# ---------------------------------------------------------------------------------------------------------
# Memory layout and output allocation
# ---------------------------------------------------------------------------------------------------------

def _memory_order(tensor, batch_first=True):
    """Axes of ``tensor`` from outermost to innermost in memory, or None for the axes as they are; with
    ``batch_first``, only an order that starts with the batch axis (the channel norms' samples).

    ``tensor.permute(order)`` is C-contiguous when the tensor is dense (channels_last is (0, 2, 3, 1)).  None
    is returned for a contiguous tensor and for one that is not dense, of which the kernel makes its one copy.
    """
    if tensor.is_contiguous():
        return None
    order = _channels_last_order(tensor)
    if order is not None:
        return order   # the common case, answered without sorting strides
    order = tuple(sorted(range(tensor.dim()), key=lambda axis: (batch_first and axis != 0, -tensor.stride(axis))))
    return order if tensor.permute(order).is_contiguous() else None


_CHANNELS_LAST = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def _channels_last_order(tensor):
    """The axes of a dense channels-last (or channels_last_3d) tensor in memory order, else None: asked of torch
    without a permuted view, which autograd records for tensors that require grad (1.6 µs, and 14 µs after a
    kernel had swept the caches)."""
    memory_format, order = _CHANNELS_LAST.get(tensor.dim(), (None, None))
    return order if memory_format is not None and tensor.is_contiguous(memory_format=memory_format) else None


def _in_memory_order(tensor, order):
    """A C-contiguous NumPy array of ``tensor`` with its axes permuted into ``order`` (None: as they are): a view
    when the memory is already in that order, else a copy made by torch."""
    return _contiguous_array(tensor if order is None else tensor.permute(order))


def _dense_in_order(tensor, order):
    """A tensor whose memory holds ``tensor``'s values C-contiguously with the axes in ``order`` (None: as they
    are), for the kernels to take by address: ``tensor`` itself when its memory already does, else a copy made
    by torch."""
    if order is None:
        return tensor if tensor.is_contiguous() else tensor.contiguous()
    if order == _channels_last_order(tensor):
        return tensor
    permuted = tensor.permute(order)
    return tensor if permuted.is_contiguous() else permuted.contiguous()


def _input_in_order(input, plan):
    """:func:`_dense_in_order` for the order of ``input``'s plan, without checking again: ``input`` itself when
    its memory is dense in that order.  (The check cost 15-20 µs a call after a kernel had swept the caches.)"""
    return input if plan.dense else input.contiguous()


def _gradient_in_order(grad_output, plan):
    """``grad_output`` laid out as _input_in_order lays out the input of ``plan``: itself when it has the input's
    strides (as the outputs have: the usual case, answered without asking torch about its layout), else as
    :func:`_dense_in_order` makes it."""
    if plan.dense and grad_output.stride() == plan.strides:
        return grad_output
    return _dense_in_order(grad_output, plan.order)


def _memory_shape(tensor, order):
    return tuple(tensor.shape) if order is None else tuple(tensor.shape[axis] for axis in order)


def _contiguous_array(tensor):
    # torch copies with every thread, the NumPy API's own copy with one: a (16,64,32,32) tensor with its axes
    # moved (a gradient in another layout than the input, a layer norm over a middle axis) took 2.0 ms against
    # 4.4 ms.  Either is slow for a transposition: keep gradients in the layout of the input.
    return _array(tensor if tensor.is_contiguous() else tensor.contiguous())


def _channel_axis(order):
    return 1 if order is None else order.index(1)


def _array(tensor):
    """A NumPy view of a CPU tensor's memory (None stays None)."""
    if tensor is None:
        return None
    return tensor.detach().numpy() if tensor.requires_grad else tensor.numpy()


def _stats_like(input, shape, real):
    """Empty float64 statistics of ``shape`` for ``input``: NumPy's memory as a tensor where the kernels fill
    them (``real``: 0.6 µs, against 1.1 µs for torch's allocation, and 2.2 µs after a kernel had swept the
    caches), else torch's, which gives fake tensors (torch.compile, the meta device) fake statistics."""
    if real:
        return torch.from_numpy(np.empty(shape))
    return input.new_empty(shape, dtype=torch.float64)


def _channel_norm_output(input, cached=False):
    """An empty output laid out in memory like ``input``, and that memory order (see :func:`_memory_order`)."""
    order = _memory_order(input)
    return _empty(input, order, cached), order


class _TrailingLayout(NamedTuple):
    """How the kernels see a norm over the last axes of a tensor: its memory order (see :func:`_memory_order`;
    None: the axes as they are), the normalized axes' positions in that order, and the other (leading) axes in
    that order, which is the memory order of the statistics (None: the logical order)."""
    order: tuple | None
    axes: tuple
    leading: tuple | None


def _trailing_layout(input, num_axes):
    """A dense input whose normalized axes lie together and in order in memory, as in a permuted view (the
    (N, H, W, C) view of NCHW memory that ConvNeXt's channel LayerNorm makes, or a (batch, time, features)
    view of time-major memory), is normalized where it lies, through the kernels' columns view: no transposing
    copy, and the output keeps the input's layout.  Any other input is normalized over a C-contiguous copy,
    into a C-contiguous output, as torch's layer_norm returns."""
    order = _memory_order(input, batch_first=False)
    if order is not None:
        first = input.dim() - num_axes
        start = order.index(first)
        if order[start:start + num_axes] == tuple(range(first, input.dim())):
            leading = tuple(axis for axis in order if axis < first)
            return _TrailingLayout(order, tuple(range(start, start + num_axes)),
                                   None if leading == tuple(range(first)) else leading)
    return _in_place_layout(input.dim(), num_axes)


@functools.lru_cache(maxsize=64)
def _in_place_layout(dim, num_axes):
    """The layout of a norm over the last ``num_axes`` of a ``dim``-dimensional tensor, as the axes are."""
    return _TrailingLayout(None, tuple(range(dim - num_axes, dim)), None)


def _trailing_norm_stats(input, layout, real):
    """Empty float64 statistics of the leading axes' logical shape, their memory in the kernels' order (``real``
    as for _stats_like)."""
    return _new_stats(input, _stats_memory_shape(input, layout), _logical_order(layout), real)


def _stats_memory_shape(input, layout):
    """The shape of a trailing norm's statistics with their axes in the kernels' order (the leading axes as they
    lie in memory)."""
    if layout.leading is None:
        return tuple(input.shape[:input.dim() - len(layout.axes)])
    return tuple(input.shape[axis] for axis in layout.leading)


def _logical_order(layout):
    """The permutation from the kernels' order of the statistics' axes to the logical one (None: the same)."""
    return None if layout.leading is None else [layout.leading.index(axis) for axis in range(len(layout.leading))]


def _new_stats(input, shape, logical_order, real):
    """Empty statistics of ``shape`` (see _stats_like) as the view of their axes in ``logical_order``."""
    stats = _stats_like(input, shape, real)
    return stats if logical_order is None else stats.permute(logical_order)


def _stats_to_logical(memory, layout):
    """Statistics in the kernels' order (the leading axes as they lie in memory) as the logical axes' view."""
    return memory if layout.leading is None else memory.permute(_logical_order(layout))


class _Plan(NamedTuple):
    """How the eager paths hand an input of one shape and strides to the kernels, for a channel norm of some
    number of groups or a norm over some number of trailing axes (see :func:`_plan`)."""
    strides: tuple            # of the input
    order: tuple | None       # the memory order of the input, and of the output (see _memory_order)
    dense: bool               # whether the input's memory holds it C-contiguously in that order
    geometry: tuple           # the kernels' view (cynorm._api._Geometry)
    param_shape: tuple        # of weight and bias, and of their gradients
    stats_shape: tuple        # of the statistics, their axes in memory order
    stats_order: list | None  # the permutation from that order to the logical one (None: the same)
    stats_view: tuple         # (shape, strides) of the statistics the eager forward returns: the logical view
    stats_count: int          # how many statistics of each kind (mean, rstd) the kernels write


_PLANS_HELD = 256
_plans = {}


def _plan(input, num_groups=None, num_axes=None):
    """The :class:`_Plan` of a channel norm of ``num_groups`` groups, or of a norm over the last ``num_axes``
    axes, for tensors of ``input``'s shape and strides: worked out from the tensor once and kept, as all of it
    follows from those (the memory order, shapes and geometry took 6 µs of a call after a kernel had swept
    the caches, against 1-2 µs for the look-up)."""
    key = (input.shape, input.stride(), num_groups, num_axes)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLANS_HELD:
            _plans.clear()
        order, *rest = (_channel_plan(input, num_groups) if num_axes is None else _trailing_plan(input, num_axes))
        plan = _plans[key] = _Plan(key[1], order, order is not None or input.is_contiguous(), *rest,
                                   _logical_view(*rest[-2:]), math.prod(rest[-2]))
    return plan


def _logical_view(memory_shape, logical_order):
    """(shape, strides) of a C-contiguous tensor of ``memory_shape`` seen with its axes in ``logical_order``."""
    strides, stride = [], 1
    for size in reversed(memory_shape):
        strides.insert(0, stride)
        stride *= size
    if logical_order is None:
        return tuple(memory_shape), tuple(strides)
    return tuple(memory_shape[axis] for axis in logical_order), tuple(strides[axis] for axis in logical_order)


def _channel_plan(input, num_groups):
    """The fields of a channel norm's _Plan from ``order`` on."""
    order = _memory_order(input)
    shape = _memory_shape(input, order)
    axis = _channel_axis(order)
    return order, _api._group_geometry(shape, axis, num_groups), (shape[axis],), (shape[0], num_groups), None


def _trailing_plan(input, num_axes):
    """The fields of a trailing norm's _Plan from ``order`` on."""
    layout = _trailing_layout(input, num_axes)
    return (layout.order, _api._layer_geometry(_memory_shape(input, layout.order), layout.axes),
            tuple(input.shape[input.dim() - num_axes:]), _stats_memory_shape(input, layout), _logical_order(layout))


def _empty(input, order, cached):
    """An empty tensor of ``input``'s shape, dtype and device whose memory holds the axes in ``order`` (None:
    C-contiguous; else ``input`` is dense in that order).  ``cached``: a large one comes from the output cache
    (for the kernels' real outputs; fake tensors, for torch.compile and the meta device, are never cached)."""
    if cached and input.nbytes >= _CACHED_OUTPUT_BYTES:
        output = _cached_empty(input, contiguous=order is None)
        if output is not None:
            return output
    # (empty_like measured 3 µs against 7 µs for torch.empty with shape, dtype and device)
    if order is None:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    return torch.empty_like(input)   # a dense input's strides, hence its memory order


def _new_output_cache(limit):
    """The memory of large kernel outputs (see cynorm._blocks): :class:`_Block` s of torch storage, free when
    nothing but the cache holds one (outputs, their views, the autograd graph and NumPy arrays made from them all
    hold it).  Channels-last InstanceNorm2d (8,64,128,128) measured 6.5 ms a call with reused memory against
    11-12 ms with fresh memory.  (NumPy memory that gave itself back from __del__ cost 7.2-7.8 µs a take and
    give-back, warm, against 5.0 µs.)"""
    return BlockPool(limit, allocate=_Block, is_free=_Block.is_free)


class _Block:
    """A block of the output cache: its storage, and a tensor on it for each shape, strides, dtype and inference
    mode asked for so far (a template, never handed out).  Each output is a detached alias of its template: a
    tensor of its own, not a view.  Once the caches had been swept, as by a kernel between two calls, detaching
    took 10-12 µs against 29-34 µs for setting a new tensor on the storage (its shape and strides parsed again)."""
    __slots__ = ("storage", "templates")

    def __init__(self, nbytes):
        # offered to Linux as transparent huge pages before its first write, as NumPy does with its large
        # arrays: the block lives as long as the cache, and every pass over it then takes fewer TLB misses (in
        # one process, with and without: forwards 1.02-1.07x, training steps 1.00-1.11x faster, for GroupNorm,
        # InstanceNorm and LayerNorm of 8-26 MB)
        self.storage = torch.UntypedStorage(nbytes + PAGE_BYTES, device="cpu")   # (room to place outputs)
        _kernels.advise_huge_pages(self.storage.data_ptr(), nbytes + PAGE_BYTES)
        self.templates = {}

    def is_free(self):
        """Whether only the block references its storage: the storage object and each template."""
        return _storage_use_count(self.storage._cdata) == 1 + len(self.templates)

    def tensor(self, like, stride):
        """An empty tensor of ``like``'s shape and dtype with ``stride`` (() for C-contiguous) on the storage,
        an inference tensor in inference mode as torch's outputs are, placed half a page from ``like`` (see
        cynorm._blocks.placement)."""
        offset = placement(self.storage.data_ptr(), like.data_ptr())
        key = (like.shape, stride, like.dtype, _inference_mode_enabled(), offset)
        template = self.templates.get(key)
        if template is None:
            if len(self.templates) >= _TEMPLATES_HELD:
                self.templates.clear()
            template = self.templates[key] = like.new_empty(0).set_(self.storage, offset // like.element_size(),
                                                                    like.shape, stride)
        return template.detach()


# A block's templates: a model's layers ask for few layouts of one size.
_TEMPLATES_HELD = 8


def _cached_empty(like, contiguous):
    """An empty tensor of ``like``'s shape and dtype, C-contiguous or with ``like``'s strides (``like`` being
    dense), on the output cache's memory; None when the cache has no room.  A tensor of its own, not a view, so
    in-place operations on it behave as on any output."""
    return _output_cache.take(like.nbytes, _Block.tensor, like, () if contiguous else like.stride())


# Outputs from 1 MiB on: with the C library's heap in some states (depending on what the process allocated
# before), every 4 MB output came back as fresh pages, 165-330 page faults a call, for torch's own GroupNorm as
# for ours (0.97-1.36 ms a (16,64,32,32) forward instead of 0.36-0.61 ms); from the cache, never.
_CACHED_OUTPUT_BYTES = 2 ** 20
_output_cache = _new_output_cache(limit=256 * 2 ** 20)


def set_output_cache_limit(nbytes):
    """Sets how many bytes of output memory the adapter's cache may hold (default 256 MiB); returns the previous
    limit.  ``0`` turns the cache off and releases what it holds.

    Outputs of 1 MiB or more (forward outputs and input gradients) come from the cache while it has room: their
    memory is reused once every tensor and view of the output has been freed, instead of being faulted in
    afresh.  Beyond the limit, outputs get fresh memory from torch.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_output_cache_limit() expects a number of bytes >= 0, got {nbytes!r}")
    return _output_cache.set_limit(nbytes)


# ---------------------------------------------------------------------------------------------------------
# The kernels on tensors, and the custom operators around them.  Each norm's forward and backward run either
# on arguments this module has checked (``trusted``: the eager paths, after the functional API's checks or on
# what its own forward returned) or through the NumPy API, which checks every argument first.  Both give the
# same bits.  Skipping the second round of checks saved about 0.4 ms a training step on tensors of 8 MB, where
# the Python between kernels runs on caches the kernels have just swept.  The operators take whatever a caller
# of torch.ops.cynorm passes: they check it as the functional API does (and the statistics a backward gets),
# take the trusted path if it passes, and leave anything else to the NumPy API, with its errors.  Each
# ``register_fake`` gives the same shapes, dtypes and strides without computing, for torch.compile and the
# meta device.
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _constant(size, dtype, value):
    """A tensor standing in for a missing weight or bias, shared between calls (never written)."""
    return torch.full((size,), value, dtype=dtype, device="cpu")


def _kernel_param(tensor, size, dtype, default):
    """A checked parameter with its values contiguous in memory, or a constant standing in for a missing one."""
    if tensor is None:
        return _constant(size, dtype, default)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


# The kernels take every tensor by address (data_ptr), so the eager paths make no NumPy arrays: a conversion
# either way cost 7-20 µs once a kernel had swept the caches, and a training step made nine of them.

def _trusted_forward(input, plan, weight, bias, eps, centered):
    """The forward kernel of ``input``'s ``plan`` on checked arguments; returns (y, mean, rstd): y laid out in
    memory as the input, the statistics fresh float64 tensors whose memory is in the kernels' order."""
    x = _input_in_order(input, plan)
    mean = _new_stats(input, plan.stats_shape, plan.stats_order, real=True)
    rstd = _new_stats(input, plan.stats_shape, plan.stats_order, real=True)
    num_params = math.prod(plan.param_shape)
    weight = _kernel_param(weight, num_params, x.dtype, 1.0)
    bias = _kernel_param(bias, num_params, x.dtype, 0.0)
    y = _forward_kernel(x, plan, weight, bias, eps, centered, mean.data_ptr(), rstd.data_ptr(),
                        x.dtype == torch.float64)
    return y, mean, rstd


def _forward_kernel(x, plan, weight, bias, eps, centered, mean, rstd, float64):
    """The output of ``plan``'s forward kernel on ``x``, dense in the plan's order, and on kernel parameters (see
    _kernel_param), with the statistics written at the addresses ``mean`` and ``rstd``."""
    y = _empty(x, plan.order, cached=True)
    _api._run_forward(x.data_ptr(), y.data_ptr(), x.numel(), weight.data_ptr(), bias.data_ptr(), mean, rstd,
                      float64, plan.geometry, float(eps), centered)
    return y


def _trusted_backward(grad_output, input, mean, rstd, weight, plan, centered):
    """The backward kernel of ``input``'s ``plan`` on checked arguments and the statistics _trusted_forward
    returned (mean unused unless ``centered``); returns (grad_input, grad_weight, grad_bias), the parameter
    gradients of the input's dtype and of the plan's parameter shape."""
    dy, x = _gradient_in_order(grad_output, plan), _input_in_order(input, plan)
    dx = _empty(input, plan.order, cached=True)
    dweight = x.new_empty(plan.param_shape)
    dbias = x.new_empty(plan.param_shape)
    weight = _kernel_param(weight, math.prod(plan.param_shape), x.dtype, 1.0)
    _api._run_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), mean.data_ptr() if centered else 0,
                       rstd.data_ptr(), weight.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                       x.dtype == torch.float64, plan.geometry, centered)
    return dx, dweight, dbias


def _stats_tensors(shape, *stats):
    """The NumPy API's statistics as tensors of ``shape`` (None, RMS norm's mean, stays None)."""
    return tuple(None if stat is None else torch.from_numpy(stat.reshape(shape)) for stat in stats)


def _on_trusted_path(input, trusted):
    """Whether the kernels take ``input``'s memory as it is: arguments the functional API has checked
    (``trusted``), of float32 or float64.  float16 goes through the NumPy API, which computes it in float32."""
    return trusted and input.dtype is not torch.float16


# The kernels follow torch.set_num_threads, as torch's own ops do in every thread (cynorm.set_num_threads still
# overrides it).  Left to OpenMP's count, which torch.set_num_threads sets in its caller's thread only, they took
# every core in the other threads: a server's threads, each meant to compute on one, would all use them all.
_following_torch_threads = framework_threads(torch.get_num_threads)


@_following_torch_threads
def _channel_norm(input, weight, bias, eps, num_groups, trusted):
    """Group norm of (N, C, *spatial), instance norm with a group per channel, in the input's own memory
    layout; returns (y, mean, rstd).

    The kernel sees the memory as it is: a channels-last tensor is a C-contiguous (N, *spatial, C) array, with
    the channel axis last.
    """
    if _on_trusted_path(input, trusted):
        return _trusted_forward(input, _plan(input, num_groups=num_groups), weight, bias, eps, centered=True)
    output, order = _channel_norm_output(input, cached=True)
    _, *stats = cynorm.group_norm(_in_memory_order(input, order), num_groups, _array(weight), _array(bias),
                                  axis=_channel_axis(order), eps=eps, out=_in_memory_order(output, order),
                                  return_stats=True)
    return (output,) + _stats_tensors((input.shape[0], num_groups), *stats)


@_following_torch_threads
def _channel_norm_backward(grad_output, input, mean, rstd, weight, trusted):
    if _on_trusted_path(input, trusted):
        return _trusted_backward(grad_output, input, mean, rstd, weight, _plan(input, num_groups=mean.shape[1]),
                                 centered=True)
    grad_input, order = _channel_norm_output(input, cached=True)
    dy, x, dx = (_in_memory_order(t, order) for t in (grad_output, input, grad_input))
    _, *param_grads = cynorm.group_norm_backward(dy, x, _array(mean), _array(rstd), _array(weight),
                                                 axis=_channel_axis(order), out=dx)
    return (grad_input, *(torch.from_numpy(grad).to(input.dtype) for grad in param_grads))


def _fake_channel_norm(input, num_groups):
    stats_shape = (input.shape[0], num_groups)
    return (_channel_norm_output(input)[0], _stats_like(input, stats_shape, real=False),
            _stats_like(input, stats_shape, real=False))


def _fake_channel_norm_backward(input):
    return _channel_norm_output(input)[0], input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


@_following_torch_threads
def _trailing_norm(input, normalized_shape, weight, bias, eps, centered, trusted):
    """Layer norm (RMS norm unless ``centered``) over the trailing ``normalized_shape``; returns (y, mean,
    rstd), mean None for RMS norm."""
    if _on_trusted_path(input, trusted):
        output, mean, rstd = _trusted_forward(input, _plan(input, num_axes=len(normalized_shape)), weight, bias, eps,
                                              centered)
        return output, mean if centered else None, rstd
    layout = _trailing_layout(input, len(normalized_shape))
    output = _empty(input, layout.order, cached=True)
    x, y = _in_memory_order(input, layout.order), _in_memory_order(output, layout.order)
    if centered:
        _, mean, rstd = cynorm.layer_norm(x, _array(weight), _array(bias), axis=layout.axes, eps=eps, out=y,
                                          return_stats=True)
    else:
        _, rstd = cynorm.rms_norm(x, _array(weight), axis=layout.axes, eps=eps, out=y, return_stats=True)
        mean = None
    return (output,) + tuple(None if stat is None else _stats_to_logical(torch.from_numpy(stat), layout)
                             for stat in (mean, rstd))


def _stats_in_memory_order(stat, layout):
    """The inverse of _stats_to_logical, as a NumPy array for the NumPy API (None stays None)."""
    if stat is None:
        return None
    return _array(stat if layout.leading is None else stat.permute(layout.leading))


@_following_torch_threads
def _trailing_norm_backward(grad_output, input, mean, rstd, weight, trusted):
    """Gradients of _trailing_norm (of RMS norm when ``mean`` is None)."""
    centered = mean is not None
    if _on_trusted_path(input, trusted):   # the statistics _trailing_norm made, in the kernels' order
        plan = _plan(input, num_axes=input.dim() - rstd.dim())
        return _trusted_backward(grad_output, input, mean, rstd, weight, plan, centered)
    layout = _trailing_layout(input, input.dim() - rstd.dim())
    grad_input = _empty(input, layout.order, cached=True)
    dy, x, dx = (_in_memory_order(t, layout.order) for t in (grad_output, input, grad_input))
    mean, rstd = (_stats_in_memory_order(stat, layout) for stat in (mean, rstd))
    if centered:
        _, *param_grads = cynorm.layer_norm_backward(dy, x, mean, rstd, _array(weight), axis=layout.axes, out=dx)
        param_grads = [torch.from_numpy(grad).to(input.dtype) for grad in param_grads]
    else:
        _, grad_weight, _ = cynorm.rms_norm_backward(dy, x, rstd, _array(weight), axis=layout.axes, out=dx)
        param_grads = [torch.from_numpy(grad_weight).to(input.dtype), None]
    return (grad_input, *param_grads)


# The operators' implementations: the trusted path on arguments that pass the functional API's checks (see
# _group_norm_takes), the NumPy API on any other.

def _group_norm_kernels(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_norm(input, weight, bias, eps, num_groups,
                         trusted=_group_norm_takes(input, num_groups, weight, bias, eps))


_group_norm_op = torch.library.custom_op("cynorm::group_norm", _group_norm_kernels, mutates_args=())


@_group_norm_op.register_fake
def _(input, num_groups, weight, bias, eps):
    return _fake_channel_norm(input, num_groups)


def _channel_norm_backward_op(name):
    """The backward operator ``cynorm::<name>`` of a channel norm (group and instance norm share one)."""
    def kernels(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return _channel_norm_backward(grad_output, input, mean, rstd, weight,
                                      trusted=_channel_norm_backward_takes(grad_output, input, mean, rstd, weight))

    op = torch.library.custom_op(f"cynorm::{name}", kernels, mutates_args=())
    op.register_fake(lambda grad_output, input, mean, rstd, weight: _fake_channel_norm_backward(input))
    return op


_group_norm_backward_op = _channel_norm_backward_op("group_norm_backward")


def _instance_norm_kernels(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_norm(input, weight, bias, eps, input.shape[1],
                         trusted=_instance_norm_takes(input, weight, bias, eps))


_instance_norm_op = torch.library.custom_op("cynorm::instance_norm", _instance_norm_kernels, mutates_args=())


@_instance_norm_op.register_fake
def _(input, weight, bias, eps):
    return _fake_channel_norm(input, input.shape[1])


_instance_norm_backward_op = _channel_norm_backward_op("instance_norm_backward")


def _layer_norm_kernels(input: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    trusted = _layer_norm_takes(input, tuple(normalized_shape), weight, bias, eps)
    return _trailing_norm(input, normalized_shape, weight, bias, eps, centered=True, trusted=trusted)


_layer_norm_op = torch.library.custom_op("cynorm::layer_norm", _layer_norm_kernels, mutates_args=())


@_layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps):
    layout = _trailing_layout(input, len(normalized_shape))
    return (_empty(input, layout.order, cached=False), _trailing_norm_stats(input, layout, real=False),
            _trailing_norm_stats(input, layout, real=False))


def _layer_norm_backward_kernels(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                                 weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    trusted = _trailing_norm_backward_takes(grad_output, input, mean, rstd, weight)
    return _trailing_norm_backward(grad_output, input, mean, rstd, weight, trusted=trusted)


_layer_norm_backward_op = torch.library.custom_op("cynorm::layer_norm_backward", _layer_norm_backward_kernels,
                                                  mutates_args=())


@_layer_norm_backward_op.register_fake
def _(grad_output, input, mean, rstd, weight):
    param_shape = input.shape[mean.dim():]
    grad_input = _empty(input, _trailing_layout(input, len(param_shape)).order, cached=False)
    return grad_input, input.new_empty(param_shape), input.new_empty(param_shape)


def _rms_norm_kernels(input: Tensor, normalized_shape: list[int], weight: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor]:
    trusted = _rms_norm_takes(input, tuple(normalized_shape), weight, eps)
    output, _, rstd = _trailing_norm(input, normalized_shape, weight, None, eps, centered=False, trusted=trusted)
    return output, rstd


_rms_norm_op = torch.library.custom_op("cynorm::rms_norm", _rms_norm_kernels, mutates_args=())


@_rms_norm_op.register_fake
def _(input, normalized_shape, weight, eps):
    layout = _trailing_layout(input, len(normalized_shape))
    return _empty(input, layout.order, cached=False), _trailing_norm_stats(input, layout, real=False)


def _rms_norm_backward_kernels(grad_output: Tensor, input: Tensor, rstd: Tensor,
                               weight: Tensor | None) -> tuple[Tensor, Tensor]:
    trusted = _trailing_norm_backward_takes(grad_output, input, None, rstd, weight)
    grad_input, grad_weight, _ = _trailing_norm_backward(grad_output, input, None, rstd, weight, trusted=trusted)
    return grad_input, grad_weight


_rms_norm_backward_op = torch.library.custom_op("cynorm::rms_norm_backward", _rms_norm_backward_kernels,
                                                mutates_args=())


@_rms_norm_backward_op.register_fake
def _(grad_output, input, rstd, weight):
    param_shape = input.shape[rstd.dim():]
    return _empty(input, _trailing_layout(input, len(param_shape)).order, cached=False), input.new_empty(param_shape)


def _double_backward_error(norm):
    return RuntimeError(
        f"cynorm {norm}: double backward (the gradient of a gradient) is not supported through the operator "
        f"torch.ops.cynorm.{norm}_backward (the path of direct calls of torch.ops.cynorm and of calls under torch "
        f"dispatch modes; eager calls of cynorm.adapters.torch support it); use torch.nn.functional.{norm} (or "
        f"the torch.nn module, see cynorm.adapters.torch.revert) for this model instead")


def _input_grads(needs_input_grad, param_positions, grad_input, *param_grads):
    """The backward's result: a gradient (or None) for each forward input."""
    grads = [grad_input] + [None] * (len(needs_input_grad) - 1)
    for position, grad in zip(param_positions, param_grads):
        if needs_input_grad[position]:
            grads[position] = grad
    return tuple(grads)


def _torchs_input_grads(ctx, grad_output, torchs_function):
    """The result of an eager Function's backward where the kernels' backward cannot serve: the gradients of the
    norm's inputs as ``torchs_function``, torch's own function of the same arguments, run again on the forward's
    inputs, gives them through torch's autograd.  That is for a backward that records its gradients, so that they
    can be differentiated again (create_graph=True: a gradient penalty, a Hessian-vector product), and for one
    whose incoming gradient a vmap batches (autograd.grad's is_grads_batched=True, as in
    torch.autograd.functional.jacobian and hessian with vectorize=True, which failed on it before; torch.func.vmap),
    which leaves the kernels no memory to read."""
    inputs = (ctx.saved_tensors[0], *ctx.arguments)   # (the input as saved: checked unmodified since the forward)
    wanted = [position for position, needed in enumerate(ctx.needs_input_grad) if needed]
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        output = torchs_function(*inputs)
    grads = torch.autograd.grad(output, [inputs[position] for position in wanted], grad_output, create_graph=record,
                                allow_unused=True)
    input_grads = [None] * len(inputs)
    for position, grad in zip(wanted, grads):
        input_grads[position] = grad
    return tuple(input_grads)


def _torchs_group_norm_weight(input, weight, bias):
    """The weight to give torch's group norm: ``weight``, or ones standing in for a missing one (the same values)
    under a bias that records a gradient, for which torch 2.13's backward raises "tensor does not have a device".
    The kernels give such a bias its gradient; so, with this, do the calls that go to torch's function (small
    inputs, bfloat16, other devices, double backward).  Subclasses and modes see torch's call as it is."""
    if (weight is None and isinstance(bias, Tensor) and bias.requires_grad and torch.is_grad_enabled()
            and not has_torch_function_variadic(input, bias)):
        return torch.ones_like(bias)
    return weight


def _torchs_group_norm_function(input, num_groups, weight, bias, eps):
    """``F.group_norm``, with the weight of _torchs_group_norm_weight."""
    return F.group_norm(input, num_groups, _torchs_group_norm_weight(input, weight, bias), bias, eps)


def _register_autograd(norm, forward_op, backward_op, param_positions, torchs_function):
    """Make ``backward_op`` the gradient of ``forward_op``, the ops computing ``norm``, and return the eager
    ``torch.autograd.Function`` computing the same on the kernels directly (see :func:`_run`).

    Both ops follow one contract: the forward returns ``(y, *stats)``; the backward takes
    ``(grad_y, input, *stats, weight)`` and returns ``(grad_input, *param_grads)``, one gradient for each
    forward input at ``param_positions`` (weight, then bias if the norm has one).  ``torchs_function``, torch's
    own function of the forward op's arguments, gives the eager Function's gradients where the kernels' backward
    cannot (see _torchs_input_grads).  The operators' autograd does not: torch.compile traces it into its graphs,
    which must keep the kernels' backward, and refuses double backward anyway, for torch's norms as for ours.
    """
    weight_position = param_positions[0]
    forward_kernels, backward_kernels = _KERNELS_OF[forward_op], _KERNELS_OF[backward_op]

    def save_for_backward(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(inputs[0], inputs[weight_position], *output[1:])

    def input_grads(ctx, grad_output, compute):
        input, weight, *stats = ctx.saved_tensors
        return _input_grads(ctx.needs_input_grad, param_positions, *compute(grad_output, input, *stats, weight))

    def backward(ctx, grad_output, *unused_stats_grads):
        return input_grads(ctx, grad_output, backward_op)

    def refuse_double_backward(ctx, *grads):
        raise _double_backward_error(norm)

    forward_op.register_autograd(backward, setup_context=save_for_backward)
    backward_op.register_autograd(refuse_double_backward, setup_context=lambda ctx, inputs, output: None)

    def eager_backward(ctx, grad_output, *unused_stats_grads):
        if grad_output is None:   # not materialized: the output had no gradient
            return (None,) * len(ctx.needs_input_grad)
        # (create_graph=True, or a batched gradient: see _torchs_input_grads)
        if torch.is_grad_enabled() or _is_legacy_batched(grad_output) or _is_functorch_wrapped(grad_output):
            return _torchs_input_grads(ctx, grad_output, torchs_function)
        return input_grads(ctx, grad_output, backward_kernels)

    def eager_forward(ctx, *inputs):
        output = forward_kernels(*inputs)
        save_for_backward(ctx, inputs, output)
        # the arguments after the input (saved above), for a backward that records its gradients; the input, an
        # activation, is let go with the saved tensors after the backward
        ctx.arguments = inputs[1:]
        # the statistics get no gradient: no zero tensors for them, and None for an unused output
        ctx.set_materialize_grads(False)
        return output

    # The operators' autograd costs about 0.6 ms a training step more than this Function (measured on GroupNorm
    # (1,512,64,64): 4.0-4.2 ms against 4.7-5.0 ms).  Its forward takes ctx, with no separate setup_context:
    # Function.apply binds the arguments to forward's signature with inspect on every call when setup_context
    # is defined; functorch transforms, which would need it, get torch's own functions (see _kernels_apply).
    # Its grad_fn is cynorm_<norm>Backward.
    return type(f"cynorm_{norm}", (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})


def _trusted_group_norm(input, num_groups, weight, bias, eps):
    return _channel_norm(input, weight, bias, eps, num_groups, trusted=True)


def _trusted_instance_norm(input, weight, bias, eps):
    return _channel_norm(input, weight, bias, eps, input.shape[1], trusted=True)


def _trusted_layer_norm(input, normalized_shape, weight, bias, eps):
    return _trailing_norm(input, normalized_shape, weight, bias, eps, centered=True, trusted=True)


def _trusted_rms_norm(input, normalized_shape, weight, eps):
    output, _, rstd = _trailing_norm(input, normalized_shape, weight, None, eps, centered=False, trusted=True)
    return output, rstd


def _trusted_rms_norm_backward(grad_output, input, rstd, weight):
    grad_input, grad_weight, _ = _trailing_norm_backward(grad_output, input, None, rstd, weight, trusted=True)
    return grad_input, grad_weight


# What each operator computes, for eager calls whose arguments this module has checked (see _run).
_KERNELS_OF = {_group_norm_op: _trusted_group_norm, _instance_norm_op: _trusted_instance_norm,
               _layer_norm_op: _trusted_layer_norm, _rms_norm_op: _trusted_rms_norm,
               _group_norm_backward_op: functools.partial(_channel_norm_backward, trusted=True),
               _instance_norm_backward_op: functools.partial(_channel_norm_backward, trusted=True),
               _layer_norm_backward_op: functools.partial(_trailing_norm_backward, trusted=True),
               _rms_norm_backward_op: _trusted_rms_norm_backward}
# The autograd Function of each forward operator, for eager calls that record gradients (see _run).
_EAGER_FUNCTION_OF = {
    _group_norm_op: _register_autograd("group_norm", _group_norm_op, _group_norm_backward_op, param_positions=(2, 3),
                                       torchs_function=_torchs_group_norm_function),
    _instance_norm_op: _register_autograd(
        "instance_norm", _instance_norm_op, _instance_norm_backward_op, param_positions=(1, 2),
        torchs_function=lambda input, weight, bias, eps: F.instance_norm(input, weight=weight, bias=bias, eps=eps)),
    _layer_norm_op: _register_autograd("layer_norm", _layer_norm_op, _layer_norm_backward_op, param_positions=(2, 3),
                                       torchs_function=F.layer_norm),
    _rms_norm_op: _register_autograd("rms_norm", _rms_norm_op, _rms_norm_backward_op, param_positions=(2,),
                                     torchs_function=F.rms_norm),
}


def _native_apply(function):
    """``function.apply`` without the Python layer of ``torch.autograd.Function.apply``, which binds the
    arguments for ``setup_context`` (ours define none), routes functorch transforms and unwraps the tensors a
    transform has left behind (_run gets neither: see _kernels_apply).  That layer cost 0.05 ms of a 0.9 ms
    GroupNorm (1,512,64,64) channels-last training step, run after the kernels had swept the caches."""
    native = getattr(torch._C, "_FunctionBase", None)
    native_apply = None if native is None else native.__dict__.get("apply")
    return function.apply if native_apply is None else native_apply.__get__(None, function)


_EAGER_APPLY_OF = {op: _native_apply(function) for op, function in _EAGER_FUNCTION_OF.items()}


# ---------------------------------------------------------------------------------------------------------
# Functional API (torch.nn.functional's signatures)
# ---------------------------------------------------------------------------------------------------------

def _kernels_apply(input, *tensors):
    """Whether the kernels can compute this call; if not, torch's own function does (same results or errors).

    They need a strided CPU float32/float64 input (or float16, where _float16_to_torch lets it), companion
    tensors (parameters, running stats) of the same device and dtype, and no tracing: ``torch.jit.trace``
    records torch's ops instead of ours, tensor subclasses with ``__torch_function__`` and torch function modes
    get torch's dispatch (``torch.export`` traces under such modes, and so records torch's ops too, as it does
    when Dynamo traces for it, with ``strict=True``), and torch.func transforms (grad, vmap, jvp, ...) get
    torch's functions, which they know how to batch and differentiate, as do the tensors a transform has left
    behind (a value stored from inside ``torch.func.grad``: a wrapper whose memory the kernels cannot always
    reach).  So do calls inside ``torch.autograd.forward_ad.dual_level()``: our autograd Functions have no
    forward-mode formula, and the kernels gave dual tensors' outputs no tangent.
    """
    # (written with the cheapest torch queries: this runs on every call, half as long as with device objects)
    if has_torch_function_variadic(input, *tensors):
        return False
    return _kernels_take(input, tensors, eager=not torch.compiler.is_compiling())


def _kernels_take(input, tensors, eager):
    """_kernels_apply for a plain call (no subclass or mode) made ``eager``ly or in a graph Dynamo compiles."""
    if _tracing_state() is not None or _functorch_transforms_active() or _forward_ad._current_level >= 0:
        return False
    dtype = input.dtype
    if not input.is_cpu or dtype not in _KERNEL_DTYPES or input.layout != torch.strided:
        return False
    # (Dynamo cannot trace the query for left-behind tensors, and a compiled graph holds none)
    if eager and _is_functorch_wrapped(input) or not eager and _is_exporting():
        return False
    for t in tensors:   # (a loop: a generator cost a few µs a call)
        if t is not None and not (isinstance(t, Tensor) and t.is_cpu and t.dtype == dtype and t.layout == torch.strided
                                  and not (eager and _is_functorch_wrapped(t))):
            return False
    return True


# Inputs on which torch's own function is faster than the kernels: the Python around them costs about 8 µs a
# call and 16 µs a training step more than torch's (a (1,768) layer norm: 10 µs against 2.3 µs), which their
# speed per value wins back only on larger inputs, and sooner on short rows, on which torch spends more per row.
# For each norm, (elements, rows) below both of which torch's function runs: without a gradient to record, then
# with one (rows: None, no limit).  Crossovers measured on the development machine (a Zen 5, the x86-64-v4
# build; 2 threads, float32, interleaved, the adapter against torch.nn.functional, forward then training step):
# layer norm over rows of 768
# values at 98-196K and 196-393K elements, of 256 values at 33-131K and over 131K, of 16 at 33-131K and 131K, of
# 10 at 8-32K and 32-216K, of 4 at 2-8K and under 2K; RMS norm over rows of 4096 at 4-33K and none (faster at
# every size in steps); channels-first group norm (N,64,32,32) at 65-262K and 262K, (8,256,7,7) faster in
# neither at 100K; channels-last group norm faster from 32K ((2,64,16,16): 1.9x and 1.2x), slower at 25K on
# 7x7 maps.  Instance norm has none: torch's runs as a batch norm over N*C channels, slower at every size.
# The limits are a compromise: training steps on 2000-8000 rows of 4 values would run 1.8-2.7x faster on the
# kernels.  (Steps on 4096 rows of 16 values, which the rows limit gives the kernels, ran 0.8x until their
# backward got a kernel of its own: 1.09x, and 0.97x on 2048 rows, which run torch's.)  Layer norm steps on
# 2**18 values, measured again over rows of 256-4096 values, ran 0.85-0.95x on the kernels ((64,4096) 0.88-0.95x,
# (256,1024) 0.85-0.95x, (1024,256) 0.87x) and 0.94-1.41x on 3 * 2**17 ((768,512) 1.41x, (96,4096) 0.94-0.96x):
# steps below 3 * 2**17 values run torch's.  Channels-first group norm depends on the size of its maps (a
# channel's values in a sample): torch's is slow on maps of a few values, and the kernels' backward is at its
# weakest on maps of 8-64.  Maps of 1 ((N,C) input) and 4: the kernels' forwards 1.47x from 16K values, steps
# 0.86-0.89x at 8-16K and 1.6-2.3x from 65K ((256,256), (1024,128), (64,256,4)).  Maps of 8-64 values (5-7
# unmeasured, counted with them): forwards 1.9x at 2**17 on maps of 8; steps 0.48-0.84x on maps of 8 up to 131K,
# 0.84x and 0.90x on maps of 9 at 295K and 590K, 0.76x and 0.99x on maps of 16 at 131K and 2**20, 0.85-0.92x on
# (16,512,7,7) (401K), 0.90-0.94x on (32,256,8,8) (2**19), 0.98-1.04x on (32,512,7,7) (803K), 0.97-1.08x from
# 2**20 ((64,256,8,8), (16,2048,7,7)).
_TORCH_FASTER_BELOW_AVX512 = {
    "layer_norm": ((2 ** 17, 2 ** 11), (3 * 2 ** 17, 2 ** 12)),
    "rms_norm": ((2 ** 14, 2 ** 11), (0, 0)),
    # channels-first (contiguous) group norm: on maps of one value ((N,C) input among them), of up to _TINY_MAP
    # values, of up to _SMALL_MAP, and larger
    "group_norm_without_maps": ((2 ** 14, None), (2 ** 15, None)),
    "group_norm_on_tiny_maps": ((2 ** 14, None), (2 ** 15, None)),
    "group_norm_on_small_maps": ((2 ** 17, None), (2 ** 20, None)),
    "group_norm": ((2 ** 17, None), (2 ** 18, None)),
    # channels-last group norm (see _channels_last_group_norm_category): the same limits on maps of any size here
    **{category: ((2 ** 15, None), (2 ** 15, None)) for category in (
        "channels_last_group_norm_on_small_maps",                  # maps of up to _SMALL_MAP values, groups of
        "channels_last_group_norm_on_small_maps_in_wide_groups",   # fewer than _WIDE_GROUP channels, or more
        "channels_last_group_norm_on_mid_maps",                    # maps of up to _MID_CHANNELS_LAST_MAP
        "channels_last_group_norm_on_mid_maps_in_wide_groups",
        "channels_last_group_norm",                                # up to _LARGE_CHANNELS_LAST_MAP
        "channels_last_group_norm_on_large_maps")},                # larger
}
# The crossovers move with the instruction set, on torch's side as on ours.  Measured again with the x86-64-v3
# (AVX2) build on a 2-core Zen 3, against torch's AVX2 kernels, the adapter's layer norm ran 0.68-0.93x torch's on
# 2**18-2**19 values in rows of 64-1024 (forwards 1.02-1.11x from 2**20 on rows of 512-1024; 1.04-2.7x on rows
# of 4-32 from 4096 rows), training steps on rows of 16-1024 0.51-0.84x up to 2**18, and on rows of 4-12 0.61-1.03x
# up to 2048 rows, 0.58-1.58x at 4096 (torch's own time varying 2.7x between processes), 0.97-2.9x at 8192,
# 1.7-4.0x from 16384 (the tutorial's (32,26,26,10) 1.72-1.87x).  With the adapter's plans (stop 28), layer norm
# forwards on rows of 512-4096 values ran 0.82-0.97x torch's at 2**17-491K values, 1.02-1.08x at 2**19 and
# 1.10-1.13x at 786K, steps 0.94-1.03x at 2**19 (rows of 4096: torch's own 2.0-2.2 ms, erratic) and 1.01x at 786K.
# At stop 41, forwards of 2**18 values in rows of 256-8192 ran 0.96-1.04x on the kernels, 0.93-0.97x routed to
# torch's function (whose route costs a few µs), so that layer norm forwards keep the kernels from 2**18;
# channels-first group norm forwards on maps of 256-1024 values 0.76-0.92x at 2**18, 1.05-1.09x at 2**19 and
# 1.15-1.18x at 655-786K, steps 0.88-1.12x at 2**19.  Before the plans: channels-first
# group norm on maps of 100-1024 values 0.79-0.99x up to 2**19 values, 1.06-1.28x from 2**20.  Builds without
# AVX-512 send those calls to torch.  Channels-last group norm's calls won there from the limits on, which stay.
# RMS norm runs the kernels at every size: torch 2.13 computes it on CPU from eight operators (pow, sum, div,
# add, rsqrt, two multiplications, casts), 18-21 µs on a (1,4096) row warm, and the adapter on the kernels ran
# 1.10-1.61x torch's speed on inference calls of 16-16384 values in rows of 4-8192, and converted RMSNorm modules
# 1.16-1.37x, where the limits' route to torch had run 0.80-0.86x (after a 16 MB copy, 0.78-1.09x against
# 0.68-0.97x).
# Channels-first group norm steps on maps of up to 4 values run torch's below 2**16 values: at 2**15 the kernels'
# ran 0.74-0.99x torch's ((128,256) 0.78x, (128,64,4) 0.74x, (16,512,2,2) 0.96x), at 2**16 1.24-1.73x ((512,128)
# 1.62x, (256,64,4) 1.23x, (32,512,2,2) 1.57x).  So do forwards on maps of 2-4 values: 0.58-0.84x at 2**14
# ((8,512,2,2) 0.58x, (64,64,4) 0.78x), 0.80-0.97x at 2**15 ((16,512,2,2) 0.86x; (128,128,2) 1.12x), 1.07-1.38x at
# 2**16 ((32,512,2,2) 1.07x, (256,64,4) 1.38x).  Forwards on maps of one value keep the kernels from 2**14: 1.31-1.34x
# there ((64,256), (128,128)).
# Group norm steps on maps of 5-64 values run torch's at every size: measured with keep_freed_memory
# (torch's own steps steadier than without), steps on 7x7 and 8x8 maps ran 0.59-0.77x torch's from 401K to 1.6M
# values, and 0.74-0.94x from 401K to 3.2M once these builds' backward took four channels at a time (1.2-2.4x
# faster; (32,1024,8,8) 1.06x), on maps of 8-32 values 0.57-0.82x at 2**17-2**19.  Forwards keep their limit:
# 1.38-1.65x on maps of 8 and 16 at 2**17-2**18 (7x7 and 8x8: 0.89-0.97x at 200-401K, 1.04-1.33x from 2**19).
# Maps of 196-784 values: steps 0.93-1.04x from 1.6M, forwards 1.06-1.22x.  Channels-first group norm steps on maps
# of more than 64 values run torch's below 2**21 values (stop 42, with keep_freed_memory, as the bench runs): at
# 2**20 the kernels' ran 0.71-0.96x torch's ((64,64,16,16) 0.71x, (8,512,16,16) 0.81x, (16,64,32,32) 0.93x,
# (1,256,64,64) 0.96x), at 1.5M 0.91x ((24,64,32,32)), at 2**21 0.96-1.09x (16x16 maps 0.96-0.99x, (1,512,64,64)
# 1.03x), from 3M 1.04-1.49x; the NumPy API's steps ran 1.06-1.68x at 2**20, the adapter's autograd making the
# difference.  Channels-last group norm forwards
# on maps of 1024 values or more, where torch parallelizes over the maps' positions (on smaller maps, over samples
# and groups: there the kernels ran 0.71-6.9x torch's with 4 samples, faster in 12 of 14 shapes), ran 0.73-0.96x
# torch's at 2**16-2**19 values ((1,C,H,W) with 64-512 channels), 0.89-1.21x at 2**20 (1 and 4 samples, 64-512
# channels), 0.86-1.24x at 2**21 and 1.19-1.39x from 2.5M (stop 33, the Zen 3): in cache, the kernels ran as
# fast as torch's, and the adapter's Python around them made the difference.  Steps on those maps ran 0.97-4.7x
# torch's from 2**16 ((1,C,H,W), 64-512 channels), and keep the kernels from 2**15.  On smaller maps torch's
# kernel takes a sample's group at a time, its channels in vectors, and runs fastest on groups of a multiple of 8
# channels, many of them (stop 34, the Zen 3, through the adapter, 1-32 samples, 256-2560 channels in 32 groups):
# - maps of up to 64 values (4x4 to 8x8): training steps 0.46-0.93x torch's at every size measured, up to 2.6M
#   values.  Forwards in groups of 8-20 channels 0.51-0.95x below 2**17 (0.86-0.92x at 131-262K on 4x4 maps),
#   1.02-1.71x from there; in groups of 32-80, 0.49-0.94x up to 2**21 (1.06x at 1.3M on 8x8, 0.75x on 4x4), 1.10x
#   and 1.42x from 2.6M on 8x8 maps.
# - maps of 65-256 values (12x12, 16x16): forwards in groups of 8-20 channels 0.76-1.09x below 2**17, 1.02-1.80x
#   from there; in groups of 32-80, 0.66-1.04x below 2**19 and 0.85-1.18x from there (1.04-1.18x from 2**20 but
#   for 0.85x on (4,2560,12,12) at 1.5M).  Steps in either 0.71-1.00x below 2**19 (1.26x on (1,1024,16,16)),
#   0.92-2.7x from there.
# - maps of 257-1023 values (24x24) ran 1.12-2.3x in forwards (0.95x on (2,2560,24,24)), 0.98-2.7x in steps: the
#   limits of larger maps.
_TORCH_FASTER_BELOW_WITHOUT_AVX512 = dict(_TORCH_FASTER_BELOW_AVX512,
                                          layer_norm=((2 ** 18, 2 ** 12), (2 ** 20, 2 ** 13)),
                                          rms_norm=((0, 0), (0, 0)),
                                          group_norm=((2 ** 19, None), (2 ** 21, None)),
                                          group_norm_without_maps=((2 ** 14, None), (2 ** 16, None)),
                                          group_norm_on_tiny_maps=((2 ** 16, None), (2 ** 16, None)),
                                          group_norm_on_small_maps=((2 ** 17, None), (math.inf, None)),
                                          channels_last_group_norm_on_small_maps=((2 ** 17, None), (math.inf, None)),
                                          channels_last_group_norm_on_small_maps_in_wide_groups=(
                                              (2 ** 21, None), (math.inf, None)),
                                          channels_last_group_norm_on_mid_maps=((2 ** 17, None), (2 ** 19, None)),
                                          channels_last_group_norm_on_mid_maps_in_wide_groups=(
                                              (2 ** 19, None), (2 ** 19, None)),
                                          channels_last_group_norm_on_large_maps=((2 ** 21, None), (2 ** 15, None)))
# Rows of these lengths (the shortest, the longest) run torch's function at every size, without a gradient to
# record, then with one; forwards of the rows that the four-row kernel takes excepted (see _four_row_forward).
# Builds without AVX-512 take the other rows one at a time: each row's sums end in a tree of lanes and a few
# divisions of its own, which rows of 16-256 values do not pay back.  On the Zen 3, at 2**20-2**22 values, the
# kernels' layer norm steps on rows of 16-128 values ran 0.64-0.91x torch's (the NumPy API's backward alone
# 0.48-0.80x; rows of 256 0.87-1.05x, of 512 0.95-2.8x), forwards on rows of 64-256 values 0.62-1.02x (rows of 4-32
# 1.1-2.9x, of 512 0.96-1.39x).  With the AVX2 builds' four-row kernels (stop 29), forwards through the adapter on
# the rows of 80-256 values that they take ran 1.03-1.50x torch's from 2**19 values (2048 rows of 128 1.12x, 1024
# rows of 256 0.92x at 2**18; rows of 64 0.92-1.07x and of 100 0.92-1.02x, which go a row at a time), and steps
# on rows of 32-256 values, their backward 1.2-2.9x faster, still 0.73-1.12x: the adapter's autograd costs more
# than the kernels save there.
_TORCH_FASTER_ON_ROWS_WITHOUT_AVX512 = {"layer_norm": ((64, 256), (16, 256))}
_TORCH_FASTER_BELOW, _TORCH_FASTER_ON_ROWS = ((_TORCH_FASTER_BELOW_AVX512, {}) if _kernels.BUILD == "x86_64_v4"
                                              else (_TORCH_FASTER_BELOW_WITHOUT_AVX512,
                                                    _TORCH_FASTER_ON_ROWS_WITHOUT_AVX512))
_TINY_MAP, _SMALL_MAP = 4, 64


def _torchs_at_any_shape_below(norm, recording=False):
    """The number of values below which every contiguous input of ``norm`` that records no gradient (or one that
    does, if ``recording``) runs torch's function by _TORCH_FASTER_BELOW, whatever its shape: the least of its
    categories' limits on elements and rows (an input of fewer values than a row limit has fewer rows than it).
    Channels-last group norm counts too, any non-contiguous group norm being one of its categories or torch's."""
    categories = [category for category in _TORCH_FASTER_BELOW
                  if category == norm or norm == "group_norm" and "group_norm" in category]
    return min(limit for category in categories for limit in _TORCH_FASTER_BELOW[category][recording]
               if limit is not None)


# {norm: (the limit of calls that record no gradient, of those that do)}
_TORCHS_AT_ANY_SHAPE_BELOW = {norm: (_torchs_at_any_shape_below(norm), _torchs_at_any_shape_below(norm, True))
                              for norm in ("group_norm", "layer_norm", "rms_norm")}
# torch's channels-last group norm parallelizes over the positions of maps of this many values or more (its
# feature_map_threshold), else over samples and groups
_LARGE_CHANNELS_LAST_MAP = 1024
_MID_CHANNELS_LAST_MAP = 256
_WIDE_GROUP = 32   # channels
_small_inputs_to_torch = True


def _four_row_forward(row_length):
    """Whether the build's kernels take a float forward on rows of ``row_length`` values (one norm over them) four
    rows at a time, up to their limits: rows of a multiple of 16 values longer than 64, in AVX2 and AVX-512 builds."""
    return 64 < row_length <= _kernels.FORWARD_QUAD_ROW and row_length % 16 == 0


def use_torch_for_small_inputs(enabled):
    """Whether the functional API and the modules call torch's own function on inputs too small for the kernels
    to win (default True); returns the previous setting.

    Group, layer and RMS norm pay the adapter's fixed cost in Python on every call, where torch's calls cost
    2-5 µs: below the sizes in ``_TORCH_FASTER_BELOW`` (elements and rows, by layout and by whether the call
    records a gradient, measured on 2-core x86-64 machines for builds with and without AVX-512) torch's function
    is faster, so those calls run it, with torch's results.  ``False`` sends every call the kernels take to the kernels.
    """
    global _small_inputs_to_torch
    if not isinstance(enabled, bool):
        raise TypeError(f"use_torch_for_small_inputs() expects True or False, got {enabled!r}")
    previous, _small_inputs_to_torch = _small_inputs_to_torch, enabled
    return previous


def _torch_takes(norm, input, weight, bias=None, normalized_shape=(), num_groups=None):
    """Whether torch's own function runs ``norm`` of ``input`` (over ``normalized_shape``, layer and RMS norm; in
    ``num_groups``, group norm): under torch.export, for tensor subclasses and modes with ``__torch_function__``, or
    where it is the faster.

    torch.export makes a program for inputs of any size, of torch's operators (see _kernels_apply), so its calls
    go to torch's function before a size is compared, which would have become a guard on the program's dynamic
    sizes (a dynamic batch was refused: "Not all values of b ... satisfy the generated guard ... <= 127").
    Elsewhere, inputs small enough, or of rows of a length, for torch's function to be the faster (see
    _TORCH_FASTER_BELOW, _TORCH_FASTER_ON_ROWS; instance norm has none).  Asked before the other checks, being
    cheaper: torch's function has torch's semantics for any tensor (and raises torch's errors).  A subclass or mode
    is handed torch's call before the size queries below, which it would see too: it sees what torch.nn's
    modules give it.  Inputs of other layouts than those measured (a layer norm's permuted view, which torch would
    copy) go to the kernels."""
    if _is_exporting() or has_torch_function_variadic(input, weight, bias):
        return True
    if not isinstance(input, Tensor):
        return False
    # (nested tensors have no shape, sparse ones no strides, for the questions below; torch's function takes
    # both, LayerNorm of nested tensors among them)
    if input.is_nested or input.layout != torch.strided or _float16_to_torch(norm, input):
        return True
    if not _small_inputs_to_torch or norm == "instance_norm":
        return False
    contiguous = input.is_contiguous()
    if norm == "group_norm" and not contiguous:
        norm = _channels_last_group_norm_category(input, num_groups)
        if norm is None:
            return True
    elif not contiguous:
        return False
    elif norm == "group_norm":
        map_size = math.prod(input.shape[2:])
        if map_size <= _SMALL_MAP:
            norm = ("group_norm_without_maps" if map_size == 1 else "group_norm_on_tiny_maps" if map_size <= _TINY_MAP
                    else "group_norm_on_small_maps")
    size = input.numel()
    limits = _TORCH_FASTER_BELOW[norm]
    if norm not in _TORCH_FASTER_ON_ROWS and size >= limits[0][0] and size >= limits[1][0]:
        return False
    return _faster_on_torch(norm, size, normalized_shape, _records_grad(input, weight, bias))


def _records_grad(input, weight, bias):
    """Whether a call of a norm on ``input`` with ``weight`` and ``bias`` (each may be None) records a gradient."""
    return torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def _faster_on_torch(category, size, normalized_shape, records_grad):
    """Whether torch's function is the faster on a contiguous input of ``size`` values of ``category`` (a norm, or
    a category of group norm's in _TORCH_FASTER_BELOW) over ``normalized_shape`` (layer and RMS norm), in a call
    that records a gradient or not, by _TORCH_FASTER_BELOW and _TORCH_FASTER_ON_ROWS."""
    elements, rows = _TORCH_FASTER_BELOW[category][records_grad]
    row_lengths = _TORCH_FASTER_ON_ROWS.get(category)
    if row_lengths is None and size >= elements:   # (before the shape, which the kernels' checks refuse)
        return False
    try:
        row_length = operator.index(math.prod(normalized_shape))
    except TypeError:   # a shape torch refuses, with its own error
        return True
    if row_lengths is not None:
        shortest, longest = row_lengths[records_grad]
        if shortest <= row_length <= longest and (records_grad or not _four_row_forward(row_length)):
            return True
    return size < elements and (rows is None or size < rows * row_length)


def _float16_to_torch(norm, input):
    """Whether a float16 ``input`` goes to torch's function, which is the faster there: the kernels take float16
    in float32 a chunk at a time, with a conversion pass each way.  Measured through the adapter against torch's
    float16 functions (Zen 3, 2 threads), forward and training step:

    - channels-first GroupNorm (8,256,56,56) 1.45x and 1.30x, (1,512,64,64) 1.39x and 1.15x, (1,256,64,64)
      1.28x and 0.99x, (1,512,128,128) 3.2x and 2.8x: the kernels;
    - channels-last InstanceNorm2d (8,64,128,128) 3.2x and 2.5x, (2,128,128,128) 1.6x and 1.3x: the kernels,
      up to samples of _FLOAT16_CHANNELS_LAST_SAMPLE values ((1,64,256,256) 0.78x and 0.53x);
    - channels-last GroupNorm: torch's forwards are faster (0.32-0.37x), and its training steps now faster
      ((1,512,64,64) 0.55x, (1,1280,16,16) 0.69x), now slower ((8,256,56,56) 2.8x, (16,64,32,32) 4.9x): torch;
    - channels-first InstanceNorm2d (8,64,128,128) 0.85x and 0.62x, LayerNorm (4096,768) 0.65x and 0.77x (and
      RMS norm, on the same rows): torch.
    """
    if getattr(input, "dtype", None) is not torch.float16:
        return False
    if norm == "group_norm":
        return not input.is_contiguous()
    if norm == "instance_norm":
        return input.is_contiguous() or math.prod(input.shape[1:]) > _FLOAT16_CHANNELS_LAST_SAMPLE
    return True


_FLOAT16_CHANNELS_LAST_SAMPLE = 2 ** 21


def _channels_last_group_norm_category(input, num_groups):
    """The key in _TORCH_FASTER_BELOW of a group norm of ``input`` (not contiguous) in ``num_groups``, by the size of
    its maps and of its groups; None for a group count torch refuses."""
    map_size = math.prod(input.shape[2:])
    if map_size >= _LARGE_CHANNELS_LAST_MAP:
        return "channels_last_group_norm_on_large_maps"
    if map_size > _MID_CHANNELS_LAST_MAP:
        return "channels_last_group_norm"
    if type(num_groups) is not int or num_groups <= 0 or input.dim() < 2:
        return None
    maps = "small" if map_size <= _SMALL_MAP else "mid"
    groups = "_in_wide_groups" if input.shape[1] // num_groups >= _WIDE_GROUP else ""
    return f"channels_last_group_norm_on_{maps}_maps{groups}"


def _run(op, *args):
    """``op(*args)``, or the kernels it wraps called directly when nothing needs to see the operator.

    The operator is what torch.compile, torch.export and dispatch modes understand;
    going through it cost 20-25 µs a call in eager mode, and about 100 µs on inputs of tens of MB, and its
    autograd about 0.6 ms more a training step.  Other eager calls skip it: those that record a gradient run
    the eager autograd Function, the others the kernels alone.
    """
    if torch.compiler.is_compiling() or _dispatch_mode_count() > 0:
        return op(*args)
    if torch.is_grad_enabled():
        for arg in args:   # (a loop: any() over a generator cost 1.4 µs of a 10 µs call)
            if isinstance(arg, Tensor) and arg.requires_grad:
                return _EAGER_APPLY_OF[op](*args)
    return _KERNELS_OF[op](*args)


# Eager calls.  In a model, each norm runs after other layers have swept the caches, and every torch query of the
# full path (_torch_takes, the takes checks, _run) then costs 3-7 µs instead of 0.1-0.2 (measured after a 16 MB
# torch op: input.shape 7 µs, input.dtype 5 µs, the group norm checks 72 µs, a statistics tensor 40 µs; Zen 3).
# Through the full path, a channels-last GroupNorm (1,512,64,64) forward took 100-130 µs longer than the kernel
# called bare, and ran 0.85-0.87x torch's there.  These calls take the verdict of the full path's checks on the
# input's shape, strides and dtype, and on whether the call records a gradient, kept from the first call of that
# signature, and check on every call only what the signature does not tell: the global states that hand calls to
# torch, and the parameters' device, dtype and memory.  Calls that record no gradient then run the kernels alone,
# their statistics, which nothing keeps, in the thread's scratch memory; those that do run the kernels' autograd
# Function (_EAGER), which saves its statistics.  Against the full path's checks, the kept verdict took 5-124 µs
# off training steps of 0.9-5.6 ms in most readings (GroupNorm (1,512,64,64) either layout, (8,256,56,56)
# channels-last, (2,320,64,64); LayerNorm (4096,768), (1024,1024); A/B in one process, Zen 3), within the noise in
# others.

_EAGER_VERDICTS_HELD = 256
_eager_verdicts = {}
_TORCHS = "torch's function"
_EAGER = "the kernels' autograd Function"
_PLAIN_PARAMETERS = (Tensor, nn.Parameter, type(None))
_inference_scratch = threading.local()


def _eager_verdict(norm, input, weight, bias, arg):
    """Where an eager call of ``norm`` on ``input`` (in ``arg`` groups, or over the normalized shape ``arg``, a
    tuple) goes, as the full path would take it: _TORCHS for torch's function (which the full path calls for small
    inputs, and for what the kernels cannot take, whatever else holds), or, if nothing else needs to see the call
    (tracing, transforms, modes: see _kernels_apply), _EAGER for the kernels' autograd Function (a call that
    records a gradient), or (the :class:`_Plan` of the trusted kernels, whether float64) for the kernels alone (one
    that does not).  None for any other call, which takes the full path.  A verdict is made only on arguments that
    pass every check, so that none of a parameter's faults is kept for its signature."""
    # (compiled graphs get the full path's operators; subclasses and modes see nothing before torch's call)
    if torch.compiler.is_compiling() or type(input) is not Tensor or has_torch_function_variadic(input, weight, bias):
        return None
    if type(weight) not in _PLAIN_PARAMETERS or type(bias) not in _PLAIN_PARAMETERS:
        return None
    records = _records_grad(input, weight, bias)
    # A group norm of an input that records no gradient, under parameters that do, takes the full path, which keeps
    # it from torch's function where torch's backward would crash (see _torch_group_norm_backward_crashes).
    if records and norm == "group_norm" and not input.requires_grad:
        return None
    # Calls that the full path hands to torch's function whatever else holds (bfloat16, and float16 where torch's
    # is the faster) go there at once, without its checks or a look-up of their signature.  After a 16 MB torch
    # op had swept the caches, such calls took 6-9 µs longer than torch's own, against 39-43 µs for bfloat16
    # through the full path and 14-16 µs for float16 through the kept verdict (Zen 3).
    dtype = input.dtype
    if dtype not in _KERNEL_DTYPES or (dtype is torch.float16 and _float16_to_torch(norm, input)):
        return _TORCHS
    try:
        # So do inputs that the limits give torch's function by their size (see _torchs_by_size)
        if _torchs_by_size(norm, input, arg, records):
            return _TORCHS
        key = (norm, arg, input.shape, input.stride(), dtype, None if weight is None else weight.shape,
               None if bias is None else bias.shape, records, _small_inputs_to_torch)
        verdict = _eager_verdicts.get(key)
    except TypeError:   # (an argument torch refuses, such as a list of groups)
        return None
    except RuntimeError:   # (a nested tensor, without a shape, or a sparse one, without strides: see _torch_takes)
        return None
    if verdict is _TORCHS:
        return verdict
    # (what the kernels take, as the full path asks it past the questions above: it hands what they cannot take to
    # torch's function; and what makes the full path call the operator)
    if not _kernels_take(input, (weight, bias), eager=True):
        return _TORCHS
    if verdict is False or _dispatch_mode_count() > 0 or _is_exporting():
        return None
    for param in (weight, bias):
        if param is not None and not param.is_contiguous():
            return None
    if verdict is None:
        if len(_eager_verdicts) >= _EAGER_VERDICTS_HELD:
            _eager_verdicts.clear()
        verdict = _eager_verdicts[key] = _full_path_route(norm, input, weight, bias, arg, records) or False
    return verdict or None


def _torchs_by_size(norm, input, arg, records_grad):
    """Whether the full path hands a call of ``norm`` (see _eager_verdict) to torch's function by its input's
    size, asked without its signature: an input smaller than the least limit of its kind of call at any shape
    (_TORCHS_AT_ANY_SHAPE_BELOW; contiguous, or any group norm's), or a contiguous layer or RMS norm that the limits
    give torch's function at its size and row length (for layer and RMS norm, the first is a cheaper case of the
    second, so that a tiny call pays for no more).  The first took the verdict on a GroupNorm (1,32,8,8) from 3.8
    µs to 0.9 (warm, Zen 3); in a call that records a gradient, such a GroupNorm took 17.4 µs through the full
    path's checks against torch's 12.4.  With the signature's look-up, converted LayerNorms on (16,768), (128,768) and
    (1000,10) ran 0.71-0.89x torch's modules, 0.79-0.91x without it (0.75-0.79x and 0.79-0.83x after a 16 MB copy;
    A/B in one process, 200 rounds, Zen 3).  An empty input takes the full path, as its rows may too."""
    size = input.numel()
    if not _small_inputs_to_torch or size == 0:
        return False
    if size < _TORCHS_AT_ANY_SHAPE_BELOW[norm][records_grad] and (norm == "group_norm" or input.is_contiguous()):
        return True
    return norm != "group_norm" and input.is_contiguous() and _faster_on_torch(norm, size, arg, records_grad)


def _full_path_route(norm, input, weight, bias, arg, records):
    """Where the full path of the functional API takes a call of ``norm`` (see _eager_verdict), for any eps it
    takes: _TORCHS for torch's function; for a call that ``records`` a gradient, _EAGER; for one that does not,
    (plan, whether float64) for the trusted kernels, or None for the NumPy API (float16)."""
    if norm == "group_norm":
        routed = _torch_takes(norm, input, weight, bias, num_groups=arg)
        takes = _group_norm_takes(input, arg, weight, bias, 0.0)
    else:
        routed = _torch_takes(norm, input, weight, bias, normalized_shape=arg)
        takes = (_layer_norm_takes(input, arg, weight, bias, 0.0) if norm == "layer_norm"
                 else _rms_norm_takes(input, arg, weight, None))
    if routed or not takes:
        return _TORCHS
    if records:
        return _EAGER
    if input.dtype not in (torch.float32, torch.float64):
        return None
    plan = _plan(input, num_groups=arg) if norm == "group_norm" else _plan(input, num_axes=len(arg))
    return plan, input.dtype == torch.float64


@_following_torch_threads
def _inference_forward(input, verdict, weight, bias, eps, centered):
    """The output of _trusted_forward on the verdict of _eager_verdict (the parameters checked contiguous), its
    statistics written to the thread's scratch memory."""
    plan, float64 = verdict
    count = plan.stats_count
    scratch = getattr(_inference_scratch, "stats", None)   # (the array, its address)
    if scratch is None or scratch[0].size < 2 * count:
        values = np.empty(max(2 * count, 1024))
        scratch = _inference_scratch.stats = (values, values.ctypes.data)
    if weight is None or bias is None:
        num_params = math.prod(plan.param_shape)
        dtype = torch.float64 if float64 else torch.float32
        weight = _constant(num_params, dtype, 1.0) if weight is None else weight
        bias = _constant(num_params, dtype, 0.0) if bias is None else bias
    return _forward_kernel(_input_in_order(input, plan), plan, weight, bias, eps, centered, scratch[1],
                           scratch[1] + 8 * count, float64)


def _is_shape(tensor, shape):
    """Whether ``tensor`` is None or of ``shape`` (a tuple or torch.Size)."""
    return tensor is None or tensor.shape == shape


def _normalized_shape_tuple(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _ends_with(input, shape):
    """Whether ``input`` is non-empty and its trailing dimensions are ``shape`` (a non-empty tuple)."""
    trailing = tuple(input.shape[input.dim() - len(shape):])
    return 0 < len(shape) <= input.dim() and trailing == shape and input.numel() > 0


# Whether the kernels' trusted path computes a norm of these arguments as they are: the checks of the functional
# API (after _torch_takes) and of the operators.  Arguments that fail them go to torch's function from the
# functional API, to the NumPy API (and its errors) from the operators.

def _group_norm_takes(input, num_groups, weight, bias, eps):
    return (_kernels_apply(input, weight, bias) and input.dim() >= 2 and isinstance(num_groups, int)
            and num_groups > 0 and input.shape[1] % num_groups == 0
            # torch refuses groups of a single value in the batch ("more than 1 value per channel")
            and input.numel() > num_groups
            and _is_shape(weight, input.shape[1:2]) and _is_shape(bias, input.shape[1:2]) and eps >= 0)


def _instance_norm_takes(input, weight, bias, eps, running_mean=None, running_var=None):
    return (_kernels_apply(input, running_mean, running_var, weight, bias) and input.dim() >= 3
            and math.prod(input.shape[2:]) > 1 and input.numel() > 0
            and (running_mean is None) == (running_var is None)
            and all(_is_shape(t, input.shape[1:2]) for t in (running_mean, running_var, weight, bias)) and eps >= 0)


def _layer_norm_takes(input, shape, weight, bias, eps):
    """``shape``: the normalized shape, a tuple."""
    return (_kernels_apply(input, weight, bias) and _ends_with(input, shape) and _is_shape(weight, shape)
            and _is_shape(bias, shape) and eps >= 0)


def _rms_norm_takes(input, shape, weight, eps):
    """``shape``: the normalized shape, a tuple; ``eps`` may be None (the dtype's epsilon)."""
    return (_kernels_apply(input, weight) and _ends_with(input, shape) and _is_shape(weight, shape)
            and (eps is None or eps >= 0))


def _statistics_fit(plan, *stats):
    """Whether each of ``stats`` (None: RMS norm's mean) is laid out as the trusted forward of ``plan`` returns
    it: float64 CPU values, with the plan's logical shape and strides over memory in the kernels' order."""
    return all(stat is None or (stat.dtype == torch.float64 and stat.is_cpu and stat.layout == torch.strided
                                and (tuple(stat.shape), stat.stride()) == plan.stats_view) for stat in stats)


def _channel_norm_backward_takes(grad_output, input, mean, rstd, weight):
    if not (_kernels_apply(input, grad_output, weight) and input.dim() >= 2 and grad_output.shape == input.shape
            and _is_shape(weight, input.shape[1:2]) and input.numel() > 0 and rstd.dim() == 2 and rstd.shape[1] > 0
            and input.shape[1] % rstd.shape[1] == 0):
        return False
    return _statistics_fit(_plan(input, num_groups=rstd.shape[1]), mean, rstd)


def _trailing_norm_backward_takes(grad_output, input, mean, rstd, weight):
    """(``mean`` None: RMS norm's)"""
    num_axes = input.dim() - rstd.dim()
    if not (_kernels_apply(input, grad_output, weight) and num_axes > 0 and grad_output.shape == input.shape
            and _is_shape(weight, input.shape[rstd.dim():]) and input.numel() > 0):
        return False
    return _statistics_fit(_plan(input, num_axes=num_axes), mean, rstd)


# Each function of the API is torch.nn.functional's under torch.jit.script: TorchScript cannot compile the
# adapter's Python (it leaves out what follows ``if torch.jit.is_scripting(): return``), and a scripted model is
# meant to run without it, as torch.jit.trace and torch.export record torch's operators (see _kernels_apply).
# Hence the annotations, which TorchScript needs: torch's.

def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.group_norm`` on the cynorm kernels; torch's own function where they do not apply, or
    where it is faster (small inputs, see :func:`use_torch_for_small_inputs`)."""
    if torch.jit.is_scripting():
        return F.group_norm(input, num_groups, weight, bias, eps)
    verdict = _eager_verdict("group_norm", input, weight, bias, num_groups)
    if verdict is _TORCHS:
        return _torchs_group_norm(input, num_groups, weight, bias, eps)
    if verdict is not None and eps >= 0:
        if verdict is _EAGER:
            return _EAGER_APPLY_OF[_group_norm_op](input, num_groups, weight, bias, eps)[0]
        return _inference_forward(input, verdict, weight, bias, eps, centered=True)
    torch_crashes = _torch_group_norm_backward_crashes(input, weight, bias)
    if ((torch_crashes or not _torch_takes("group_norm", input, weight, bias, num_groups=num_groups))
            and _group_norm_takes(input, num_groups, weight, bias, eps)):
        return _run(_group_norm_op, input, num_groups, weight, bias, eps)[0]
    if torch_crashes:   # (bfloat16, which the kernels do not take: torch's channels-first kernel, on a copy)
        output = _torchs_group_norm_function(input.contiguous(), num_groups, weight, bias, eps)
        if _channels_last_order(input) is None:
            return output
        return output.contiguous(memory_format=_CHANNELS_LAST[input.dim()][0])   # (the input's layout, as torch's)
    return _torchs_group_norm_function(input, num_groups, weight, bias, eps)


def _torchs_group_norm(input, num_groups, weight, bias, eps):
    """``F.group_norm`` of a plain tensor and parameters (none with ``__torch_function__``, as _eager_verdict
    checks), calling its operator at once where its checks of the shape pass for sure: they took 2.7 µs of its 9.6
    µs on (1,32,8,8), warm, and the operator 6.9.  They refuse fewer than 2 dims, and a single value in each
    channel of a group ((N * C // num_groups) * H * W == 1), which needs fewer values than 2 * num_groups.  (The
    weight as _torchs_group_norm_weight gives it.)"""
    if weight is None and bias is not None:
        weight = _torchs_group_norm_weight(input, weight, bias)
    if type(num_groups) is int and 0 < 2 * num_groups <= input.numel() and input.dim() >= 2:
        return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    return F.group_norm(input, num_groups, weight, bias, eps)


def _torch_group_norm_backward_crashes(input, weight, bias):
    """Whether torch's own group_norm, run eagerly on ``input``, would crash in its backward.  torch 2.13's CPU kernel
    for channels-last input (4-D or 5-D), asked for the weight's or the bias's gradient but not the input's, writes
    an input gradient it never allocated: a segmentation fault ((8,6,4,4) in 2 groups, (8,64,32,32) and
    (16,64,16,16) in 32, any dtype; (8,256,56,56) passed).  That is a frozen input under trainable parameters: a
    model's first layer, a Keras model's norm right after its input, a fine-tuned head.  Such calls run the kernels,
    whatever their size.  Counted as channels-last: any input not contiguous (torch takes strided views of
    channels-last memory as channels-last too), and any contiguous both ways (one channel, or maps of one value),
    whose strides torch reads as channels-last where the channels' stride is 1 (a Keras model's first norm on
    single-channel images, moved to axis 1 as a view)."""
    # (a subclass or mode is asked nothing: it gets torch's call, see _torch_takes)
    if not torch.is_grad_enabled() or has_torch_function_variadic(input, weight, bias):
        return False
    if not (isinstance(input, Tensor) and not input.requires_grad
            and ((isinstance(weight, Tensor) and weight.requires_grad)
                 or (isinstance(bias, Tensor) and bias.requires_grad))):
        return False
    return (input.dim() in (4, 5) and input.is_cpu
            and (not input.is_contiguous() or _channels_last_order(input) is not None)
            and not torch.compiler.is_compiling())


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.instance_norm`` on the cynorm kernels; torch's own function where they do not apply.

    With ``use_input_stats`` the kernels normalize each instance and, like torch, the running statistics given
    are moved by ``momentum`` towards the batch average of the instances' mean and unbiased variance.  Without
    it (evaluation with tracked statistics) there is nothing to normalize over: torch's function applies the
    running statistics.
    """
    if torch.jit.is_scripting():
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if (use_input_stats and not _torch_takes("instance_norm", input, weight, bias)
            and _instance_norm_takes(input, weight, bias, eps, running_mean, running_var)):
        output, mean, rstd = _run(_instance_norm_op, input, weight, bias, eps)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, rstd, eps, momentum, math.prod(input.shape[2:]))
        return output
    return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, rstd, eps, momentum, spatial_size):
    # torch's instance norm is batch norm over the N*C instances: running buffers follow the batch average of
    # the per-instance statistics, with the unbiased variance; the kernels' rstd is 1/sqrt(var + eps).
    biased_var = rstd.pow(-2).sub_(eps)
    running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
    running_var.lerp_(biased_var.mean(0).mul_(spatial_size / (spatial_size - 1)).to(running_var.dtype), momentum)


def layer_norm(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.layer_norm`` on the cynorm kernels; torch's own function where they do not apply, or
    where it is faster (small inputs, see :func:`use_torch_for_small_inputs`)."""
    if torch.jit.is_scripting():
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = _normalized_shape_tuple(normalized_shape)
    verdict = _eager_verdict("layer_norm", input, weight, bias, shape)
    if verdict is _TORCHS:   # (F.layer_norm without its __torch_function__ check: a (4,64) call 7.1 µs -> 6.9)
        return torch.layer_norm(input, normalized_shape, weight, bias, eps, torch.backends.cudnn.enabled)
    if verdict is not None and eps >= 0:
        if verdict is _EAGER:
            return _EAGER_APPLY_OF[_layer_norm_op](input, list(shape), weight, bias, eps)[0]
        return _inference_forward(input, verdict, weight, bias, eps, centered=True)
    if (not _torch_takes("layer_norm", input, weight, bias, shape)
            and _layer_norm_takes(input, shape, weight, bias, eps)):
        return _run(_layer_norm_op, input, list(shape), weight, bias, eps)[0]
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """``torch.nn.functional.rms_norm`` on the cynorm kernels; torch's own function where they do not apply, or
    where it is faster (small inputs, see :func:`use_torch_for_small_inputs`).

    ``eps=None`` means ``torch.finfo(input.dtype).eps``, as in torch.
    """
    if torch.jit.is_scripting():
        return F.rms_norm(input, normalized_shape, weight, eps)
    shape = _normalized_shape_tuple(normalized_shape)
    verdict = _eager_verdict("rms_norm", input, weight, None, shape)
    if verdict is _TORCHS:
        return F.rms_norm(input, normalized_shape, weight, eps)
    if verdict is not None and (eps is None or eps >= 0):
        eps = torch.finfo(input.dtype).eps if eps is None else eps
        if verdict is _EAGER:
            return _EAGER_APPLY_OF[_rms_norm_op](input, list(shape), weight, eps)[0]
        return _inference_forward(input, verdict, weight, None, eps, centered=False)
    if (not _torch_takes("rms_norm", input, weight, normalized_shape=shape)
            and _rms_norm_takes(input, shape, weight, eps)):
        eps = torch.finfo(input.dtype).eps if eps is None else eps
        return _run(_rms_norm_op, input, list(shape), weight, eps)[0]
    return F.rms_norm(input, normalized_shape, weight, eps)


# torch.fx.symbolic_trace records calls to these (from other modules than ours, which it takes whole) as single
# nodes instead of tracing into their branches.
torch.fx.wrap("group_norm")
torch.fx.wrap("instance_norm")
torch.fx.wrap("layer_norm")
torch.fx.wrap("rms_norm")


# ---------------------------------------------------------------------------------------------------------
# Modules: torch.nn's, with forward on the kernels
# ---------------------------------------------------------------------------------------------------------

def _drop_in_doc(torch_class):
    return (f"Drop-in :class:`torch.nn.{torch_class.__name__}` computed by the cynorm kernels on CPU: same "
            f"arguments, parameters, buffers and state_dict.\n\n{torch_class.__doc__ or ''}")


# torch.fx.symbolic_trace takes torch.nn's modules whole, as call_module nodes, and traces through others: ours
# make the same node, so a traced model has torch's graph and its norms read their state (training mode,
# running statistics) when it runs, not when it was traced.  (Traced through, InstanceNorm's forward, which
# checks the input's rank in Python, could not be traced at all.)  TorchScript skips the check (see group_norm).

def _whole_module_node(module, input):
    """The call_module node of ``module`` on ``input``, a proxy of torch.fx's symbolic tracer."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


class GroupNorm(nn.GroupNorm):
    __doc__ = _drop_in_doc(nn.GroupNorm)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if isinstance(input, _FxProxy):
                return _whole_module_node(self, input)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    __doc__ = _drop_in_doc(nn.LayerNorm)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if isinstance(input, _FxProxy):
                return _whole_module_node(self, input)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    __doc__ = _drop_in_doc(nn.RMSNorm)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if isinstance(x, _FxProxy):
                return _whole_module_node(self, x)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _renamed(function, name):
    """``function`` under another ``__name__``: TorchScript compiles a method that forward calls under its
    function's name, which must not be forward again."""
    renamed = types.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                                 function.__closure__)
    renamed.__annotations__ = function.__annotations__   # (TorchScript's types)
    renamed.__kwdefaults__ = function.__kwdefaults__
    return renamed


class _InstanceNormOnKernels:
    """Replaces the one step of torch's ``_InstanceNorm.forward`` that computes; torch's forward keeps its
    input checks, unbatched-input handling and running-statistics choice."""

    _torch_forward = _renamed(nn.modules.instancenorm._InstanceNorm.forward, "_torch_forward")

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if isinstance(input, _FxProxy):
                return _whole_module_node(self, input)
        return self._torch_forward(input)

    def _apply_instance_norm(self, input):
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormOnKernels, nn.InstanceNorm1d):
    __doc__ = _drop_in_doc(nn.InstanceNorm1d)


class InstanceNorm2d(_InstanceNormOnKernels, nn.InstanceNorm2d):
    __doc__ = _drop_in_doc(nn.InstanceNorm2d)


class InstanceNorm3d(_InstanceNormOnKernels, nn.InstanceNorm3d):
    __doc__ = _drop_in_doc(nn.InstanceNorm3d)


# ---------------------------------------------------------------------------------------------------------
# Model conversion
# ---------------------------------------------------------------------------------------------------------

_CYNORM_CLASSES = {
    nn.GroupNorm: GroupNorm, nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
}
_TORCH_CLASSES = {ours: theirs for theirs, ours in _CYNORM_CLASSES.items()}


def convert(model, inplace=False):
    """Replace every torch.nn GroupNorm, LayerNorm, RMSNorm and InstanceNorm1d/2d/3d in ``model`` by ours.

    The replacements keep the same parameters, buffers, hooks and training mode, so outputs do not change, and
    an optimizer built on the model's parameters stays valid.  ``model`` may itself be a norm module.  Only
    modules of exactly these classes are replaced: subclasses may override ``forward`` or depend on their own
    methods, so they are left alone.  The counts of replaced and skipped modules are logged (INFO) under
    ``cynorm.adapters.torch``.

    Parameters
    ----------
    model : torch.nn.Module
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    torch.nn.Module
        The converted model (``model`` itself when ``inplace``).
    """
    return _swap_classes(model, _CYNORM_CLASSES, inplace, "convert")


def revert(model, inplace=False):
    """Undo :func:`convert`: replace the cynorm modules in ``model`` by the torch.nn classes they came from."""
    return _swap_classes(model, _TORCH_CLASSES, inplace, "revert")


def _swap_classes(model, new_classes, inplace, action):
    """Give each module whose exact class is a key of ``new_classes`` the class it maps to; log the counts."""
    if not inplace:
        model = copy.deepcopy(model)
    replaced, skipped = {}, []
    for name, module in model.named_modules(remove_duplicate=True):
        new_class = new_classes.get(type(module))
        if new_class is not None:
            # Ours subclass torch's without adding state, so swapping the class keeps the module object
            # (parameters, buffers, hooks, references from parents, shared uses) exactly as it is.
            module.__class__ = new_class
            replaced[new_class.__name__] = replaced.get(new_class.__name__, 0) + 1
        elif isinstance(module, tuple(new_classes)) and not isinstance(module, tuple(new_classes.values())):
            skipped.append(f"{name or '<model>'} ({type(module).__qualname__})")
    _logger.info("%s: replaced %d modules %s%s", action, sum(replaced.values()), replaced,
                 f"; left {len(skipped)} subclasses alone: {', '.join(skipped)}" if skipped else "")
    return model
