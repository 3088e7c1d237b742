"""Tests of the Keras layers (cynorm.adapters.keras) on Keras's torch backend, where they call the PyTorch adapter.

Keras picks its backend once, when it is first imported, and the other test modules import it on TensorFlow: so
in the test run this module has a single test, which runs the module again in a process whose Keras runs on torch
(KERAS_BACKEND=torch), where it holds the tests below.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ON_TORCH_BACKEND = os.environ.get("KERAS_BACKEND") == "torch"
# The folder of a model with every layer, saved as a .keras file by Keras on TensorFlow, with an input and its output
SAVED_ON_TENSORFLOW = "CYNORM_TEST_SAVED_ON_TENSORFLOW"


def _every_layer_model(keras, layers):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 6)),
        keras.layers.Conv2D(6, 3, padding="same"),
        layers.GroupNormalization(groups=3, gamma_initializer="random_uniform"),
        layers.LayerNormalization(axis=[1, 3], beta_initializer="random_uniform"),
        layers.RMSNormalization(axis=1),
        layers.InstanceNormalization(gamma_initializer="random_uniform"),
    ])


def _save_on_tensorflow(folder):
    import keras

    from cynorm.adapters import keras as layers

    model = _every_layer_model(keras, layers)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 6)).astype("float32")
    model.save(os.path.join(folder, "model.keras"))
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "y.npy"), model.predict(x, verbose=0))


if not ON_TORCH_BACKEND:
    pytest.importorskip("torch")
    pytest.importorskip("keras")

    @pytest.mark.slow
    def test_keras_on_the_torch_backend(tmp_path):
        _save_on_tensorflow(tmp_path)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                                env={**os.environ, "KERAS_BACKEND": "torch", SAVED_ON_TENSORFLOW: str(tmp_path)},
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
        assert "skipped" not in result.stdout.strip().splitlines()[-1], result.stdout[-3000:]

else:
    import keras
    import torch
    from sklearn.datasets import load_digits

    import cynorm
    from cynorm import benchmarks as bench
    from cynorm import slow
    from cynorm.adapters import keras as ck
    from cynorm.adapters import torch as ct

    from _torch_util import kernel_calls, kernels_for_small_inputs  # noqa: F401 (fixtures)

    assert keras.backend.backend() == "torch"
    # (fit and predict may import TensorFlow where it is installed, for its data pipelines)
    TENSORFLOW_IMPORTED_WITH_THE_LAYERS = "tensorflow" in sys.modules

    def _reference(layer, x, weight, bias, upstream):
        """The float64 output and gradients (input, then the layer's trainable weights) of ``layer`` (built)."""
        eps = layer.epsilon
        if isinstance(layer, ck.GroupNormalization):
            axis = layer.axis
            y, *stats = slow.group_norm(x, layer.groups, weight, bias, axis=axis, eps=eps, return_stats=True)
            grads = slow.group_norm_backward(upstream, x, *stats, weight, axis=axis)
        elif isinstance(layer, ck.LayerNormalization):
            axis = tuple(np.atleast_1d(layer.axis))
            y, *stats = slow.layer_norm(x, weight, bias, axis=axis, eps=eps, return_stats=True)
            grads = slow.layer_norm_backward(upstream, x, *stats, weight, axis=axis)
        else:
            axis = tuple(np.atleast_1d(layer.axis))
            y, *stats = slow.rms_norm(x, weight, axis=axis, eps=eps, return_stats=True)
            grads = slow.rms_norm_backward(upstream, x, *stats, weight, axis=axis)
        dx, dweight, dbias = grads
        return y, [dx] + [g for g, p in ((dweight, weight), (dbias, bias)) if p is not None]

    def _output_and_gradients(layer, x, upstream):
        """The layer's output and the gradients of sum(output * upstream) for the input and every weight."""
        x = x.clone().requires_grad_()
        y = layer(x)
        (y.float() * upstream).sum().backward()
        return y.detach(), [x.grad] + [w.value.grad for w in layer.trainable_weights]

    def _random_weights(layer, seed):
        rng = np.random.default_rng(seed)
        for weight in layer.weights:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(weight.dtype))

    # name: (layer, input shape)
    CASES = {
        "group_channels_last": (lambda **kw: ck.GroupNormalization(groups=5, axis=3, **kw), (4, 6, 6, 10)),
        "group_channels_first": (lambda **kw: ck.GroupNormalization(groups=2, axis=1, **kw), (3, 4, 5, 6)),
        "group_sequence": (lambda **kw: ck.GroupNormalization(groups=3, **kw), (3, 7, 6)),
        "group_middle_axis": (lambda **kw: ck.GroupNormalization(groups=2, axis=2, **kw), (2, 3, 4, 5, 2)),
        "group_prime_channels": (lambda **kw: ck.GroupNormalization(groups=1, **kw), (2, 3, 1, 7)),
        "instance": (lambda **kw: ck.InstanceNormalization(axis=3, **kw), (2, 5, 5, 4)),
        "instance_channels_first": (lambda **kw: ck.InstanceNormalization(axis=1, **kw), (2, 4, 3, 5)),
        "layer_last_axis": (lambda **kw: ck.LayerNormalization(**kw), (4, 5, 16)),
        "layer_axis_1": (lambda **kw: ck.LayerNormalization(axis=1, **kw), (3, 6, 5, 4)),
        "layer_middle_axes": (lambda **kw: ck.LayerNormalization(axis=[1, 2], **kw), (3, 4, 5, 6)),
        "layer_split_axes": (lambda **kw: ck.LayerNormalization(axis=[1, 3], **kw), (3, 4, 5, 6)),
        "layer_trailing_axes": (lambda **kw: ck.LayerNormalization(axis=[-2, -1], **kw), (3, 4, 5, 6)),
        "layer_no_affine": (lambda **kw: ck.LayerNormalization(center=False, scale=False, **kw), (3, 8)),
        "layer_no_center": (lambda **kw: ck.LayerNormalization(center=False, **kw), (3, 8)),
        "rms_last_axis": (lambda **kw: ck.RMSNormalization(**kw), (4, 5, 16)),
        "rms_split_axes": (lambda **kw: ck.RMSNormalization(axis=[1, 3], **kw), (3, 4, 5, 6)),
    }

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    @pytest.mark.parametrize("case", sorted(CASES))
    def test_outputs_and_gradients_match_the_float64_reference(case, dtype, kernel_calls):
        make, shape = CASES[case]
        layer = make(dtype=dtype)
        layer.build(shape)
        _random_weights(layer, seed=0)
        rng = np.random.default_rng(1)
        # adversarial data: a large mean, a small spread
        x = torch.tensor(100 + rng.standard_normal(shape) * 0.01, dtype=getattr(torch, dtype))
        upstream = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
        x_before = x.clone()
        y, grads = _output_and_gradients(layer, x, upstream)
        assert {name: len(calls) for name, calls in kernel_calls.items()} == {"forward": 1, "backward": 1}
        assert torch.equal(x, x_before)
        assert y.dtype == x.dtype and y.shape == x.shape
        weight, bias = (None if w is None else keras.ops.convert_to_tensor(w).detach().double().numpy()
                        for w in layer._weight_and_bias())
        y_ref, grads_ref = _reference(layer, x.double().numpy(), weight, bias, upstream.double().numpy())
        tolerance = 1e-5 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(y.numpy(), y_ref, rtol=tolerance, atol=tolerance)
        assert len(grads) == len(grads_ref)
        for grad, grad_ref in zip(grads, grads_ref):
            scale = max(1.0, np.abs(grad_ref).max())
            np.testing.assert_allclose(grad.numpy(), grad_ref, rtol=tolerance, atol=tolerance * scale)

    @pytest.mark.parametrize("case", ["group_channels_last", "layer_axis_1", "rms_split_axes"])
    def test_non_contiguous_input(case, kernel_calls):
        """A strided view in: the output of its contiguous copy (to rounding: a layout may take another path)."""
        make, shape = CASES[case]
        layer = make()
        layer.build(shape)
        _random_weights(layer, seed=0)
        wide = torch.randn((shape[0], 2 * shape[1]) + shape[2:], generator=torch.Generator().manual_seed(0))
        x = wide[:, ::2]
        assert not x.is_contiguous()
        torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=1e-5, atol=1e-5)
        assert len(kernel_calls["forward"]) == 2

    @pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16"])
    @pytest.mark.parametrize("case", ["group_channels_last", "group_channels_first", "layer_last_axis",
                                      "rms_last_axis"])
    def test_half_precision_policies_compute_in_float32(case, policy, kernel_calls):
        """As Keras's normalizations do: float32 kernels (the input converted), the output in the compute dtype
        (one rounding of the float32 result) and the gradients in the weights' and the input's dtypes."""
        make, shape = CASES[case]
        layer, in_float32 = make(dtype=policy), make(dtype="float32")
        for each in (layer, in_float32):
            each.build(shape)
        _random_weights(layer, seed=0)
        in_float32.set_weights([w.astype("float32") for w in layer.get_weights()])
        compute_dtype = getattr(torch, layer.compute_dtype)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(compute_dtype)
        # (the output's gradient reaches the half precision layer in its compute dtype)
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(compute_dtype).float()
        y, grads = _output_and_gradients(layer, x, upstream)
        y_float32, grads_float32 = _output_and_gradients(in_float32, x.float(), upstream)
        assert len(kernel_calls["forward"]) == 2 and len(kernel_calls["backward"]) == 2
        assert y.dtype == compute_dtype and grads[0].dtype == compute_dtype
        assert [g.dtype for g in grads[1:]] == [getattr(torch, layer.variable_dtype)] * len(grads[1:])
        torch.testing.assert_close(y, y_float32.to(compute_dtype), rtol=0, atol=0)
        torch.testing.assert_close(grads[0], grads_float32[0].to(compute_dtype), rtol=0, atol=0)
        for grad, grad_float32 in zip(grads[1:], grads_float32[1:]):
            torch.testing.assert_close(grad, grad_float32.to(grad.dtype), rtol=0, atol=0)

    def test_small_inputs_follow_the_pytorch_adapter(kernel_calls):
        """With the PyTorch adapter's routing on, a small input runs torch's function: torch's results."""
        assert ct.use_torch_for_small_inputs(True) is False
        layer = ck.LayerNormalization(epsilon=1e-5)
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
        y = layer(x)
        assert "forward" not in kernel_calls
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), eps=1e-5), rtol=0, atol=0)

    def _digits():
        digits = load_digits()
        images = (digits.images[:256, :, :, None] / 16.0).astype("float32")
        return images, digits.target[:256]

    def _tutorial_model(norm):
        """A model of the TensorFlow Addons tutorial, without its dropout, for 8x8 digits."""
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(10, 3), norm, keras.layers.Flatten(),
                                 keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])

    # ours, the Keras layer computing the same
    TUTORIAL_NORMS = {
        "group": (lambda: ck.GroupNormalization(groups=5, axis=3),
                  lambda: keras.layers.GroupNormalization(groups=5, axis=3)),
        "instance": (lambda: ck.InstanceNormalization(axis=3, gamma_initializer="random_uniform",
                                                      beta_initializer="random_uniform"),
                     lambda: keras.layers.GroupNormalization(groups=-1, axis=3)),
        "layer": (lambda: ck.LayerNormalization(axis=3), lambda: keras.layers.LayerNormalization(axis=3)),
    }

    def _fit(model, images, labels, jit_compile=False):
        model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
        history = model.fit(images, labels, batch_size=64, epochs=3, shuffle=False, verbose=0)
        return history.history["loss"]

    @pytest.mark.parametrize("norm", sorted(TUTORIAL_NORMS))
    def test_tutorial_model_trains_as_with_keras_layers(norm, kernel_calls):
        images, labels = _digits()
        keras.utils.set_random_seed(0)
        make_ours, make_theirs = TUTORIAL_NORMS[norm]
        ours, theirs = _tutorial_model(make_ours()), _tutorial_model(make_theirs())
        theirs.set_weights(ours.get_weights())
        losses_ours, losses_theirs = _fit(ours, images, labels), _fit(theirs, images, labels)
        assert kernel_calls.get("forward") and kernel_calls.get("backward")
        np.testing.assert_allclose(losses_ours, losses_theirs, rtol=1e-4)
        assert losses_ours[-1] < losses_ours[0]
        for w_ours, w_theirs in zip(ours.get_weights(), theirs.get_weights()):
            np.testing.assert_allclose(w_ours, w_theirs, rtol=1e-4, atol=1e-5)

    def test_group_normalization_right_after_the_input_trains():
        """Its input records no gradient and its parameters do: with small inputs routed to torch's function, as by
        default, torch's channels-last backward crashed the process (see the PyTorch adapter's
        _torch_group_norm_backward_crashes)."""
        assert ct.use_torch_for_small_inputs(True) is False
        images, labels = _digits()
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 1)), ck.GroupNormalization(groups=1, axis=3),
                                  keras.layers.Conv2D(4, 3), ck.GroupNormalization(groups=2, axis=3),
                                  keras.layers.Flatten(), keras.layers.Dense(10)])
        gamma = model.layers[0].gamma.numpy().copy()
        losses = _fit(model, images, labels)
        assert losses[-1] < losses[0] and not np.array_equal(model.layers[0].gamma.numpy(), gamma)

    def test_gradient_penalty_gives_keras_gradients(kernel_calls):
        """A WGAN-GP critic step: the PyTorch adapter's gradients, recorded with create_graph=True, are
        differentiated again as those of Keras's layers are."""
        images = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 6, 6, 8)))

        def penalty_step(normalization):
            keras.utils.set_random_seed(0)
            critic = keras.Sequential([keras.Input((6, 6, 8)), keras.layers.Conv2D(8, 3, dtype="float64"),
                                       normalization, keras.layers.Flatten(dtype="float64"),
                                       keras.layers.Dense(1, dtype="float64")])
            x = images.clone().requires_grad_()
            score = critic(x)
            grad, = torch.autograd.grad(score.sum(), x, create_graph=True)
            loss = score.mean() + 10 * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
            return torch.autograd.grad(loss, [weight.value for weight in critic.trainable_weights])

        ours = penalty_step(ck.GroupNormalization(groups=4, dtype="float64"))
        theirs = penalty_step(keras.layers.GroupNormalization(groups=4, dtype="float64"))
        assert kernel_calls.get("forward") and kernel_calls.get("backward")
        for got, expected in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)

    def test_jit_compiled_training_matches_eager():
        """Keras compiles the torch backend's steps with torch.compile, which takes the adapter's operators."""
        images, labels = _digits()
        keras.utils.set_random_seed(0)
        eager = _tutorial_model(ck.GroupNormalization(groups=5, axis=3))
        compiled = _tutorial_model(ck.GroupNormalization(groups=5, axis=3))
        compiled.set_weights(eager.get_weights())
        losses_eager, losses_compiled = _fit(eager, images, labels), _fit(compiled, images, labels, jit_compile=True)
        assert compiled.jit_compile
        np.testing.assert_allclose(losses_compiled, losses_eager, rtol=1e-4)
        for w_compiled, w_eager in zip(compiled.get_weights(), eager.get_weights()):
            np.testing.assert_allclose(w_compiled, w_eager, rtol=1e-4, atol=1e-5)

    def test_keras_file_round_trip(tmp_path):
        model = _every_layer_model(keras, ck)
        x = np.random.default_rng(0).standard_normal((4, 8, 8, 6)).astype("float32")
        model.save(tmp_path / "model.keras")
        loaded = keras.saving.load_model(tmp_path / "model.keras")
        assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))

    def test_keras_file_saved_on_tensorflow():
        """A model trained on TensorFlow serves on torch: the file names our layers, which load and compute the same."""
        folder = os.environ.get(SAVED_ON_TENSORFLOW)
        if folder is None:
            pytest.skip(f"{SAVED_ON_TENSORFLOW} is set by the test run on TensorFlow")
        model = keras.saving.load_model(os.path.join(folder, "model.keras"))
        assert [type(layer) for layer in model.layers[1:]] == [
            ck.GroupNormalization, ck.LayerNormalization, ck.RMSNormalization, ck.InstanceNormalization]
        np.testing.assert_allclose(model.predict(np.load(os.path.join(folder, "x.npy")), verbose=0),
                                   np.load(os.path.join(folder, "y.npy")), rtol=1e-5, atol=1e-5)

    def test_tensorflow_is_not_imported():
        """On the torch backend the layers need torch and Keras only."""
        assert not TENSORFLOW_IMPORTED_WITH_THE_LAYERS

    BENCH_CASES = (
        bench.Case("group_norm", (2, 8, 4, 4), bench.CHANNELS_LAST, num_groups=4, quick=True),
        bench.Case("instance_norm", (2, 3, 4, 4), bench.CHANNELS_FIRST, quick=True),
        bench.Case("layer_norm", (3, 5, 4), bench.MIDDLE_AXIS, quick=True),
        bench.Case("rms_norm", (4, 16), bench.LAST_AXIS, quick=True),
    )
    # Keras's own LayerNormalization (3.15) fails on the torch backend over axes before the last: it hands them to
    # torch's layer_norm, which normalizes trailing axes ("Given normalized_shape=[5], expected input with shape
    # [*, 5]").  Ours moves them to the end first.
    KERAS_FAILS_ON = {("layer_norm", bench.MIDDLE_AXIS)}

    @pytest.mark.parametrize("name", ["keras", "cynorm.keras"])
    def test_bench_contenders_compute_the_case_operation(name, kernel_calls):
        """`cynorm bench`'s Keras contenders run on torch here: forwards under no_grad, training steps with the
        gradients of x and the weights."""
        contender = bench.CONTENDERS[name]
        contender.check()
        for case in BENCH_CASES:
            if name == "keras" and (case.operation, case.layout) in KERAS_FAILS_ON:
                continue
            workload = bench.make_workload(case, "float32")
            runner = contender.prepare(workload, torch.get_num_threads())
            groups = (case.num_groups,) if case.operation == "group_norm" else ()
            params = (workload.weight,) if case.operation == "rms_norm" else (workload.weight, workload.bias)
            expected = getattr(slow, case.operation)(workload.x, *groups, *params, axis=case.axis, eps=bench.EPS)
            np.testing.assert_allclose(runner.to_array(runner.forward()), expected, rtol=1e-4, atol=1e-4,
                                       err_msg=case.label)
            assert len(runner.training_step()) == 1 + len(params)
        assert ("forward" in kernel_calls) == (name == "cynorm.keras")

    def test_bench_command_with_keras_on_torch(tmp_path, monkeypatch):
        monkeypatch.setattr(bench, "MIN_SAMPLE_SECONDS", 0.0)
        monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)
        json_path = tmp_path / "bench.json"
        threads = torch.get_num_threads()
        try:
            status = bench.main(["--quick", "--repeat", "1", "--threads", "1", "--no-progress", "--peers",
                                 "keras,cynorm.keras", "--json", str(json_path)], cases=BENCH_CASES)
        finally:
            torch.set_num_threads(threads)
            cynorm.set_num_threads(None)
        assert status == 0
        rows = json.loads(json_path.read_text())["results"]
        assert len(rows) == 2 * len(BENCH_CASES)
        for row in rows:
            assert "cynorm.keras" in row["median_ms"]
            assert "keras" in row["median_ms"] or (row["operation"], row["layout"]) in KERAS_FAILS_ON
