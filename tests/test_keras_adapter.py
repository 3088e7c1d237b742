"""Tests of the Keras layers on the cynorm kernels (cynorm.adapters.keras) and of the tutorial."""
import collections
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cynorm import slow  # noqa: E402
from cynorm._blocks import PAGE_BYTES  # noqa: E402
from cynorm.adapters import _keras_tensorflow as ktf  # noqa: E402
from cynorm.adapters import keras as ck  # noqa: E402
from cynorm.adapters import keras_tutorial  # noqa: E402

# Layers of ours with Keras's counterpart, for parity; InstanceNormalization is compared with GroupNormalization.
PAIRS = {
    "group": (ck.GroupNormalization, keras.layers.GroupNormalization),
    "layer": (ck.LayerNormalization, keras.layers.LayerNormalization),
    "rms": (ck.RMSNormalization, keras.layers.RMSNormalization),
}


def _random(shape, seed, dtype="float32"):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _set_same_random_weights(layers, seed):
    """Give each layer the same random weights, so that gamma and beta matter in the comparison."""
    rng = np.random.default_rng(seed)
    for variables in zip(*(layer.weights for layer in layers)):
        value = rng.uniform(0.5, 1.5, variables[0].shape).astype(variables[0].dtype)
        for variable in variables:
            variable.assign(value)


def _output_and_gradients(layer, x, upstream):
    """The layer's output and the gradients of sum(output * upstream) for the input and every weight."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return y.numpy(), [g.numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)]


def _assert_parity(ours, theirs, shape, seed=0, rtol=1e-5, atol=1e-5):
    ours.build(shape)
    theirs.build(shape)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    _set_same_random_weights([ours, theirs], seed)
    x, upstream = _random(shape, seed + 1), _random(shape, seed + 2)
    y_ours, grads_ours = _output_and_gradients(ours, x, upstream)
    y_theirs, grads_theirs = _output_and_gradients(theirs, x, upstream)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=rtol, atol=atol)
    assert len(grads_ours) == len(grads_theirs)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        # Parameter gradients are float32 sums over batch and space: their rounding grows with their size.
        np.testing.assert_allclose(g_ours, g_theirs, rtol=rtol, atol=atol * max(1.0, np.abs(g_theirs).max()))


@pytest.fixture(autouse=True)
def kernels_for_small_inputs():
    """The tests' inputs are small: they run on the kernels, not on the Keras operations the layers use for
    small inputs in tf.function by default (tested below, with the setting on)."""
    previous = ck.use_keras_for_small_inputs(False)
    yield
    ck.use_keras_for_small_inputs(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the forward and backward kernels the layers have run, in order."""
    calls = []

    def counted(method):
        def run(kernel, *arrays):
            calls.append(f"{kernel.name}.{method.__name__}")
            return method(kernel, *arrays)
        return run

    for method in (ktf.ArrayKernel.forward, ktf.ArrayKernel.backward):
        monkeypatch.setattr(ktf.ArrayKernel, method.__name__, counted(method))
    return calls


CHANNELS = 6
LAYOUTS = {  # rank -> {layout: (shape, channel axis)}
    rank: {"channels_last": ((3,) + (5, 4, 3)[:rank - 2] + (CHANNELS,), -1),
           "channels_first": ((3, CHANNELS) + (5, 4, 3)[:rank - 2], 1)}
    for rank in (2, 3, 4, 5)
}
LAYOUT_CASES = [(rank, layout) for rank in LAYOUTS for layout in LAYOUTS[rank]]


@pytest.mark.parametrize("rank, layout", LAYOUT_CASES)
@pytest.mark.parametrize("groups", [1, 3, -1])
def test_group_normalization_matches_keras(rank, layout, groups):
    shape, axis = LAYOUTS[rank][layout]
    _assert_parity(ck.GroupNormalization(groups, axis=axis), keras.layers.GroupNormalization(groups, axis=axis),
                   shape)


@pytest.mark.parametrize("rank, layout", LAYOUT_CASES)
def test_layer_normalization_matches_keras(rank, layout):
    shape, axis = LAYOUTS[rank][layout]
    _assert_parity(ck.LayerNormalization(axis=axis), keras.layers.LayerNormalization(axis=axis), shape)


@pytest.mark.parametrize("axis", [[1, 2], [2, 3], [1, 2, 3], [1, 3], [-1, -3]])
def test_layer_normalization_over_several_axes_matches_keras(axis):
    _assert_parity(ck.LayerNormalization(axis=axis), keras.layers.LayerNormalization(axis=axis), (2, 5, 4, 3))


@pytest.mark.parametrize("axis", [-1, [2, 3], [-2, -1]])
def test_rms_normalization_matches_keras(axis):
    _assert_parity(ck.RMSNormalization(axis=axis), keras.layers.RMSNormalization(axis=axis), (2, 5, 4, 3))


