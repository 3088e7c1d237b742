"""Keras layers inside tf.function on the same data (skipped without tensorflow): KerasGroupNorm, ..."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("keras", prefix="Keras", module=__name__))
