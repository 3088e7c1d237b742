"""The TensorFlow Addons "Normalizations" tutorial, run with the cynorm Keras layers and with Keras's own.

The tutorial trains three small convolutional classifiers that differ only in their normalization layer::

    Reshape(28, 28, 1) -> Conv2D(10, 3x3) -> normalization -> Flatten -> Dense(128, relu) -> Dropout(0.2)
    -> Dense(10, softmax)

with GroupNormalization(groups=5, axis=3), InstanceNormalization(axis=3, random-uniform gamma and beta) or
LayerNormalization(axis=3), Adam and sparse categorical cross-entropy. This script trains each of them with
``cynorm.adapters.keras`` and with Keras's layers (``keras.layers.GroupNormalization(groups=-1)`` stands in
for Addons' InstanceNormalization) and prints test accuracy and time per epoch side by side.

MNIST needs a download, so the default data set is scikit-learn's bundled 8x8 digits, upsampled 3x (nearest
neighbour) to 24x24 and framed by a 2-pixel border: 28x28 images with the digit in the middle, as MNIST frames
its 20x20 digits, so the model, its (batch, 26, 26, 10) normalized tensors and its cost are the tutorial's.
``--dataset mnist`` uses ``keras.datasets.mnist`` where a network (or a cached copy) is available.

Run it as ``python -m cynorm.adapters.keras_tutorial [--dataset {digits,mnist}] [--epochs N]``, on the Keras backend
that ``KERAS_BACKEND`` names (TensorFlow by default; ``torch`` too).
"""
import argparse
import functools
import time
import types

import numpy as np

# (Keras and TensorFlow are imported where they are used: `cynorm tutorial --help` answers at once, without
# TensorFlow's start-up and its log lines)

IMAGE_SIZE = 28
MODEL_NAMES = ("GroupNormalization", "InstanceNormalization", "LayerNormalization")


@functools.cache
def implementations():
    """The layers of each implementation: ``{"cynorm": cynorm.adapters.keras, "keras": Keras's layers}``."""
    import keras

    from . import keras as cynorm_layers

    # Keras 3 has no InstanceNormalization; its GroupNormalization with one group per channel computes the same.
    keras_layers = types.SimpleNamespace(
        GroupNormalization=keras.layers.GroupNormalization,
        InstanceNormalization=functools.partial(keras.layers.GroupNormalization, groups=-1),
        LayerNormalization=keras.layers.LayerNormalization,
    )
    return {"cynorm": cynorm_layers, "keras": keras_layers}


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's 8x8 digits as 28x28 float32 images in [0, 1]: ((x_train, y_train), (x_test, y_test))."""
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_load_digits()
    images = digits.images.astype(np.float32) / 16.0
    upsampled = images.repeat(3, axis=1).repeat(3, axis=2)
    border = (IMAGE_SIZE - upsampled.shape[1]) // 2
    framed = np.pad(upsampled, ((0, 0), (border, border), (border, border)))
    x_train, x_test, y_train, y_test = train_test_split(framed, digits.target, test_size=test_fraction,
                                                        random_state=seed, stratify=digits.target)
    return (x_train, y_train), (x_test, y_test)


def load_mnist():
    """keras.datasets.mnist as float32 images in [0, 1] (downloads it on first use)."""
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return (x_train.astype(np.float32) / 255.0, y_train), (x_test.astype(np.float32) / 255.0, y_test)


DATASETS = {"digits": load_digits, "mnist": load_mnist}


def build_model(model_name, layers):
    """The tutorial's model with the normalization `model_name` taken from `layers` (a module or namespace)."""
    import keras

    normalizations = {
        "GroupNormalization": lambda: layers.GroupNormalization(groups=5, axis=3),
        "InstanceNormalization": lambda: layers.InstanceNormalization(
            axis=3, center=True, scale=True, beta_initializer="random_uniform",
            gamma_initializer="random_uniform"),
        "LayerNormalization": lambda: layers.LayerNormalization(axis=3, center=True, scale=True),
    }
    model = keras.Sequential([
        keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE)),
        keras.layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1)),
        keras.layers.Conv2D(filters=10, kernel_size=(3, 3), data_format="channels_last"),
        normalizations[model_name](),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ], name=model_name)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train_and_evaluate(model_name, implementation, data, *, epochs=3, batch_size=32, seed=0):
    """Train one tutorial model; return its test accuracy and the median seconds per epoch.

    The first epoch includes tracing the training step, so it is left out of the median when there are more.

    The seed fixes the initial weights, the shuffling and dropout; TensorFlow ops should be deterministic
    (``tf.config.experimental.enable_op_determinism()``) for the accuracy to be reproducible.
    """
    import keras

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = build_model(model_name, implementations()[implementation])
    starts, seconds = [], []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: starts.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: seconds.append(time.perf_counter() - starts[-1]))
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, callbacks=[timer], verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return {"accuracy": float(accuracy), "seconds_per_epoch": float(np.median(seconds[1:] or seconds))}


def main(argv=None):
    """Command-line entry point: train the tutorial's three models with both implementations, print a table."""
    parser = argparse.ArgumentParser(prog="cynorm tutorial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                        help="digits: scikit-learn's bundled 8x8 digits, upsampled (default); mnist: "
                             "keras.datasets.mnist (needs a network or a cached copy)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model (default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: 32")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and dropout (default: 0)")
    args = parser.parse_args(argv)

    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    data = DATASETS[args.dataset]()
    print(f"{args.dataset}: {len(data[0][1])} training and {len(data[1][1])} test images, {args.epochs} epochs, "
          f"Keras on {keras.backend.backend()}")
    print(f"{'model':<22} {'cynorm acc':>10} {'keras acc':>10} {'cynorm s/epoch':>15} {'keras s/epoch':>14}")
    for model_name in MODEL_NAMES:
        ours, theirs = (train_and_evaluate(model_name, implementation, data, epochs=args.epochs,
                                           batch_size=args.batch_size, seed=args.seed)
                        for implementation in ("cynorm", "keras"))
        print(f"{model_name:<22} {ours['accuracy']:>10.4f} {theirs['accuracy']:>10.4f} "
              f"{ours['seconds_per_epoch']:>15.3f} {theirs['seconds_per_epoch']:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