@pytest.mark.parametrize("axis", [1, [1, 2], [1, 3]])
def test_rms_normalization_over_leading_axes_matches_reference(axis):
    """Keras's RMSNormalization cannot broadcast its scale over these axes; compare with cynorm.slow."""
    shape = (2, 5, 4, 3)
    layer = ck.RMSNormalization(axis=axis)
    layer.build(shape)
    scale = np.random.default_rng(0).uniform(0.5, 1.5, layer.scale.shape).astype("float32")
    layer.scale.assign(scale)
    x, upstream = _random(shape, 1), _random(shape, 2)
    y, (dx, dscale) = _output_and_gradients(layer, x, upstream)
    y_ref, rstd = slow.rms_norm(x, scale, axis=axis, eps=layer.epsilon, return_stats=True)
    dx_ref, dscale_ref, _ = slow.rms_norm_backward(upstream, x, rstd, scale, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [1, [1, 2], [1, 3]])
def test_rms_normalization_over_leading_axes_where_keras_operations_run(axis, tmp_path, kernel_calls):
    """Where the layers run Keras's operations (small inputs in tf.function, saved graphs), RMSNormalization over
    these axes moves them to the end for Keras's layer, which broadcasts its scale over trailing axes only
    (before, those calls raised)."""
    assert ck.use_keras_for_small_inputs(True) is False
    shape = (2, 5, 4, 3)
    model = keras.Sequential([keras.Input(shape[1:]), ck.RMSNormalization(axis=axis)])
    layer = model.layers[0]
    scale = np.random.default_rng(0).uniform(0.5, 1.5, layer.scale.shape).astype("float32")
    layer.scale.assign(scale)
    x, upstream = _random(shape, 1), _random(shape, 2)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, [x, layer.scale])

    y, (dx, dscale) = step(tf.constant(x))
    assert not kernel_calls
    y_ref, rstd = slow.rms_norm(x, scale, axis=axis, eps=layer.epsilon, return_stats=True)
    dx_ref, dscale_ref, _ = slow.rms_norm_backward(upstream, x, rstd, scale, axis=axis)
    for got, expected in ((y, y_ref), (dx, dx_ref), (dscale, dscale_ref)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    model.export(tmp_path / "exported", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))   # (kept: its functions need its variables alive)
    np.testing.assert_allclose(loaded.serve(tf.constant(x)), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("kind", ["group", "layer"])
def test_without_center_or_scale_matches_keras(kind, center, scale):
    ours, theirs = PAIRS[kind]
    kwargs = {"groups": 2} if kind == "group" else {}
    _assert_parity(ours(center=center, scale=scale, **kwargs), theirs(center=center, scale=scale, **kwargs),
                   (3, 4, 4, 6))


def test_tutorial_shapes_match_keras():
    """The tutorial normalizes (batch, 26, 26, 10) tensors over axis 3 and over axis 1."""
    shape = (2, 26, 26, 10)
    _assert_parity(ck.GroupNormalization(groups=5, axis=3), keras.layers.GroupNormalization(groups=5, axis=3),
                   shape)
    for axis in (3, 1):
        ours, theirs = ck.LayerNormalization(axis=axis), keras.layers.LayerNormalization(axis=axis)
        _assert_parity(ours, theirs, shape)
        assert tuple(ours.gamma.shape) == (shape[axis],)


def test_instance_normalization_equals_group_normalization_with_one_group_per_channel():
    shape = (2, 5, 5, 6)
    instance = ck.InstanceNormalization(axis=3, beta_initializer="random_uniform",
                                        gamma_initializer="random_uniform")
    group = ck.GroupNormalization(groups=-1, axis=3)
    instance.build(shape)
    group.build(shape)
    assert instance.groups == group.groups == 6
    group.set_weights(instance.get_weights())
    x, upstream = _random(shape, 0), _random(shape, 1)
    y_instance, grads_instance = _output_and_gradients(instance, x, upstream)
    y_group, grads_group = _output_and_gradients(group, x, upstream)
    np.testing.assert_array_equal(y_instance, y_group)
    for g_instance, g_group in zip(grads_instance, grads_group, strict=True):
        np.testing.assert_array_equal(g_instance, g_group)


def test_instance_normalization_overrides_groups_with_a_warning():
    with pytest.warns(UserWarning, match="groups=4"):
        layer = ck.InstanceNormalization(groups=4)
    layer.build((2, 3, 8))
    assert layer.groups == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.InstanceNormalization(groups=-1)
        ck.InstanceNormalization.from_config(layer.get_config())


def test_float64_and_eager_equal_tf_function():
    layer = ck.GroupNormalization(groups=2, dtype="float64")
    x = tf.constant(_random((4, 3, 8), 0, "float64"))
    eager = layer(x)
    assert eager.dtype == tf.float64 and layer.gamma.dtype == "float64"
    traced = tf.function(layer)(x)
    np.testing.assert_array_equal(eager.numpy(), traced.numpy())
    reference = keras.layers.GroupNormalization(groups=2, dtype="float64")(x)
    np.testing.assert_allclose(eager.numpy(), reference.numpy(), rtol=1e-12, atol=1e-12)


@pytest.fixture
def every_output_pooled(monkeypatch):
    """An output pool of its own, used for outputs of any size."""
    pool = ktf._new_output_pool(limit=2 ** 30)
    monkeypatch.setattr(ktf, "_output_pool", pool)
    monkeypatch.setattr(ktf, "_POOLED_OUTPUT_BYTES", 0)
    return pool


def test_pooled_outputs_are_reused_only_once_released(every_output_pooled):
    """An output TensorFlow still holds keeps its values while later calls run; once released, its memory
    serves the next call."""
    layer, reference = ck.GroupNormalization(groups=4), keras.layers.GroupNormalization(groups=4)
    inputs = [tf.constant(_random((3, 5, 6, 8), seed)) for seed in (1, 2, 3)]
    layer.build(inputs[0].shape), reference.build(inputs[0].shape)
    _set_same_random_weights([layer, reference], seed=4)
    forward = tf.function(lambda x: layer(x))
    outputs = [forward(x) for x in inputs]   # all held at once: three blocks
    assert every_output_pooled.blocks_of(inputs[0].numpy().nbytes) == 3
    for output, x in zip(outputs, inputs):
        np.testing.assert_allclose(output, reference(x), rtol=1e-5, atol=1e-5)
    del outputs, output
    for x in inputs:   # one at a time: a block released each time
        np.testing.assert_allclose(forward(x), reference(x), rtol=1e-5, atol=1e-5)
    assert every_output_pooled.blocks_of(inputs[0].numpy().nbytes) == 3
    # at the limit, a free block of a size no longer asked for makes room for another size
    size = inputs[0].numpy().nbytes
    every_output_pooled.limit = 3 * size + 64
    assert every_output_pooled.take(size + 64, lambda block: block[:]) is not None
    assert every_output_pooled.blocks_of(size) == 2 and every_output_pooled.held_bytes == 3 * size + 64


def test_pooled_outputs_are_placed_half_a_page_from_their_input(every_output_pooled):
    """An output starts on a line (TensorFlow's alignment asks for 64 bytes), half a page from its input's line in
    the page (see cynorm._blocks.placement), wherever the input starts."""
    shape = (3, 5, 6, 8)
    memory = np.zeros(np.prod(shape) + PAGE_BYTES, np.float32)
    for skipped in (0, 4, 16, 500, 1023):   # values of `memory` before the input's
        x = memory[skipped:skipped + np.prod(shape)].reshape(shape)
        output = ktf._empty_aligned(x)
        assert output.shape == x.shape and output.dtype == x.dtype and output.flags.c_contiguous
        input_line = x.ctypes.data - x.ctypes.data % 64
        assert output.ctypes.data % 64 == 0 and (output.ctypes.data - input_line) % PAGE_BYTES == PAGE_BYTES // 2


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_dynamic_batch_and_static_shapes(kind):
    """Shapes known at trace time stay known after the kernel call; the batch size may vary between calls."""
    layer = PAIRS[kind][0]()
    layer.build((None, 4, 32))
    calls = []

    @tf.function(input_signature=[tf.TensorSpec((None, 4, 32), tf.float32)])
    def forward_and_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        dx = tape.gradient(y, x)
        calls.append((y.shape.as_list(), dx.shape.as_list()))
        return y, dx

    for batch in (1, 5):
        y, dx = forward_and_backward(tf.constant(_random((batch, 4, 32), batch)))
        assert y.shape == dx.shape == (batch, 4, 32)
    assert calls == [([None, 4, 32], [None, 4, 32])]


# Ours and the Keras layer whose operations ours runs on small inputs, on examples of 1024 values: 64 of them
# are 2**16 values, the most that run Keras's operations.
SMALL_INPUT_PAIRS = {
    "group": (lambda **kw: ck.GroupNormalization(groups=4, **kw),
              lambda **kw: keras.layers.GroupNormalization(groups=4, **kw)),
    "instance": (lambda **kw: ck.InstanceNormalization(axis=1, **kw),
                 lambda **kw: keras.layers.GroupNormalization(groups=-1, axis=1, **kw)),
    "layer": (lambda **kw: ck.LayerNormalization(axis=[1, 2], **kw),
              lambda **kw: keras.layers.LayerNormalization(axis=[1, 2], **kw)),
    "rms": (lambda **kw: ck.RMSNormalization(**kw), lambda **kw: keras.layers.RMSNormalization(**kw)),
}
EXAMPLE_SHAPE = (16, 8, 8)


@pytest.mark.parametrize("kind", sorted(SMALL_INPUT_PAIRS))
@pytest.mark.parametrize("batch_known", [True, False], ids=["static_batch", "dynamic_batch"])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_small_inputs_run_keras_operations_in_tf_function(kind, batch_known, policy, kernel_calls):
    """Up to 2**16 values the layers compute with the Keras layer's operations on their own weights, decided
    when the function is traced or, with the batch size unknown then, when it runs; eager calls and mixed
    precision run the kernels. Outputs and gradients match Keras's either way."""
    assert ck.use_keras_for_small_inputs(True) is False
    ours, theirs = (make(dtype=policy) for make in SMALL_INPUT_PAIRS[kind])
    for layer in (ours, theirs):
        layer.build((None,) + EXAMPLE_SHAPE)
    _set_same_random_weights([ours, theirs], seed=0)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    signature = None if batch_known else [tf.TensorSpec((None,) + EXAMPLE_SHAPE, ours.compute_dtype),
                                          tf.TensorSpec((None,) + EXAMPLE_SHAPE, tf.float32)]

    def training_step(layer):
        @tf.function(input_signature=signature)
        def step(x, upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
            return y, tape.gradient(loss, [x] + layer.trainable_weights)
        return step

    step_ours, step_theirs = training_step(ours), training_step(theirs)
    tolerance = 1e-5 if policy == "float32" else 2e-3
    for batch, on_kernels in ((64, False), (65, True), (1, False)):
        x = tf.constant(_random((batch,) + EXAMPLE_SHAPE, batch, ours.compute_dtype))
        upstream = tf.constant(_random((batch,) + EXAMPLE_SHAPE, batch + 1))
        del kernel_calls[:]
        y_ours, grads_ours = step_ours(x, upstream)
        assert len(kernel_calls) == (2 if on_kernels or policy != "float32" else 0), (batch, kernel_calls)
        y_theirs, grads_theirs = step_theirs(x, upstream)
        assert y_ours.dtype == y_theirs.dtype
        np.testing.assert_allclose(np.float32(y_ours), np.float32(y_theirs), rtol=tolerance, atol=tolerance)
        for g_ours, g_theirs in zip(grads_ours, grads_theirs):
            g_ours, g_theirs = np.float32(g_ours), np.float32(g_theirs)
            np.testing.assert_allclose(g_ours, g_theirs, rtol=tolerance,
                                       atol=tolerance * max(1.0, np.abs(g_theirs).max()))
        if batch_known and not kernel_calls:   # the same graph as Keras's: the same bits
            np.testing.assert_array_equal(y_ours, y_theirs)
            # and the same operations: none of the kernels' reads of the parameters is left unused in it
            graphs = [step.get_concrete_function(x, upstream).graph for step in (step_ours, step_theirs)]
            assert _operation_counts(graphs[0]) == _operation_counts(graphs[1])
    del kernel_calls[:]
    ours(tf.constant(_random((1,) + EXAMPLE_SHAPE, 0, ours.compute_dtype)))
    assert kernel_calls == [kernel_calls[0]] and kernel_calls[0].endswith(".forward")


def _operation_counts(graph):
    return collections.Counter(operation.type for operation in graph.get_operations())


_DYNAMIC_BATCH_STEPS = """
import numpy as np, tensorflow as tf
from cynorm.adapters import keras as ck
shape = (16, 8, 8)
for dtype in ("float32", "float64"):
    for layer in (ck.GroupNormalization(groups=4, dtype=dtype), ck.LayerNormalization(axis=[1, 2], dtype=dtype),
                  ck.RMSNormalization(dtype=dtype)):
        layer.build((None,) + shape)

        @tf.function(input_signature=[tf.TensorSpec((None,) + shape, dtype)])
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(loss, [x] + layer.trainable_weights)

        step(tf.ones((2,) + shape, dtype))
print("ran")
"""


def test_no_type_inference_warning_where_the_batch_decides():
    """TensorFlow logs "Type inference failed" for a tf.cond whose branches keep tensors of different dtypes
    for the gradient, as the kernels' float64 statistics and Keras's float32 ones would be. (In a process of
    its own: TensorFlow logs the warning only the first few times.)"""
    result = subprocess.run([sys.executable, "-c", _DYNAMIC_BATCH_STEPS], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr
    assert "Type inference failed" not in result.stderr


def test_small_inputs_setting():
    assert ck.use_keras_for_small_inputs(True) is False   # (the autouse fixture's setting)
    assert ck.use_keras_for_small_inputs(False) is True
    for bad in (0, 1, None, "yes"):
        with pytest.raises(TypeError, match="True or False"):
            ck.use_keras_for_small_inputs(bad)


def _name_number(layer):
    name, _, number = layer.name.rpartition("_")
    return int(number) if number.isdigit() else 0


def test_keras_twin_stays_out_of_the_layer(tmp_path):
    """The Keras layer whose operations run small inputs is no part of ours: neither its weights nor a name in
    Keras's numbering."""
    first = keras.layers.LayerNormalization()
    ours = ck.LayerNormalization()
    ours.build((None, 4))
    assert _name_number(keras.layers.LayerNormalization()) == _name_number(first) + 2
    assert [w.name for w in ours.weights] == ["gamma", "beta"] and not ours._layers


@pytest.mark.parametrize("kind", sorted(SMALL_INPUT_PAIRS))
def test_other_backends_run_keras_operations_with_a_warning(kind, monkeypatch, kernel_calls):
    """On a backend without kernels (jax, numpy, openvino), the layers compute what Keras's do, with their
    operations, and say so once; the torch backend has tests of its own (test_keras_torch_backend.py)."""
    monkeypatch.setattr(ck, "_BACKEND", "jax")
    monkeypatch.setattr(ck, "_warned_of_keras_operations", False)
    make_ours, make_theirs = SMALL_INPUT_PAIRS[kind]
    shape = (2,) + EXAMPLE_SHAPE
    ours, theirs = make_ours(), make_theirs()
    with pytest.warns(UserWarning, match="'jax' backend, where the layers compute with Keras's own operations"):
        ours.build(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_ours().build(shape)
    theirs.build(shape)
    _set_same_random_weights([ours, theirs], seed=0)
    x = tf.constant(_random(shape, 1))
    np.testing.assert_array_equal(ours(x), theirs(x))
    assert not kernel_calls


def test_model_fit_with_small_and_large_batches(kernel_calls):
    """model.fit's batch size is unknown when it traces: each epoch's last, smaller, batch runs Keras's
    operations and the others the kernels, in one training function, and training goes as on the kernels."""
    shape = (32, 32, 8)   # batches of 16 examples are 2**17 values, the last one of 4 is 2**15
    x, labels = _classification_data(size=36, shape=shape)
    results = {}
    for small_inputs_to_keras in (True, False):
        ck.use_keras_for_small_inputs(small_inputs_to_keras)
        keras.utils.set_random_seed(0)
        normalization = ck.GroupNormalization(groups=4)
        model = _model(normalization, input_shape=shape)
        model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy")
        del kernel_calls[:]
        history = model.fit(x, labels, epochs=3, batch_size=16, verbose=0)
        # a forward and a backward kernel for each batch on the kernels
        assert len(kernel_calls) == 2 * 3 * (2 if small_inputs_to_keras else 3)
        assert history.history["loss"][-1] < history.history["loss"][0] / 2
        results[small_inputs_to_keras] = history.history["loss"], [w.numpy() for w in model.weights]
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    for with_keras, on_kernels in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(with_keras, on_kernels, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("policy, output_tolerance, gradient_tolerance",
                         [("mixed_float16", 2e-3, 1e-2), ("bfloat16", 2e-2, 5e-2)])
def test_reduced_precision_policies(kind, policy, output_tolerance, gradient_tolerance):
    """Mixed precision (float16 compute, float32 weights) and bfloat16 (bfloat16 weights, which the kernels take
    in float32): Keras's dtypes under the same policy, and its results within their precision."""
    ours, theirs = (cls(dtype=policy) for cls in PAIRS[kind])
    shape = (2, 6, 32)
    for layer in (ours, theirs):
        layer.build(shape)
    _set_same_random_weights([ours, theirs], seed=0)
    assert [w.dtype for w in ours.weights] == [w.dtype for w in theirs.weights]
    assert all(w.dtype == ours.variable_dtype for w in ours.weights)
    x = tf.cast(_random(shape, 1), ours.compute_dtype)
    y_ours, grads_ours = _output_and_gradients(ours, x, _random(shape, 2))
    y_theirs, grads_theirs = _output_and_gradients(theirs, x, _random(shape, 2))
    assert y_ours.dtype == y_theirs.dtype and y_ours.dtype.name == ours.compute_dtype
    assert [g.dtype for g in grads_ours] == [g.dtype for g in grads_theirs]
    np.testing.assert_allclose(np.float32(y_ours), np.float32(y_theirs), rtol=output_tolerance,
                               atol=output_tolerance)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        g_ours, g_theirs = np.float32(g_ours), np.float32(g_theirs)
        np.testing.assert_allclose(g_ours, g_theirs, rtol=gradient_tolerance,
                                   atol=gradient_tolerance * max(1.0, np.abs(g_theirs).max()))


def _model(normalization, input_shape=(6, 6, 8)):
    """Conv2D -> normalization -> Flatten -> Dense: Flatten and Dense build only if the static shape is known."""
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same"),
        normalization,
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])


def _classification_data(seed=0, size=64, shape=(6, 6, 8)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size)
    x = rng.standard_normal((size,) + shape).astype("float32") + labels[:, None, None, None]
    return x, labels


LAYER_FACTORIES = {
    "group": lambda **kw: ck.GroupNormalization(groups=4, **kw),
    "instance": lambda **kw: ck.InstanceNormalization(**kw),
    "layer": lambda **kw: ck.LayerNormalization(axis=[1, 2, 3], **kw),
    "layer_axis1": lambda **kw: ck.LayerNormalization(axis=1, **kw),
    "rms": lambda **kw: ck.RMSNormalization(**kw),
}


@pytest.mark.parametrize("kind", sorted(LAYER_FACTORIES))
def test_model_fit_trains_gamma_and_beta(kind):
    keras.utils.set_random_seed(0)
    normalization = LAYER_FACTORIES[kind]()
    model = _model(normalization)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    initial = [w.numpy().copy() for w in normalization.weights]
    x, labels = _classification_data()
    history = model.fit(x, labels, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for before, variable in zip(initial, normalization.weights):
        assert not np.allclose(before, variable.numpy()), variable.name
    # predict and evaluate (traced, batches of 20 with a smaller last one) agree with an eager call.
    probabilities = model.predict(x, batch_size=20, verbose=0)
    np.testing.assert_allclose(probabilities, model(x).numpy(), rtol=1e-5, atol=1e-6)
    expected_loss = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert model.evaluate(x, labels, batch_size=20, verbose=0) == pytest.approx(float(expected_loss), rel=1e-5)


def test_regularizer_losses():
    layer = ck.GroupNormalization(groups=2, gamma_regularizer="l2", beta_regularizer=keras.regularizers.L1(0.5))
    model = _model(layer)
    model(np.ones((2, 6, 6, 8), "float32"))
    assert len(model.losses) == 2
    no_regularizer = ck.LayerNormalization(gamma_regularizer="l2")
    _model(no_regularizer)
    assert len(no_regularizer.losses) == 1


def test_non_neg_constraint_holds_after_fit():
    keras.utils.set_random_seed(0)
    layer = ck.GroupNormalization(groups=4, gamma_initializer=keras.initializers.RandomUniform(0.0, 0.05),
                                  beta_initializer=keras.initializers.RandomUniform(0.0, 0.05),
                                  gamma_constraint="non_neg", beta_constraint=keras.constraints.NonNeg())
    model = _model(layer)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="sparse_categorical_crossentropy")
    x, labels = _classification_data()
    model.fit(x, labels, epochs=2, batch_size=16, verbose=0)
    assert np.all(layer.gamma.numpy() >= 0) and np.all(layer.beta.numpy() >= 0)
    # The constraint is active: plain SGD at this rate would push some values below zero.
    assert np.any(layer.gamma.numpy() == 0) or np.any(layer.beta.numpy() == 0)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_mask_goes_on_as_through_keras_layers(kind):
    """An embedding's mask goes past our layer where it goes past Keras's (group and layer normalization pass it
    on, RMS normalization does not, with Keras's warning): the layers after it see the same mask."""
    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(50, 8, mask_zero=True)(inputs)
    kwargs = {"groups": 2} if kind == "group" else {}
    masks, warned = [], []
    for factory in PAIRS[kind]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            masks.append(getattr(factory(**kwargs)(embedded), "_keras_mask", None))
        # (the messages past the layer's name, which Keras numbers)
        warned.append(sorted(str(w.message).split("'")[2] for w in caught if "mask" in str(w.message)))
    assert (masks[0] is None) == (masks[1] is None) == (kind == "rms")
    assert warned[0] == warned[1] and bool(warned[0]) == (kind == "rms")


@pytest.mark.parametrize("kind", sorted(LAYER_FACTORIES))
def test_get_config_round_trip(kind):
    layer = LAYER_FACTORIES[kind](name="norm", epsilon=1e-4) if kind == "rms" else LAYER_FACTORIES[kind](
        name="norm", epsilon=1e-4, center=False, gamma_initializer="random_uniform",
        gamma_regularizer=keras.regularizers.L2(0.1), gamma_constraint="non_neg")
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"cynorm>{type(layer).__name__}"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_keras_config_loads_into_our_layers():
    """A config written by Keras's layers builds ours (the import swap works for saved configs too)."""
    for ours, theirs in PAIRS.values():
        config = theirs(axis=1).get_config()
        assert ours.from_config(config).get_config()["axis"] == config["axis"]


def _every_layer_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((12, 12, 8)),
        ck.GroupNormalization(groups=4, gamma_initializer="random_uniform"),
        ck.InstanceNormalization(beta_initializer="random_uniform"),
        ck.LayerNormalization(axis=[1, 3], gamma_initializer="random_uniform"),
        ck.RMSNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def test_keras_file_save_and_load(tmp_path):
    model = _every_layer_model()
    x = _random((4, 12, 12, 8), 0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# --------------------------------------------------------------------------------------------------------
# Saved graphs: Keras's own operations, which load without this process's Python callbacks
# --------------------------------------------------------------------------------------------------------

_PYTHON_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def _saved_model_ops(path):
    """The op types of every graph and function in the SavedModel at `path`."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in saved.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


# (a batch of 1024: above KERAS_FASTER_UP_TO, so in this process these inputs run the kernels)
_LARGE_BATCH = (1024, 12, 12, 8)

_SERVE_SAVED_MODEL = """
import sys
import numpy as np
import tensorflow as tf
assert "cynorm" not in sys.modules
loaded = tf.saved_model.load(sys.argv[1])   # (kept: its functions need its variables alive)
np.save(sys.argv[3], loaded.serve(np.load(sys.argv[2])).numpy())
"""


def test_exported_model_runs_in_a_process_without_cynorm(tmp_path, kernel_calls):
    """model.export traces Keras's operations: the SavedModel holds no tf.numpy_function (whose callback
    would exist only in this process) and serves a large batch elsewhere with the model's results."""
    model = _every_layer_model()
    x = _random(_LARGE_BATCH, 0)
    expected = model.predict(x, verbose=0)
    assert kernel_calls
    model.export(tmp_path / "exported", verbose=False)
    assert not _saved_model_ops(tmp_path / "exported") & _PYTHON_CALLBACK_OPS
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", _SERVE_SAVED_MODEL, str(tmp_path / "exported"),
                             str(tmp_path / "x.npy"), str(tmp_path / "served.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, rtol=1e-4, atol=1e-4)
    # the model itself still runs the kernels
    kernel_calls.clear()
    model.predict(x, verbose=0)
    assert kernel_calls


_THREADS_OF_KERNEL_CALLS = """
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import cynorm
from cynorm.adapters import keras as ck
counts = []

def thread_count(size):
    counts.append(cynorm.get_num_threads())
    return 1

cynorm._api._thread_count = thread_count
layer = ck.GroupNormalization(groups=4)
x = tf.constant(np.random.default_rng(0).standard_normal((8, 32, 32, 16), dtype=np.float32))
layer(x)
with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.function(layer)(x)
tape.gradient(y, x)
print(sorted(set(counts)), len(counts))
"""


def test_kernels_follow_tensorflow_intra_op_threads():
    """tf.config.threading's intra-op thread count, where one is set, is the kernels' too, on TensorFlow's
    inter-op threads as in eager calls (the setting must come before TensorFlow starts: another process)."""
    result = subprocess.run([sys.executable, "-c", _THREADS_OF_KERNEL_CALLS, "1"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[1] 3"   # (thread counts, calls: forward twice, backward)


def test_saved_model_save_traces_keras_operations(tmp_path):
    model = _every_layer_model()
    tf.saved_model.save(model, str(tmp_path / "saved"))
    ops = _saved_model_ops(tmp_path / "saved")
    assert "Rsqrt" in ops and not ops & _PYTHON_CALLBACK_OPS


def test_tflite_conversion_from_the_keras_model():
    """TFLite's converter saves the model first: it converts Keras's operations, where it could not convert a
    tf.numpy_function."""
    model = _every_layer_model()
    x = _random((2, 12, 12, 8), 1)
    interpreter = tf.lite.Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert())
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
                               model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_xla_compiled_function_runs_keras_operations(kernel_calls):
    """XLA cannot compile a tf.numpy_function: in tf.function(jit_compile=True) the layers run Keras's
    operations, forward and gradient, with the kernels' results to rounding (gradients on the scale of the
    largest: those of the group norm's gamma and beta vanish, the instance norm after it undoing them)."""
    model = _every_layer_model()
    x = tf.constant(_random(_LARGE_BATCH, 0))

    def output_and_gradients(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x)))
        return model(x), tape.gradient(loss, model.trainable_weights)

    compiled = tf.function(output_and_gradients, jit_compile=True)(x)
    assert not kernel_calls
    on_kernels = tf.function(output_and_gradients)(x)
    assert kernel_calls
    (y, gradients), (expected_y, expected_gradients) = compiled, on_kernels
    np.testing.assert_allclose(y.numpy(), expected_y.numpy(), rtol=1e-4, atol=1e-4)
    scale = max(np.abs(g.numpy()).max() for g in expected_gradients)
    for got, expected in zip(gradients, expected_gradients):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5 * scale)


def _gradient_penalty_step(model, images, where):
    """A WGAN-GP critic step: the gradient of the score with respect to the images, differentiated again through
    a penalty on its norm; the gradients of every trainable weight.  ``where``: eagerly, the critic in a
    tf.function, or the whole step in one."""
    critic = tf.function(model) if where == "critic_in_tf_function" else model

    def step():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(images)
                score = critic(images)
            grad = tf.reshape(inner.gradient(score, images), (images.shape[0], -1))
            loss = tf.reduce_mean(score) + 10 * tf.reduce_mean(tf.square(tf.norm(grad, axis=1) - 1))
        return outer.gradient(loss, model.trainable_weights)

    return (tf.function(step) if where == "step_in_tf_function" else step)()


@pytest.mark.parametrize("where", ["eager", "critic_in_tf_function", "step_in_tf_function"])
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_gradient_penalty_gives_keras_gradients(kind, where, kernel_calls):
    """The kernels' gradient cannot be differentiated again: TensorFlow took it for zero (a critic's parameter
    gradients off by up to 2.6 where they were of order 1), or failed in a tf.function.  Calls under tapes that
    may differentiate their gradient run Keras's operations instead; calls under one tape, the kernels."""
    images = tf.constant(_random((4, 6, 6, 8), 0, "float64"))
    critics = []
    for layer_class in PAIRS[kind]:
        keras.utils.set_random_seed(0)
        normalization = layer_class(**({"groups": 4} if kind == "group" else {}), dtype="float64")
        critics.append(keras.Sequential([keras.Input((6, 6, 8)), keras.layers.Conv2D(8, 3, dtype="float64"),
                                         normalization, keras.layers.Flatten(dtype="float64"),
                                         keras.layers.Dense(1, dtype="float64")]))
    _set_same_random_weights([critic.layers[1] for critic in critics], seed=1)
    ours, theirs = (_gradient_penalty_step(critic, images, where) for critic in critics)
    assert not kernel_calls
    for got, expected in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(critics[0](images))
    tape.gradient(loss, critics[0].trainable_weights)
    assert kernel_calls


def test_jit_compile_is_disabled():
    """XLA cannot compile tf.numpy_function, so Keras must not try to."""
    model = _model(ck.GroupNormalization(groups=4))
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is False


@pytest.mark.parametrize("groups", [0, -2, 1.5, "32", True])
def test_invalid_groups(groups):
    with pytest.raises(ValueError, match=f"argument `groups`.*Received: groups={groups!r}"):
        ck.GroupNormalization(groups=groups)


@pytest.mark.parametrize("factory", [ck.GroupNormalization, ck.InstanceNormalization, ck.LayerNormalization,
                                     ck.RMSNormalization])
def test_batch_axis_is_rejected(factory):
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        factory(axis=0)
    layer = factory(axis=-3)
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        layer.build((2, 4, 8))


@pytest.mark.parametrize("factory", [ck.GroupNormalization, ck.LayerNormalization, ck.RMSNormalization])
@pytest.mark.parametrize("axis", [3, -4])
def test_axis_out_of_range(factory, axis):
    with pytest.raises(ValueError, match=f"Axis {axis} is out of bounds for input shape"):
        factory(axis=axis).build((2, 4, 8))
    with pytest.raises(ValueError, match=f"Axis {axis} is out of bounds for input shape"):
        factory(axis=axis).compute_output_shape((2, 4, 8))


@pytest.mark.parametrize("factory", [ck.GroupNormalization, ck.LayerNormalization])
def test_undefined_channel_dimension(factory):
    with pytest.raises(ValueError, match="Axis -1 of input tensor should have a defined dimension"):
        factory(axis=-1).build((None, 4, None))
    with pytest.raises(ValueError, match="should have a defined dimension"):
        keras.Sequential([keras.Input((4, None)), factory()])


def test_more_groups_than_channels():
    with pytest.raises(ValueError, match=r"Number of groups \(16\) cannot be more than the number of channels "
                                         r"\(8\)"):
        ck.GroupNormalization(groups=16).build((2, 4, 8))


def test_channels_not_a_multiple_of_groups():
    with pytest.raises(ValueError, match=r"Number of groups \(3\) must be a multiple of the number of channels "
                                         r"\(8\)"):
        ck.GroupNormalization(groups=3).build((2, 4, 8))


@pytest.mark.parametrize("axis", [[1, 1], [2, -1]])
def test_duplicate_axes(axis):
    layer_shape = (2, 4, 8)
    with pytest.raises(ValueError, match="Duplicate axis"):
        ck.LayerNormalization(axis=axis).build(layer_shape)


@pytest.mark.parametrize("axis", [1.0, "1", [1, None], None])
def test_axis_of_wrong_type(axis):
    with pytest.raises(TypeError, match="argument 'axis'"):
        ck.LayerNormalization(axis=axis)


def test_group_normalization_axis_of_wrong_type():
    with pytest.raises(ValueError, match="argument `axis`"):
        ck.GroupNormalization(axis=[1, 2])


@pytest.fixture
def deterministic_ops():
    # TensorFlow has no public switch back; on CPU, deterministic ops only forbid a few unused kernels.
    tf.config.experimental.enable_op_determinism()


@pytest.mark.slow
def test_tutorial_models_reach_90_percent_on_digits(deterministic_ops):
    data = keras_tutorial.load_digits()
    assert data[0][0].shape[1:] == data[1][0].shape[1:] == (28, 28)
    for model_name in keras_tutorial.MODEL_NAMES:
        result = keras_tutorial.train_and_evaluate(model_name, "cynorm", data, epochs=2, seed=0)
        assert result["accuracy"] >= 0.9, (model_name, result)


@pytest.mark.slow
def test_tutorial_command_line(capsys, monkeypatch, deterministic_ops):
    """main() trains a model with both implementations and prints a row with both accuracies and times."""
    small = keras_tutorial.load_digits(test_fraction=0.9)
    monkeypatch.setitem(keras_tutorial.DATASETS, "digits", lambda: small)
    monkeypatch.setattr(keras_tutorial, "MODEL_NAMES", ("InstanceNormalization",))
    assert keras_tutorial.main(["--epochs", "1", "--batch-size", "64"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == list(keras_tutorial.MODEL_NAMES)
    for row in rows:
        ours_accuracy, keras_accuracy, ours_seconds, keras_seconds = map(float, row.split()[1:])
        # Same seed, same model and (up to rounding) the same arithmetic: the same predictions, nearly.
        assert abs(ours_accuracy - keras_accuracy) <= 0.05
        assert ours_seconds > 0 and keras_seconds > 0


def test_tutorial_help_does_not_start_tensorflow():
    # (TensorFlow takes seconds to import and prints its log lines before the help)
    script = ("import sys\n"
              "from cynorm.__main__ import main\n"
              "try:\n"
              "    main(['tutorial', '--help'])\n"
              "except SystemExit as exit:\n"
              "    assert exit.code == 0\n"
              "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: cynorm tutorial" in result.stdout
    assert result.stdout.splitlines()[-1] == "False False"
