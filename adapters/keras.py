"""Keras 3 normalization layers computed by the cynorm kernels (TensorFlow and torch backends).

Drop-in replacements for ``keras.layers.GroupNormalization``, ``keras.layers.LayerNormalization``,
``keras.layers.RMSNormalization`` and TensorFlow Addons' ``InstanceNormalization``: same arguments, defaults,
weight names and error messages, so changing an import is enough::

    from cynorm.adapters.keras import GroupNormalization
    model = keras.Sequential([..., GroupNormalization(groups=8), ...])

On Keras's torch backend the layers call the PyTorch adapter (``cynorm.adapters.torch``): its autograd operators,
which ``torch.compile`` (``jit_compile=True``) takes, and its choice of torch's own function where the kernels do not
apply or lose; half precision inputs are computed in float32, as Keras's layers do, and TensorFlow is not needed.
On other backends (jax, numpy, openvino) the layers compute with Keras's own operations, and say so once.

On TensorFlow, each layer runs the cynorm forward kernel through ``tf.numpy_function`` inside
``tf.custom_gradient``; the gradient runs the matching cynorm backward kernel the same way, so ``model.fit`` trains
``gamma`` and ``beta``. The statistics are computed in float32 (float64 for float64 inputs) and the output has the
layer's compute dtype, as with Keras's mixed precision policies. A ``tf.numpy_function`` cannot be compiled by
XLA, so there the layers declare ``supports_jit = False`` and Keras runs models that contain them without
``jit_compile``.
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
import warnings

import keras

import cynorm

__all__ = ["GroupNormalization", "InstanceNormalization", "LayerNormalization", "RMSNormalization",
           "use_keras_for_small_inputs"]

# The backend Keras runs on, fixed when Keras is imported; only the backend's glue is imported here, so that
# neither framework is needed where Keras runs on the other.
_BACKEND = keras.backend.backend()
if _BACKEND == "tensorflow":
    from cynorm.adapters import _keras_tensorflow as _tensorflow
elif _BACKEND == "torch":
    import torch

    from cynorm.adapters import torch as _torch_norms

_small_inputs_to_keras = True


def use_keras_for_small_inputs(enabled):
    """Whether the layers run Keras's own layer on inputs too small for the kernels to win (default True);
    returns the previous setting.

    On the TensorFlow backend, in a ``tf.function`` (``model.fit``, ``predict``, ...) each kernel call goes through
    ``tf.numpy_function``, which costs about 0.05 ms more than Keras's own operations on a small input, and 0.1 ms
    more in a training step. Up to 2**16 elements (the whole input, batch included) the layers therefore compute
    with the operations of the Keras layer they replace, on their own weights: Keras's results. Where the batch
    size is not known when the function is traced, a ``tf.cond`` decides when it runs, which costs 0.01-0.05 ms
    a forward and 0.03-0.06 ms a training step. Eager calls, and layers whose dtype policy is not float32 or
    float64 (mixed precision, float16, bfloat16), always run the kernels. ``False`` sends every input to the
    kernels. The setting applies where a function is traced: a ``tf.function`` traced before a change keeps the
    choice it made (the first ``fit`` traces its training function; ``model.make_train_function(force=True)``
    traces it again). On the torch backend the layers call the PyTorch adapter, whose own setting applies
    (``cynorm.adapters.torch.use_torch_for_small_inputs``).
    """
    global _small_inputs_to_keras
    if not isinstance(enabled, bool):
        raise TypeError(f"use_keras_for_small_inputs() expects True or False, got {enabled!r}")
    previous, _small_inputs_to_keras = _small_inputs_to_keras, enabled
    return previous


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

    Subclasses create their weights, their NumPy kernel (`_set_array_kernel`) and their Keras twin
    (`_set_keras_twin`) in `build`, and implement ``_stats_shape(input_shape)``, the static shape of the statistics
    the NumPy kernel returns, ``_weight_and_bias()``, the variables the kernels take (or None), and
    ``_torch_norm(x, weight, bias)``, the norm of a torch tensor through the PyTorch adapter.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        # Parameters stay in the variable dtype (float32 under mixed precision), as in Keras's normalizations.
        self.autocast = False
        # XLA cannot compile a tf.numpy_function; torch.compile takes the PyTorch adapter's operators.
        self.supports_jit = _BACKEND == "torch"
        self._kernel = None
        self._keras_call = None
        self._permutation = None

    def _set_array_kernel(self, forward, backward, **settings):
        """The NumPy kernel pair the TensorFlow backend runs (see _keras_tensorflow.ArrayKernel)."""
        if _BACKEND == "tensorflow":
            self._kernel = _tensorflow.ArrayKernel(forward, backward, **settings)

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

    def build(self, input_shape):
        if _BACKEND not in ("tensorflow", "torch"):
            _warn_of_keras_operations()
        super().build(input_shape)

    def call(self, inputs):
        if _BACKEND == "tensorflow":
            return _tensorflow.call(self, inputs, _small_inputs_to_keras)
        if _BACKEND == "torch":
            return self._torch_call(inputs)
        return self._keras_call(inputs)

    def _torch_call(self, inputs):
        """The norm of a torch tensor through the PyTorch adapter, which runs the kernels or, where they do not
        apply or lose, torch's own function.  As Keras's normalizations do, float16 and bfloat16 inputs are
        computed in float32, and the output comes in the layer's compute dtype."""
        x = inputs if inputs.dtype in (torch.float32, torch.float64) else inputs.to(torch.float32)
        weight, bias = (None if variable is None else keras.ops.convert_to_tensor(variable).to(x.dtype)
                        for variable in self._weight_and_bias())
        return keras.ops.cast(self._torch_norm(x, weight, bias), self.compute_dtype)

    @staticmethod
    def _with_axes_moved(x, permutation, function):
        """``function`` of ``x`` transposed by ``permutation``, its result transposed back (None: of ``x`` as it
        is).  On torch the transpositions are views."""
        if permutation is None:
            return function(x)
        inverse = sorted(range(len(permutation)), key=permutation.__getitem__)
        return keras.ops.transpose(function(keras.ops.transpose(x, permutation)), inverse)

    def compute_output_shape(self, input_shape):
        _check_axes_in_bounds(self.axis, input_shape)
        return input_shape


