"""cynorm.slow, the float64 NumPy reference, for scale: ReferenceGroupNorm, ...; it ignores the thread count."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("reference", prefix="Reference", module=__name__, threads=(1,)))
