"""torch.nn.functional on the same data (skipped without torch): TorchGroupNorm, ..., TorchRMSNorm."""
from ._suite import benchmark_classes

globals().update(benchmark_classes("torch", prefix="Torch", module=__name__))
