"""Keras 3 normalization layers computed by the cynorm kernels (TensorFlow backend).

Drop-in replacements for ``keras.layers.GroupNormalization``, ``keras.layers.LayerNormalization``,
``keras.layers.RMSNormalization`` and TensorFlow Addons' ``InstanceNormalization``: same arguments, defaults,
weight names and error messages, so changing an import is enough::

    from cynorm.adapters.keras import GroupNormalization
    model = keras.Sequential([..., GroupNormalization(groups=8), ...])

Each layer runs the cynorm forward kernel through ``tf.numpy_function`` inside ``tf.custom_gradient``; the
gradient runs the matching cynorm backward kernel the same way, so ``model.fit`` trains ``gamma`` and ``beta``.
The statistics are computed in float32 (float64 for float64 inputs) and the output has the layer's compute
dtype, as with Keras's mixed precision policies. A ``tf.numpy_function`` cannot be compiled by XLA, so the
layers declare ``supports_jit = False`` and Keras runs models that contain them without ``jit_compile``.
Inside ``tf.function``, inputs too small for the kernels to win run Keras's own operations instead (see
`use_keras_for_small_inputs`).

A saved graph cannot hold a ``tf.numpy_function`` (its Python callback stays in the process that traced it), so
the functions ``tf.saved_model.save`` traces run Keras's own operations: ``model.export``,
``keras.export.ExportArchive``, TFLite's converter from a Keras model (all three save through it) and
``tf.saved_model.save`` give SavedModels that load and run anywhere, with Keras's results, while the model
itself keeps the kernels. A ``tf.function`` that was traced before it is saved, and is saved as it is, keeps the
kernels, and its SavedModel runs only in the process that saved it. Nor can XLA compile a ``tf.numpy_function``:
in a ``tf.function(jit_compile=True)`` the layers run Keras's operations too.
"""
import functools
import math
import warnings

import keras
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

import cynorm
from cynorm._blocks import PAGE_BYTES, numpy_block_pool, placement
from cynorm._threads import framework_threads

__all__ = ["GroupNormalization", "InstanceNormalization", "LayerNormalization", "RMSNormalization",
           "use_keras_for_small_inputs"]

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
_KERAS_FASTER_UP_TO = 2 ** 16
_small_inputs_to_keras = True


def use_keras_for_small_inputs(enabled):
    """Whether the layers run Keras's own layer on inputs too small for the kernels to win (default True);
    returns the previous setting.

    In a ``tf.function`` (``model.fit``, ``predict``, ...) each kernel call goes through ``tf.numpy_function``,
    which costs about 0.05 ms more than Keras's own operations on a small input, and 0.1 ms more in a training
    step. Up to ``_KERAS_FASTER_UP_TO`` elements (the whole input, batch included) the layers therefore compute
    with the operations of the Keras layer they replace, on their own weights: Keras's results. Where the batch
    size is not known when the function is traced, a ``tf.cond`` decides when it runs, which costs 0.01-0.05 ms
    a forward and 0.03-0.06 ms a training step. Eager calls, and layers whose dtype policy is not float32 or
    float64 (mixed precision, float16, bfloat16), always run the kernels. ``False`` sends every input to the
    kernels. The setting applies where a function is traced: a ``tf.function`` traced before a change keeps the
    choice it made (the first ``fit`` traces its training function; ``model.make_train_function(force=True)``
    traces it again).
    """
    global _small_inputs_to_keras
    if not isinstance(enabled, bool):
        raise TypeError(f"use_keras_for_small_inputs() expects True or False, got {enabled!r}")
    previous, _small_inputs_to_keras = _small_inputs_to_keras, enabled
    return previous


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
    block = _output_pool.take(nbytes, _placed_in, like) if nbytes >= _POOLED_OUTPUT_BYTES else None
    return (_aligned_bytes(nbytes) if block is None else block).view(like.dtype).reshape(like.shape)


def _placed_in(block, like):
    """The part of a pool block that an output like ``like`` takes."""
    offset = placement(block.ctypes.data, like.ctypes.data)
    return block[offset:offset + like.nbytes]


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