_warned_of_keras_operations = False


def _warn_of_keras_operations():
    global _warned_of_keras_operations
    if not _warned_of_keras_operations:
        _warned_of_keras_operations = True
        warnings.warn(f"cynorm.adapters.keras: Keras runs on the {_BACKEND!r} backend, where the layers compute "
                      "with Keras's own operations; the cynorm kernels run on the 'tensorflow' and 'torch' "
                      "backends.", stacklevel=3)


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
        self._channel_axis = channel_axis

        groups, epsilon = self.groups, self.epsilon
        self._set_array_kernel(
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

    def _torch_norm(self, x, weight, bias):
        # torch's channels are axis 1: channels-last input moves there as a view, which the kernels take as it is
        y = _torch_norms.group_norm(x.movedim(self._channel_axis, 1), self.groups, weight, bias, self.epsilon)
        return y.movedim(1, self._channel_axis)

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

    The NumPy kernels need the normalized axes next to each other; other layouts (e.g. ``axis=[1, 3]``) are
    transposed to trailing axes around the kernel call.  torch's functions normalize trailing axes: on the torch
    backend, other axes are permuted there as a view (which the PyTorch adapter's kernels take without a copy).
    """

    def _resolve_layout(self, input_shape):
        """Return the normalized axes; set the kernel's axes and the transpositions (or None) they need."""
        axes = _resolve_axes(self.axis, input_shape, type(self).__name__)
        rank = len(input_shape)
        to_end = [a for a in range(rank) if a not in axes] + list(axes)
        if axes == tuple(range(axes[0], axes[0] + len(axes))):
            self._permutation = None
            self._kernel_axes = axes
        else:
            self._permutation = to_end
            self._kernel_axes = tuple(range(rank - len(axes), rank))
        self._normalized_shape = [input_shape[a] for a in axes]
        self._trailing_permutation = None if to_end == list(range(rank)) else to_end
        return axes

    def _on_trailing_axes(self, x, norm):
        """``norm(x)`` of a function over trailing axes, with the normalized axes moved to the end."""
        return self._with_axes_moved(x, self._trailing_permutation, norm)

    def _stats_shape(self, input_shape):
        return tuple(d for a, d in enumerate(input_shape) if a not in self._kernel_axes)


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
        self._set_array_kernel(
            lambda x, weight, bias, out: cynorm.layer_norm(x, weight, bias, axis=kernel_axes, eps=epsilon,
                                                           out=out, return_stats=True),
            lambda dy, x, stats, weight, out: cynorm.layer_norm_backward(dy, x, *stats, weight, axis=kernel_axes,
                                                                         out=out),
            has_weight=self.scale, has_bias=self.center, num_stats=2, name="cynorm_layer_norm",
        )
        self._set_keras_twin(keras.layers.LayerNormalization, input_shape, {"gamma": self.gamma, "beta": self.beta},
                             axis=self.axis, epsilon=epsilon, center=self.center, scale=self.scale)
        super().build(input_shape)

    def _torch_norm(self, x, weight, bias):
        return self._on_trailing_axes(
            x, lambda x: _torch_norms.layer_norm(x, self._normalized_shape, weight, bias, self.epsilon))

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
        self.supports_masking = False   # (as Keras's: a mask goes no further, where the other norms pass it on)
        self.axis = axis
        self.epsilon = epsilon

    def build(self, input_shape):
        axes = self._resolve_layout(input_shape)
        self.scale = self.add_weight(name="scale", shape=tuple(input_shape[a] for a in axes), initializer="ones",
                                     autocast=False)
        kernel_axes, epsilon = self._kernel_axes, self.epsilon
        self._set_array_kernel(
            lambda x, weight, bias, out: cynorm.rms_norm(x, weight, axis=kernel_axes, eps=epsilon, out=out,
                                                         return_stats=True),
            lambda dy, x, stats, weight, out: cynorm.rms_norm_backward(dy, x, *stats, weight, axis=kernel_axes,
                                                                       out=out),
            has_weight=True, has_bias=False, num_stats=1, name="cynorm_rms_norm",
        )
        # Keras's RMSNormalization broadcasts its scale over trailing axes only: over others, it raised where its
        # twin ran (small inputs in tf.function, saved graphs), so the twin takes them moved to the end
        permutation, rank = self._trailing_permutation, len(input_shape)
        self._set_keras_twin(keras.layers.RMSNormalization,
                             input_shape if permutation is None else [input_shape[a] for a in permutation],
                             {"scale": self.scale}, epsilon=epsilon,
                             axis=self.axis if permutation is None else list(range(rank - len(axes), rank)))
        twin_call = self._keras_call
        self._keras_call = lambda inputs: self._on_trailing_axes(inputs, twin_call)
        super().build(input_shape)

    def _weight_and_bias(self):
        return self.scale, None

    def _torch_norm(self, x, weight, bias):
        return self._on_trailing_axes(x, lambda x: _torch_norms.rms_norm(x, self._normalized_shape, weight,
                                                                         self.epsilon))

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}
