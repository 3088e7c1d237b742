"""cynorm's Keras layers on the same data, on the backend Keras runs on (in tf.function on TensorFlow, eagerly
under ``KERAS_BACKEND=torch``; skipped without Keras): CynormKerasGroupNorm, ..."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("cynorm.keras", prefix="CynormKeras", module=__name__))