class _ArrayKernel:
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


def _check_not_batch_axis(axis, layer_name):
    if axis == 0:
        raise ValueError(
            f"Received an invalid value for argument `axis`: axis 0 is the batch axis, and {layer_name} "
            f"normalizes each example separately. Use a feature axis (1 or more, or a negative axis). "
            f"Received: axis={axis}")


def _check_axes_in_bounds(axis, input_shape):
    for a in [axis] if isinstance(axis, int) else axis:
        if not -len(input_shape) <= a < len(input_shape):
            raise ValueError(f"Axis {a} is out of bounds for input shape {tuple(input_shape)}. "
                             f"Received: axis={axis}")


def _resolve_axes(axis, input_shape, layer_name):
    """The axes named by `axis` (an int or a list) as sorted non-negative ints, with each dimension defined."""
    _check_axes_in_bounds(axis, input_shape)
    axes = [axis] if isinstance(axis, int) else list(axis)
    resolved = sorted(a % len(input_shape) for a in axes)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Duplicate axis: {tuple(resolved)}. Received: axis={axis}")
    for a in resolved:
        _check_not_batch_axis(a, layer_name)
    for a in axes:
        if input_shape[a] is None:
            raise ValueError(f"Axis {a} of input tensor should have a defined dimension but the layer received "
                             f"an input with shape {tuple(input_shape)}.")
    return tuple(resolved)


