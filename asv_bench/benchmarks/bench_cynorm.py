"""cynorm's NumPy API with a preallocated ``out=``: GroupNorm, InstanceNorm, LayerNorm, RMSNorm."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("cynorm", prefix="", module=__name__,
                                   dtypes=("float16", "float32", "float64")))
