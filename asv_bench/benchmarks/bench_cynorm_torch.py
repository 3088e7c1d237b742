"""cynorm's PyTorch adapter, its functional API on the same data (skipped without torch): CynormTorchGroupNorm, ..."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("cynorm.torch", prefix="CynormTorch", module=__name__))