class _KernelNormalization(keras.layers.Layer):
    """Common behaviour of the cynorm layers: dtype handling, the kernel call and small inputs.

    Subclasses create their weights, ``self._kernel`` (an `_ArrayKernel`) and their Keras twin (`_set_keras_twin`)
    in `build`, and implement ``_stats_shape(input_shape)``, the static shape of the statistics the kernel
    returns, and ``_weight_and_bias()``, the variables the kernel takes (or None).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        # Parameters stay in the variable dtype (float32 under mixed precision), as in Keras's normalizations.
        self.autocast = False
        self.supports_jit = False
        self._kernel = None
        self._keras_call = None

    def _set_keras_twin(self, keras_layer, input_shape, weights, **arguments):
        """Make and build a twin, the `keras_layer` this layer replaces with this layer's `arguments` and dtype
        policy, then give it this layer's `weights` (a dict by attribute name): calling it then computes what
        Keras would with them.

        The weights are set past Keras's attribute tracking, which refuses new state in a built layer, and only
        the bound `__call__` is kept, which Keras does not track: the twin and the weights its `build` made stay
        out of this layer's weights, saved files and configs.  It has a name of its own, or Keras would number it
        among the user's layers.
        """
        twin = keras_layer(**arguments, name=f"{self.name}_keras_twin", dtype=self.dtype_policy)
        twin.build(input_shape)
        for name, weight in weights.items():
            object.__setattr__(twin, name, weight)
        self._keras_call = twin.__call__

    def call(self, inputs):
        if not tf.executing_eagerly() and (_in_save_context()
                                           or _graph_in_xla_context(tf.compat.v1.get_default_graph())):
            return self._keras_call(inputs)   # a graph to be saved or compiled (see the module's docstring)
        # Run eagerly, Keras's layers pay for each of their several operations: the kernels win at every size.
        # Float32 and float64 policies only: under mixed precision Keras's RMSNormalization reads its scale in
        # float16 where ours reads it in float32, and in a tf.cond the two branches of a float16 layer would
        # keep tensors of different dtypes for the gradient (see _normalize).
        if (not _small_inputs_to_keras or tf.executing_eagerly()
                or self.compute_dtype not in ("float32", "float64") or self.variable_dtype != self.compute_dtype
                or math.prod(d for d in inputs.shape if d is not None) > _KERAS_FASTER_UP_TO):
            return self._apply_kernel(inputs, *self._weight_and_bias())
        if inputs.shape.is_fully_defined():
            return self._keras_call(inputs)
        return tf.cond(tf.size(inputs, out_type=tf.int64) <= _KERAS_FASTER_UP_TO,
                       lambda: self._keras_call(inputs),
                       lambda: self._apply_kernel(inputs, *self._weight_and_bias()))

    def _apply_kernel(self, inputs, weight, bias):
        x, weight, bias = (None if tensor is None else _in_kernel_dtype(tensor) for tensor in (inputs, weight, bias))
        y = _normalize(x, weight, bias, self._kernel, self._stats_shape(x.shape))
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        _check_axes_in_bounds(self.axis, input_shape)
        return input_shape


class _GammaBeta:
    """The ``gamma`` (scale) and ``beta`` (offset) parameters shared by Group- and LayerNormalization: their
    arguments, weights and config entries, as Keras names them."""

    def _set_affine_arguments(self, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                              gamma_regularizer, beta_constraint, gamma_constraint):
        self.center = center
        self.scale = scale
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)

    def _add_affine_weights(self, shape):
        self.gamma = self.add_weight(
            shape=shape, name="gamma", initializer=self.gamma_initializer,
            regularizer=self.gamma_regularizer, constraint=self.gamma_constraint, autocast=False,
        ) if self.scale else None
        self.beta = self.add_weight(
            shape=shape, name="beta", initializer=self.beta_initializer,
            regularizer=self.beta_regularizer, constraint=self.beta_constraint, autocast=False,
        ) if self.center else None

    def _affine_config(self):
        return {
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
        }

    def _weight_and_bias(self):
        return self.gamma, self.beta


def _check_groups(groups):
    if isinstance(groups, bool) or not isinstance(groups, int) or (groups <= 0 and groups != -1):
        raise ValueError("Received an invalid value for argument `groups`, expected a positive integer (or `-1` "
                         f"for instance normalization). Received: groups={groups!r}")


@keras.saving.register_keras_serializable(package="cynorm")
class GroupNormalization(_GammaBeta, _KernelNormalization):
    """Group normalization layer (Wu & He, 2018) on the cynorm kernels.

    Same arguments and behaviour as ``keras.layers.GroupNormalization`` (and TensorFlow Addons'): the
    channels along `axis` are split into `groups` contiguous groups, and each example's values in a group are
    normalized to zero mean and unit variance, then scaled by ``gamma`` and shifted by ``beta`` (per channel).

    Args:
        groups: Integer, the number of groups; it must divide the number of channels. ``-1`` means one group per
            channel (instance normalization). Defaults to 32.
        axis: Integer, the channel axis: -1 (or the last axis) for channels-last inputs, 1 for channels-first.
            The batch axis 0 is not allowed. Defaults to -1.
        epsilon: Small float added to the variance to avoid dividing by zero. Defaults to 1e-3.
        center: If True, add the offset ``beta``. Defaults to True.
        scale: If True, multiply by ``gamma``. Defaults to True.
        beta_initializer, gamma_initializer: Initializers of ``beta`` (zeros) and ``gamma`` (ones).
        beta_regularizer, gamma_regularizer: Optional regularizers of ``beta`` and ``gamma``.
        beta_constraint, gamma_constraint: Optional constraints of ``beta`` and ``gamma``.
        **kwargs: Base layer keyword arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, groups=32, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, **kwargs):
        _check_groups(groups)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Received an invalid value for argument `axis`, expected an integer. "
                             f"Received: axis={axis!r}")
        _check_not_batch_axis(axis, type(self).__name__)
        super().__init__(**kwargs)
        self.groups = groups
        self.axis = axis
        self.epsilon = epsilon
        self._set_affine_arguments(center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                                   gamma_regularizer, beta_constraint, gamma_constraint)

    def build(self, input_shape):
        (channel_axis,) = _resolve_axes(self.axis, input_shape, type(self).__name__)
        channels = input_shape[channel_axis]
        # As in Keras, `groups` holds the actual number of groups once built.
        if self.groups == -1:
            self.groups = channels
        if channels < self.groups:
            raise ValueError(f"Number of groups ({self.groups}) cannot be more than the number of channels "
                             f"({channels}).")
        if channels % self.groups != 0:
            raise ValueError(f"Number of groups ({self.groups}) must be a multiple of the number of channels "
                             f"({channels}).")
        self.input_spec = keras.InputSpec(ndim=len(input_shape), axes={self.axis: channels})
        self._add_affine_weights((channels,))

        groups, epsilon = self.groups, self.epsilon
        self._kernel = _ArrayKernel(
            lambda x, weight, bias, out: cynorm.group_norm(x, groups, weight, bias, axis=channel_axis,
                                                           eps=epsilon, out=out, return_stats=True),
            lambda dy, x, stats, weight, out: cynorm.group_norm_backward(dy, x, *stats, weight, axis=channel_axis,
                                                                         out=out),
            has_weight=self.scale, has_bias=self.center, num_stats=2, name="cynorm_group_norm",
        )
        self._set_keras_twin(keras.layers.GroupNormalization, input_shape, {"gamma": self.gamma, "beta": self.beta},
                             groups=groups, axis=self.axis, epsilon=epsilon, center=self.center, scale=self.scale)
        super().build(input_shape)

    def _stats_shape(self, input_shape):
        return (input_shape[0], self.groups)

    def get_config(self):
        config = {"groups": self.groups, "axis": self.axis, "epsilon": self.epsilon, **self._affine_config()}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="cynorm")
