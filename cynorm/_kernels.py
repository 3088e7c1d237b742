"""Loads the fastest build of the kernels that this CPU runs.

The same source (_kernels.pxi) is compiled for baseline x86-64 (or any other architecture), x86-64-v3 and
x86-64-v4; every build gives bitwise identical results (the reduction order is written out in the source
and floating-point contraction is off), only their speed differs.  ``CYNORM_KERNELS=baseline`` (or
``x86_64_v3``, ``x86_64_v4``) forces one build, e.g. to compare them.
"""
import importlib
import os

from . import _kernels_baseline

# the builds by x86-64 level, fastest first
_BUILDS_BY_LEVEL = (("x86_64_v4", 4), ("x86_64_v3", 3), ("baseline", 0))


def available_builds():
    """Names of the builds that were compiled and that this CPU can run, fastest first."""
    level = _kernels_baseline.cpu_level()
    names = []
    for name, required in _BUILDS_BY_LEVEL:
        if required <= level:
            try:
                importlib.import_module(f"{__package__}._kernels_{name}")
            except ImportError:  # not compiled for this platform
                continue
            names.append(name)
    return names


def _load():
    forced = os.environ.get("CYNORM_KERNELS")
    builds = available_builds()
    if forced:
        if forced not in builds:
            raise ImportError(f"CYNORM_KERNELS={forced!r} is not available on this machine; choose from {builds}")
        name = forced
    else:
        name = builds[0]
    return name, importlib.import_module(f"{__package__}._kernels_{name}")


BUILD, _module = _load()
forward_rows = _module.forward_rows
forward_columns = _module.forward_columns
backward_rows = _module.backward_rows
backward_columns = _module.backward_columns
max_threads = _module.max_threads
HAVE_OPENMP = _module.HAVE_OPENMP
HAVE_FLOAT16 = _module.HAVE_FLOAT16
HAVE_STREAM = _module.HAVE_STREAM
FORWARD_QUAD_ROW = _module.FORWARD_QUAD_ROW
PREFETCHED_OUTPUT_ROWS = _module.PREFETCHED_OUTPUT_ROWS
address_of = _module.address_of
has_untouched_pages = _module.has_untouched_pages
float_coefficients_hold = _module.float_coefficients_hold
advise_huge_pages = _module.advise_huge_pages
half_to_float = _module.half_to_float
float_to_half = _module.float_to_half
