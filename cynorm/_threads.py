"""How many OpenMP threads the kernels use.

By default, as many as OpenMP allows now: all usable cores, or fewer under OMP_NUM_THREADS or a threadpoolctl
limit (``threadpool_limits(n, user_api="openmp")``).  ``set_num_threads`` overrides that for the process.
"""
import contextlib
import operator

from . import _kernels

_requested = None


def _checked_count(n):
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"The number of threads must be an integer, got {n!r}") from None
    if n == 0:
        raise ValueError("The number of threads must be positive, or negative to count back from the maximum "
                         "(-1 is all cores), got 0")
    return n


def get_num_threads():
    """The number of threads the next kernel call will use."""
    limit = max(1, _kernels.max_threads())
    if _requested is None:
        return limit
    if _requested < 0:
        return max(1, limit + 1 + _requested)
    return _requested


def set_num_threads(n):
    """Use ``n`` threads from now on; a negative ``n`` counts back from the maximum (-1: all, -2: all but one),
    and ``None`` restores the default."""
    global _requested
    _requested = None if n is None else _checked_count(n)


@contextlib.contextmanager
def num_threads(n):
    """``with cynorm.num_threads(1): ...`` runs the block with ``n`` threads, then restores the setting."""
    global _requested
    previous = _requested
    set_num_threads(n)
    try:
        yield
    finally:
        _requested = previous
