"""The TensorFlow backend of cynorm.adapters.keras: the kernels run inside ``tf.numpy_function`` under
``tf.custom_gradient``, on outputs TensorFlow adopts without a copy; graphs to be saved or compiled by XLA, and
small inputs in a ``tf.function``, run the Keras layer a layer replaces (see the layers' module docstring)."""
import functools
import math

import numpy as np
import tensorflow as tf


# TensorFlow's flags for the functions tf.saved_model.save traces, and for those XLA compiles (not in its
# public API)
try:
    from tensorflow.python.saved_model.save_context import in_save_context as _in_save_context
except ImportError:
    def _in_save_context():
        return False
try:
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _graph_in_xla_context
except ImportError:
    def _graph_in_xla_context(graph):
        return False
# Whether a tape is active (a cheap first question), and whether the active tapes may differentiate a
# computation on some tensors, and how: 0 not at all, 1 once, 2 more than once (nested tapes that both watch
# them, as for a gradient penalty, or a persistent tape).  Without TensorFlow's queries, any computation counts
# as maybe differentiated twice.
try:
    from tensorflow.python.eager.record import could_possibly_record as _any_tape_records
except ImportError:
    def _any_tape_records():
        return True
try:
    from tensorflow.python.ops.gradients_util import PossibleTapeGradientTypes as _possible_gradient_types
except ImportError:
    def _possible_gradient_types(tensors):
        return _HIGHER_ORDER
_HIGHER_ORDER = 2

from cynorm._blocks import PAGE_BYTES, numpy_block_pool, placed_in
from cynorm._threads import framework_threads


# TensorFlow adopts an ndarray returned by tf.numpy_function without copying it only when its data is aligned
# to EIGEN_MAX_ALIGN_BYTES (at most 64); NumPy's allocator guarantees 16.
_TENSORFLOW_ALIGNMENT = 64
# Outputs from 1 MiB on come from the output pool (see _new_output_pool).
_POOLED_OUTPUT_BYTES = 2 ** 20
_KERNEL_DTYPES = (tf.float16, tf.float32, tf.float64)

# Inputs of up to this many elements run Keras's own layer in tf.function (see use_keras_for_small_inputs).
# Measured in tf.function, forward and training step, against keras.layers on a 2-core x86-64 machine: the
# kernels lose below 2**16 elements (layer norm over rows of 10, 64 and 768 values, RMS norm over rows of 64 and
# 4096, group norm channels-last and channels-first, instance norm: 0.63-0.94x), are about even at 2**16
# (0.77-1.16x) and win from about 70K (1.1-1.9x at 2**17). Run eagerly, they win at every size.
KERAS_FASTER_UP_TO = 2 ** 16