class InstanceNormalization(GroupNormalization):
    """Instance normalization layer (Ulyanov et al., 2016): a `GroupNormalization` with one group per channel.

    Takes the arguments of `GroupNormalization`. As in TensorFlow Addons, a given `groups` is overridden
    (with a warning).
    """

    def __init__(self, **kwargs):
        groups = kwargs.pop("groups", -1)
        if groups != -1:
            warnings.warn(f"InstanceNormalization uses one group per channel; the given groups={groups!r} is "
                          "ignored.", stacklevel=2)
        super().__init__(groups=-1, **kwargs)

    def get_config(self):
        config = super().get_config()
        del config["groups"]
        return config


def _check_axis_argument(axis, layer_name):
    """Validate the `axis` of a layer normalizing over several axes; return it as an int or a list."""
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"Expected an int or a list/tuple of ints for the argument 'axis', but received: {axis!r}")
    for a in axes:
        _check_not_batch_axis(a, layer_name)
    if len(set(axes)) != len(axes):
        raise ValueError(f"Duplicate axis: {tuple(axes)}. Received: axis={axis}")
    return list(axis) if isinstance(axis, (list, tuple)) else axis


class _AxesNormalization(_KernelNormalization):
    """Normalization of each example over the axes in `axis` (layer and RMS normalization).

    The kernels need the normalized axes next to each other; other layouts (e.g. ``axis=[1, 3]``) are
    transposed to trailing axes around the kernel call.
    """

    def _resolve_layout(self, input_shape):
        """Return the normalized axes; set the kernel's axes and the transposition (or None) they need."""
        axes = _resolve_axes(self.axis, input_shape, type(self).__name__)
        rank = len(input_shape)
        if axes == tuple(range(axes[0], axes[0] + len(axes))):
            self._permutation = None
            self._kernel_axes = axes
        else:
            self._permutation = [a for a in range(rank) if a not in axes] + list(axes)
            self._kernel_axes = tuple(range(rank - len(axes), rank))
        return axes

    def _stats_shape(self, input_shape):
        return tuple(d for a, d in enumerate(input_shape) if a not in self._kernel_axes)

    def _apply_kernel(self, inputs, weight, bias):
        if self._permutation is None:
            return super()._apply_kernel(inputs, weight, bias)
        outputs = super()._apply_kernel(tf.transpose(inputs, self._permutation), weight, bias)
        return tf.transpose(outputs, np.argsort(self._permutation))


