"""cynorm: fast, exact CPU normalization kernels (group, instance, layer and RMS norm) with a NumPy API.

Framework layers live in ``cynorm.adapters.torch`` and ``cynorm.adapters.keras``; importing cynorm itself
never imports torch or tensorflow.
"""
from ._api import (
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from ._kernels import HAVE_OPENMP
from ._threads import get_num_threads, num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "group_norm", "instance_norm", "layer_norm", "rms_norm",
    "group_norm_backward", "instance_norm_backward", "layer_norm_backward", "rms_norm_backward",
    "get_num_threads", "set_num_threads", "num_threads", "HAVE_OPENMP",
]