def _aligned_bytes(nbytes):
    """An uninitialized uint8 array of ``nbytes`` whose data TensorFlow can take over without a copy."""
    raw = np.empty(nbytes + _TENSORFLOW_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % _TENSORFLOW_ALIGNMENT
    return raw[start:start + nbytes]


def _empty_aligned(like):
    """An uninitialized C-contiguous array of ``like``'s shape and dtype whose data TensorFlow can take over without
    a copy, from the output pool when it is large, placed half a page from ``like`` (see
    cynorm._blocks.placement)."""
    nbytes = like.nbytes
    block = _output_pool.take(nbytes, placed_in, like) if nbytes >= _POOLED_OUTPUT_BYTES else None
    return (_aligned_bytes(nbytes) if block is None else block).view(like.dtype).reshape(like.shape)


def _new_output_pool(limit):
    """The memory of large kernel outputs (see cynorm._blocks): aligned uint8 arrays, each a view of an
    allocation that only the pool and the arrays made from the block reference (NumPy views of views keep a
    reference to the array owning the memory, and so does the tensor TensorFlow makes of an output).

    TensorFlow runs a tf.numpy_function on one of its inter-op threads, each with its own C heap, so a fresh
    output came from whichever heap that was.  GroupNormalization (8,56,56,256) in tf.function, interleaved in
    one process: 6.4-7.4 ms a forward and 19.2-20.5 ms a training step with fresh outputs, 5.9-6.2 ms and
    12.6-13.8 ms with pooled ones (the same at (16,32,32,64))."""
    return numpy_block_pool(limit, allocate=lambda nbytes: _aligned_bytes(nbytes + PAGE_BYTES))


_output_pool = _new_output_pool(limit=256 * 2 ** 20)


@functools.cache
def _tensorflow_threads():
    """TensorFlow's intra-op thread count (tf.config.threading), 0 for its default.  It cannot change once
    TensorFlow's runtime has started, as it has when a layer runs; asked anew, it cost 14 µs a call."""
    return tf.config.threading.get_intra_op_parallelism_threads()


# The kernels take TensorFlow's intra-op thread count where one is set, as its own ops do (cynorm.set_num_threads
# still overrides it).  Left to OpenMP's count, they took every core on the inter-op thread that ran them.
_following_tensorflow_threads = framework_threads(_tensorflow_threads)


class ArrayKernel:
    """One cynorm forward/backward pair with a layer's fixed settings, called on the arrays of tf.numpy_function.

    ``forward(x, weight, bias, out)`` returns ``(y, *stats)`` and ``backward(dy, x, stats, weight, out)``
    returns ``(dx, dweight, dbias)``. The tensors passed through TensorFlow hold only the parameters the layer
    has (``[weight][bias]``), so absent parameters cost neither a transfer nor a gradient.
    """

    def __init__(self, forward, backward, *, has_weight, has_bias, num_stats, name):
        self._forward = forward
        self._backward = backward
        self.has_weight = has_weight
        self.has_bias = has_bias
        self.num_stats = num_stats
        self.name = name

    @_following_tensorflow_threads
    def forward(self, x, *params):
        weight = params[0] if self.has_weight else None
        bias = params[-1] if self.has_bias else None
        return self._forward(x, weight, bias, _empty_aligned(x))

    @_following_tensorflow_threads
    def backward(self, dy, x, *stats_and_weight):
        stats = stats_and_weight[:self.num_stats]
        weight = stats_and_weight[-1] if self.has_weight else None
        dx, dweight, dbias = self._backward(dy, x, stats, weight, _empty_aligned(x))
        return (dx,) + ((dweight,) if self.has_weight else ()) + ((dbias,) if self.has_bias else ())


def _normalize(x, weight, bias, kernel, stats_shape):
    """Apply `kernel` to the tensor `x` with the parameter tensors `weight`/`bias` (or None), differentiably.

    `stats_shape` is the static shape of every statistic the forward kernel returns; restoring static shapes
    after each tf.numpy_function lets the layers after this one build with known sizes.
    """
    # Gradients of the parameters come back in the kernels' accumulation dtype.
    param_grad_dtype = tf.float64 if x.dtype == tf.float64 else tf.float32

    @tf.custom_gradient
    def normalize(x, *params):
        y, *stats = tf.numpy_function(kernel.forward, [x, *params], [x.dtype] + [tf.float64] * kernel.num_stats,
                                      stateful=False, name=kernel.name)
        y.set_shape(x.shape)
        for stat in stats:
            stat.set_shape(stats_shape)
        # The gradient keeps the float64 statistics bitcast to the dtype Keras computes x's statistics in: in a
        # tf.cond whose other branch is Keras's computation (see _KernelNormalization.call), the tensors the
        # two branches keep for the gradient then have the same dtype, without which TensorFlow logs a
        # (harmless) "Type inference failed" warning.
        stats = [tf.bitcast(stat, param_grad_dtype) for stat in stats]

        def grad(dy):
            backward_inputs = ([dy, x] + [tf.bitcast(stat, tf.float64) for stat in stats]
                               + ([params[0]] if kernel.has_weight else []))
            # A one-element Tout gives a bare tensor, hence the flatten.
            dx, *param_grads = tf.nest.flatten(tf.numpy_function(
                kernel.backward, backward_inputs, [x.dtype] + [param_grad_dtype] * len(params),
                stateful=False, name=kernel.name + "_backward"))
            dx.set_shape(x.shape)
            for param_grad, param in zip(param_grads, params):
                param_grad.set_shape(param.shape)
            return [dx] + [tf.cast(g, p.dtype) for g, p in zip(param_grads, params)]

        return y, grad

    params = [tf.convert_to_tensor(p) for p in (weight, bias) if p is not None]
    return normalize(x, *params)


def _in_kernel_dtype(tensor):
    """`tensor` (a tensor or variable) in a dtype the kernels take: bfloat16 has no kernel, and is computed in
    float32 as the float16 kernels do internally."""
    tensor = tf.convert_to_tensor(tensor)
    return tensor if tensor.dtype in _KERNEL_DTYPES else tf.cast(tensor, tf.float32)


def call(layer, inputs, small_inputs_to_keras):
    """``layer.call(inputs)`` on TensorFlow: the kernels, or the layer's Keras twin where a graph is to be saved or
    compiled, or in a tf.function on inputs of up to KERAS_FASTER_UP_TO elements if ``small_inputs_to_keras``."""
    if not tf.executing_eagerly() and (_in_save_context()
                                       or _graph_in_xla_context(tf.compat.v1.get_default_graph())):
        return layer._keras_call(inputs)   # a graph to be saved or compiled (see the module's docstring)
    # Run eagerly, Keras's layers pay for each of their several operations: the kernels win at every size.
    # Float32 and float64 policies only: under mixed precision Keras's RMSNormalization reads its scale in
    # float16 where ours reads it in float32, and in a tf.cond the two branches of a float16 layer would
    # keep tensors of different dtypes for the gradient (see _normalize).
    small_graph_input = (small_inputs_to_keras and not tf.executing_eagerly()
                         and layer.compute_dtype in ("float32", "float64")
                         and layer.variable_dtype == layer.compute_dtype
                         and math.prod(d for d in inputs.shape if d is not None) <= KERAS_FASTER_UP_TO)
    if small_graph_input and inputs.shape.is_fully_defined():
        # (before the kernels' reads of the parameters, which the twin would leave unused in the graph)
        return layer._keras_call(inputs)
    weight, bias = (None if variable is None else _in_kernel_dtype(variable) for variable in layer._weight_and_bias())
    if _needs_differentiable_gradient(inputs, weight, bias):
        return layer._keras_call(inputs)
    if not small_graph_input:
        return _apply_kernel(layer, inputs, weight, bias)
    return tf.cond(tf.size(inputs, out_type=tf.int64) <= KERAS_FASTER_UP_TO,
                   lambda: layer._keras_call(inputs),
                   lambda: _apply_kernel(layer, inputs, weight, bias))


def _needs_differentiable_gradient(inputs, *params):
    """Whether the tapes recording a call on ``inputs`` and ``params`` (the parameters as read for it, or None) may
    differentiate its gradient again (a gradient penalty, nested tapes, a persistent tape).  The kernels'
    gradient, a tf.numpy_function, has no gradient of its own, which TensorFlow took for zero: a gradient
    penalty through GroupNormalization lost its second-order terms (a critic's parameter gradients were off by up
    to 2.6 where they were of order 1), or failed in a tf.function.  Such calls run the Keras twin, which
    TensorFlow differentiates to any order."""
    if not _any_tape_records():
        return False
    return _possible_gradient_types([inputs, *(param for param in params if param is not None)]) == _HIGHER_ORDER


def _apply_kernel(layer, inputs, weight, bias):
    """The layer's kernel (``layer._kernel``, an ArrayKernel) on ``inputs`` and its parameters as read for the call
    (in a kernel dtype, or None), the inputs' normalized axes first moved to the end by ``layer._permutation``
    where it is not None (the kernels need them next to each other)."""
    def kernel(inputs):
        x = _in_kernel_dtype(inputs)
        return tf.cast(_normalize(x, weight, bias, layer._kernel, layer._stats_shape(x.shape)), layer.compute_dtype)

    return layer._with_axes_moved(inputs, layer._permutation, kernel)