@keras.saving.register_keras_serializable(package="cynorm")
class LayerNormalization(_GammaBeta, _AxesNormalization):
    """Layer normalization layer (Ba et al., 2016) on the cynorm kernels.

    Same arguments and behaviour as ``keras.layers.LayerNormalization``: each example is normalized over the
    axes in `axis`, then scaled by ``gamma`` and shifted by ``beta``, both shaped like those axes.

    Args:
        axis: Integer or list of integers, the axes to normalize over (not the batch axis 0). Defaults to -1.
        epsilon: Small float added to the variance to avoid dividing by zero. Defaults to 1e-3.
        center: If True, add the offset ``beta``. Defaults to True.
        scale: If True, multiply by ``gamma``. Defaults to True.
        beta_initializer, gamma_initializer: Initializers of ``beta`` (zeros) and ``gamma`` (ones).
        beta_regularizer, gamma_regularizer: Optional regularizers of ``beta`` and ``gamma``.
        beta_constraint, gamma_constraint: Optional constraints of ``beta`` and ``gamma``.
        **kwargs: Base layer keyword arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, **kwargs):
        # Keras's configs carry the deprecated `rms_scaling` (always False in configs we can reproduce).
        if kwargs.pop("rms_scaling", False):
            raise ValueError("`rms_scaling=True` is not supported (it is deprecated in Keras): use "
                             "`RMSNormalization` instead.")
        axis = _check_axis_argument(axis, type(self).__name__)
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon
        self._set_affine_arguments(center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                                   gamma_regularizer, beta_constraint, gamma_constraint)

    def build(self, input_shape):
        axes = self._resolve_layout(input_shape)
        param_shape = tuple(input_shape[a] for a in axes)
        self._add_affine_weights(param_shape)

        kernel_axes, epsilon = self._kernel_axes, self.epsilon
        self._kernel = _ArrayKernel(
            lambda x, weight, bias, out: cynorm.layer_norm(x, weight, bias, axis=kernel_axes, eps=epsilon,
                                                           out=out, return_stats=True),
            lambda dy, x, stats, weight, out: cynorm.layer_norm_backward(dy, x, *stats, weight, axis=kernel_axes,
                                                                         out=out),
            has_weight=self.scale, has_bias=self.center, num_stats=2, name="cynorm_layer_norm",
        )
        self._set_keras_twin(keras.layers.LayerNormalization, input_shape, {"gamma": self.gamma, "beta": self.beta},
                             axis=self.axis, epsilon=epsilon, center=self.center, scale=self.scale)
        super().build(input_shape)

    def get_config(self):
        config = {"axis": self.axis, "epsilon": self.epsilon, **self._affine_config()}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="cynorm")
class RMSNormalization(_AxesNormalization):
    """Root mean square normalization layer (Zhang & Sennrich, 2019) on the cynorm kernels.

    Same arguments and behaviour as ``keras.layers.RMSNormalization``:
    ``x * rsqrt(mean(square(x)) + epsilon) * scale`` over the axes in `axis`, with a trainable ``scale``
    initialized to ones.

    Args:
        axis: Integer or list of integers, the axes to normalize over (not the batch axis 0). Defaults to -1.
        epsilon: Small float added to the mean square to avoid dividing by zero. Defaults to 1e-6.
        **kwargs: Base layer keyword arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
        axis = _check_axis_argument(axis, type(self).__name__)
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def build(self, input_shape):
        axes = self._resolve_layout(input_shape)
        self.scale = self.add_weight(name="scale", shape=tuple(input_shape[a] for a in axes), initializer="ones",
                                     autocast=False)
        kernel_axes, epsilon = self._kernel_axes, self.epsilon
        self._kernel = _ArrayKernel(
            lambda x, weight, bias, out: cynorm.rms_norm(x, weight, axis=kernel_axes, eps=epsilon, out=out,
                                                         return_stats=True),
            lambda dy, x, stats, weight, out: cynorm.rms_norm_backward(dy, x, *stats, weight, axis=kernel_axes,
                                                                       out=out),
            has_weight=True, has_bias=False, num_stats=1, name="cynorm_rms_norm",
        )
        self._set_keras_twin(keras.layers.RMSNormalization, input_shape, {"scale": self.scale}, axis=self.axis,
                             epsilon=epsilon)
        super().build(input_shape)

    def _weight_and_bias(self):
        return self.scale, None

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}
