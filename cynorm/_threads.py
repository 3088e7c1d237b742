"""How many OpenMP threads the kernels use.

By default, as many as OpenMP allows now: all usable cores, or fewer under OMP_NUM_THREADS or a threadpoolctl
limit (``threadpool_limits(n, user_api="openmp")``).  ``set_num_threads`` overrides that for the process.
A framework's adapter may give its own count for the calls it makes (``framework_threads``), which
``set_num_threads`` still overrides.  A process forked from another runs the kernels on one thread unless
``set_num_threads`` is called in it (see _after_fork_in_child).
"""
import contextlib
import functools
import operator
import os
import threading

from . import _kernels

_requested = None
# the thread count of the framework whose adapter is making this thread's kernel calls (see framework_threads)
_framework = threading.local()
_forked = False   # this process was forked, maybe after OpenMP had started its threads


def _after_fork_in_child():
    """GNU OpenMP does not survive fork: once the parent has run a parallel region on several threads, the
    child's first region on several waits forever for threads it does not have (torch's own ops too).  A region
    on one thread needs none of them, as in torch's DataLoader workers.  The parent's count is dropped; a count
    set in the child applies."""
    global _requested, _forked
    _requested = None
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        return 1 if _forked else getattr(_framework, "count", None) or limit
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


def framework_threads(count_of_framework):
    """Decorates an adapter's function that calls the kernels: inside it, in its thread, they take
    ``count_of_framework()`` threads (a framework's own setting, such as ``torch.get_num_threads``; 0 leaves
    OpenMP's) unless ``set_num_threads`` has set a count.  OpenMP's count, which they take otherwise, is set for
    each thread: frameworks that keep theirs for the process would see their setting ignored in other threads
    than the one that made it."""
    def decorate(function):
        def run(*args, **kwargs):
            previous = getattr(_framework, "count", None)
            _framework.count = count_of_framework()
            try:
                return function(*args, **kwargs)
            finally:
                _framework.count = previous
        return functools.update_wrapper(run, function)
    return decorate
