"""The NumPy API: validates arguments, maps shapes onto the kernels' two views, allocates outputs.

Nothing reaches the compiled kernels before it has been checked here: they run without bounds checks.
"""
import ctypes
import functools
import math
import numbers
import operator
import os
from typing import NamedTuple

import numpy as np

from . import _kernels
from ._blocks import numpy_block_pool
from ._threads import get_num_threads

__all__ = [
    "group_norm", "instance_norm", "layer_norm", "rms_norm",
    "group_norm_backward", "instance_norm_backward", "layer_norm_backward", "rms_norm_backward",
]


class _Geometry(NamedTuple):
    """How a normalization maps onto the kernels (see cynorm/_kernels.pyx for the two views)."""
    rows: bool                  # rows view if True, columns view otherwise
    groups: int                 # groups per sample
    chans_per_group: int = 1    # rows view
    inner: int = 1              # rows view: elements per channel
    n_rows: int = 0             # columns view: rows reduced over
    n_cols: int = 0             # columns view
    cols_per_channel: int = 1   # columns view
    affine_per_row: bool = False  # columns view: weight indexed by row (layer norm over a middle axis)


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------

def _float_array(a, name):
    arr = a if type(a) is np.ndarray else np.asarray(a)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"`{name}` must be a float16, float32 or float64 array, got dtype {arr.dtype}")
    return arr


def _compute_dtype(dtype):
    """float16 is computed in float32; other dtypes as they are, in native byte order."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else np.dtype(dtype.type)


def _check_eps(eps):
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"`eps` must be a real number, got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _integer(value, name):
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an integer, got {value!r}") from None


def _axis(axis, ndim):
    index = _integer(axis, "axis")
    if not -ndim <= index < ndim:
        raise ValueError(f"`axis` {axis} is out of range for an input with {ndim} dimensions")
    return index % ndim


def _channel_axis(axis, ndim):
    index = _axis(axis, ndim)
    if index == 0:
        raise ValueError(f"`axis` must be a channel axis, not 0 (the batch axis), got {axis}")
    return index


def _normalized_axes(axis, ndim):
    """A sorted tuple of contiguous axes from an int or a sequence of ints."""
    if type(axis) is int and -ndim <= axis < ndim:
        return (axis % ndim,)
    if isinstance(axis, (list, tuple)):
        if len(axis) == 0:
            raise ValueError("`axis` must name at least one axis, got an empty sequence")
        axes = tuple(_axis(a, ndim) for a in axis)
    else:
        axes = (_axis(axis, ndim),)
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` contains duplicate axes: {axis}")
    axes = tuple(sorted(axes))
    if axes[-1] - axes[0] != len(axes) - 1:
        raise ValueError(f"`axis` must name contiguous axes, got {axis}")
    return axes


def _check_groups(num_groups, channels):
    groups = _integer(num_groups, "num_groups")
    if not 1 <= groups <= channels:
        raise ValueError(f"`num_groups` must be between 1 and the number of channels ({channels}), got {num_groups}")
    if channels % groups:
        raise ValueError(f"The number of channels ({channels}) must be divisible by `num_groups` ({num_groups})")
    return groups


@functools.lru_cache(maxsize=64)
def _constant(size, dtype, value):
    """A read-only array standing in for a missing weight or bias, shared between calls."""
    arr = np.full(size, value, dtype=dtype)
    arr.flags.writeable = False
    return arr


def _param(param, name, shape, dtype, default):
    """A flat contiguous parameter in the compute dtype; `default`-filled when None."""
    if param is None:
        return _constant(math.prod(shape), dtype, default)
    arr = _float_array(param, name)
    if arr.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype).reshape(-1)


def _stats(stats, name, shape):
    arr = _float_array(stats, name)
    if arr.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)} (as returned by the forward), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)


# Below this many elements per thread, waking another thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 32768


def _thread_count(size):
    """Threads for a call on `size` elements; results do not depend on it, only the speed does."""
    return max(1, min(get_num_threads(), size // _MIN_ELEMENTS_PER_THREAD))


# The most of a last-level cache that the kernels count on, and what they count on where the OS reports no size.
# A larger cache is a server's, shared by the many cores of its socket (and, in a VM, by other tenants' VMs): on a
# 2-vCPU VM of a Xeon whose L3 Linux reports as 480 MiB, one thread summed arrays of 4-64 MiB at 25-27 GB/s and
# of 256 MiB at 15 (from memory), and GroupNorm (8,256,56,56) training steps through the PyTorch adapter ran
# 1.24-1.28x (channels-last) and 1.65-1.71x (channels-first) torch's counting on 32 MiB, 1.00-1.02x and 1.37-1.40x
# counting on 64 MiB, 0.91-0.95x and 1.18-1.27x counting on all of it (each in processes of its own).
_CACHE_COUNTED_ON_AT_MOST_BYTES = 32 * 2 ** 20
_LINUX_CACHE_DIRECTORY = "/sys/devices/system/cpu/cpu0/cache"
_SIZE_SUFFIXES = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def _last_level_cache_bytes(cache_directory=_LINUX_CACHE_DIRECTORY):
    """The size of the CPU's last-level cache as Linux reports it, at most _CACHE_COUNTED_ON_AT_MOST_BYTES (and
    that where there is no report to read: other systems).  (Python's os.sysconf knows no names for cache sizes.)"""
    size = _linux_last_level_cache_bytes(cache_directory)
    return min(size, _CACHE_COUNTED_ON_AT_MOST_BYTES) if size else _CACHE_COUNTED_ON_AT_MOST_BYTES


def _linux_last_level_cache_bytes(cache_directory):
    """The size of the highest level of data cache that Linux describes in `cache_directory` (index0, index1, ...,
    each with its level, type and a size such as "2048K"), or 0 where there is none to read."""
    sizes_by_level = {}
    try:
        for index in os.listdir(cache_directory):
            folder = os.path.join(cache_directory, index)
            if index.startswith("index") and _read_text(folder, "type") != "Instruction":
                size = _read_text(folder, "size")
                sizes_by_level[int(_read_text(folder, "level"))] = (int(size.rstrip("KMG"))
                                                                    * _SIZE_SUFFIXES.get(size[-1], 1))
    except (OSError, ValueError, IndexError):   # not Linux, or a file missing or written otherwise
        return 0
    return sizes_by_level[max(sizes_by_level)] if sizes_by_level else 0


def _read_text(folder, name):
    with open(os.path.join(folder, name)) as file:
        return file.read().strip()


# Outputs are written with streaming stores, each line without being read first, when the call's arrays cannot
# all stay in the last-level cache anyway: a forward's from half the cache's size (x and y fill it), a backward's
# from a sixth (dy, x and dx fill half of it: it reads two arrays for each it writes, and in a training step it
# finds the cache holding the forward's output).  Smaller outputs stay in cache for the next pass or layer.
# The same sizes decide whether the kernels ask for their input's rows ahead of use (`prefetch`): below them
# the input is mostly in cache already, and the requests cost more than they saved (a forward of 8 MiB on a
# 32 MiB L3 1.08-1.17x faster without them, 12 MiB 1.06-1.12x; 25 MiB 1.03-1.06x faster with them).
# Thresholds measured on a 32 MiB L3 (Zen 5); the figures are in the README, "Builds and threads".
_LAST_LEVEL_CACHE_BYTES = _last_level_cache_bytes()
_FORWARD_STREAM_FROM_BYTES = _LAST_LEVEL_CACHE_BYTES // 2
# The rows view's forward on rows whose output's lines are asked for ahead too (see the kernels'
# PREFETCHED_OUTPUT_MIN_ROW_BYTES) asks for its rows from three eighths of the cache's size in builds without
# AVX-512, measured on a Zen 3, whose memory is slower than the Zen 5's: layer norm forwards of 12 MiB
# 1.08-1.32x faster ((4096,768) 1.09-1.32x in six processes, (3072,1024) 1.24-1.25x, (768,4096)
# 1.14-1.30x, (1536,2048) 1.08-1.09x); of 8 MiB (2048,1024) 1.11-1.19x but (1024,2048) 0.90-0.94x; 4 MiB
# (1024,1024) 0.81x, in cache.
_FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES = (_FORWARD_STREAM_FROM_BYTES if _kernels.BUILD == "x86_64_v4"
                                           else _LAST_LEVEL_CACHE_BYTES * 3 // 8)
_BACKWARD_STREAM_FROM_BYTES = _LAST_LEVEL_CACHE_BYTES // 6
# The columns view's forward (channels-last group and instance norm, layer norm over a middle axis) streams its
# output from a quarter of the cache's size in builds without AVX-512, measured on a 2-vCPU Zen 3 VM whose share of
# the 32 MiB L3 held about 12-16 MiB (a plain read's pace fell from 50 GB/s at 12 MiB to 35 at 16 and 18 at 24):
# channels-last GroupNorm forwards of 4-10 MiB alone 1.18-1.62x faster streamed ((1,4096,512) 1.39x, (2,4096,320)
# 1.53x, (4,1024,256) 1.62x, (4,4096,128) 1.18x; 1-3 MiB 1.07-1.13x), and followed by torch's SiLU of the output,
# which then reads it from memory, 1.03-1.05x at 8-10 MiB (0.95-1.04x at 4 MiB).  Their input is still asked for
# ahead from half the cache's size only: asked for too, streamed forwards of 4-10 MiB took 0.95-1.19x as long.
# (Layer norm over a middle axis of 8-9 MiB, which the columns view also computes, ran 0.96-1.01x: the same.)
_COLUMNS_FORWARD_STREAM_FROM_BYTES = (_FORWARD_STREAM_FROM_BYTES if _kernels.BUILD == "x86_64_v4"
                                      else _LAST_LEVEL_CACHE_BYTES // 4)

# CYNORM_HUGE_PAGES=1 asks for transparent huge pages on fresh large outputs.  Off by default: it helps where
# huge pages are at hand, and costs more than it saves where the OS must first assemble or back them.
_HUGE_PAGES = os.environ.get("CYNORM_HUGE_PAGES", "0") == "1"


def _prepare_large_output(address, nbytes, stream_from_bytes):
    """Readies the kernel's output buffer, `nbytes` at `address`; returns whether the kernels should stream
    their stores: from `stream_from_bytes` on, if the memory is in use.

    A fresh buffer (its pages not yet touched: a new mapping from the allocator) is not streamed, since its
    first writes fault the pages in and streaming past the freshly zeroed lines measured slower; with
    CYNORM_HUGE_PAGES=1 it is offered to the OS as transparent huge pages, which fault in 2 MiB at a time.
    """
    if nbytes < stream_from_bytes:
        return False
    if _kernels.has_untouched_pages(address, nbytes):
        if _HUGE_PAGES:
            _kernels.advise_huge_pages(address, nbytes)
        return False
    return _kernels.HAVE_STREAM


def _output(out, like, name):
    """`out` checked against `like`, or a new array like it."""
    if out is None:
        return np.empty(like.shape, like.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"`{name}` must be a NumPy array, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"`{name}` must have shape {like.shape}, got {out.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"`{name}` must have dtype {like.dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"`{name}` must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"`{name}` is read-only")
    return out


def _flat_input(arr, dtype, result, result_is_new):
    """arr as a flat C-contiguous array of `dtype` that the kernel may read while writing `result` (or a chunk
    loop, reading each chunk before writing it): the very same memory (in place) is fine, a partial overlap gets
    a private copy."""
    flat = np.ascontiguousarray(arr, dtype=dtype).reshape(-1)
    if (not result_is_new and np.may_share_memory(flat, result)
            and flat.__array_interface__["data"][0] != result.__array_interface__["data"][0]):
        flat = flat.copy()
    return flat


def _flat_result(result, dtype):
    """Where the kernel writes: `result` itself, or a compute-dtype buffer that _store copies back."""
    return result.reshape(-1) if result.dtype == dtype else np.empty(result.size, dtype)


def _store(result, flat):
    """Copies the kernel's compute-dtype output into `result` if the kernel did not write there."""
    if flat.dtype != result.dtype:
        result[...] = flat.reshape(result.shape)
    return result


# float16 data is computed in float32 a chunk at a time: each chunk is widened into float32 buffers with vector
# instructions, computed there, and its results rounded back into the float16 output, so that the float32 copies
# stay in cache instead of making passes over whole arrays twice the size.  A chunk holds whole samples, or in the
# rows view, where a sample can be split, a run of a sample's rows (groups).  The size is fixed, whatever the
# machine and the threads: the backward adds its parameter gradients up chunk by chunk, and their bits must depend
# on neither.  (Compilers without _Float16, and float16 of the other byte order, leave the conversions to NumPy,
# whole.)  On a Zen 3 (32 MiB L3), chunks of 2**17-2**20 values ran within 10 % of each other on GroupNorm
# (8,256,56,56) and LayerNorm (4096,768) and (8,512,1024); 2**21 up to 1.4x slower, 2**22 up to 3.5x; the whole
# arrays, in one chunk, 3-5x.
_HALF_CHUNK_VALUES = 2 ** 19


class _HalfChunk(NamedTuple):
    """Values of a float16 call computed together (see _half_chunks)."""
    first: int             # the chunk's first value
    values: int            # how many it holds
    first_stat: int        # its first statistic
    geometry: _Geometry    # how the kernels see it
    first_param: int       # the parameter its first row starts at (a run of rows), else 0


def _half_chunks(geometry, size):
    """The chunks of `size` values of `geometry`: as many whole samples as _HALF_CHUNK_VALUES holds, at least one;
    in the rows view, samples larger than that go in runs of as many of their rows as it holds, at least one,
    each run seen as a sample whose groups are those rows, with the weight's channels from its first row's."""
    if size == 0:   # (groups may be of no values)
        return
    row = _group_size(geometry)
    sample = row * geometry.groups
    if geometry.rows and sample > _HALF_CHUNK_VALUES and geometry.groups > 1:
        rows_per_run = max(1, _HALF_CHUNK_VALUES // row)
        for first_sample in range(0, size, sample):
            for group in range(0, geometry.groups, rows_per_run):
                rows = min(rows_per_run, geometry.groups - group)
                first = first_sample + group * row
                yield _HalfChunk(first, rows * row, first // row, geometry._replace(groups=rows),
                                 group * geometry.chans_per_group)
        return
    per_chunk = max(1, _HALF_CHUNK_VALUES // sample) * sample
    for first in range(0, size, per_chunk):
        yield _HalfChunk(first, min(per_chunk, size - first), first // sample * geometry.groups, geometry, 0)


def _float_chunk_buffers(chunks, count):
    """`count` float32 buffers, each for the largest of `chunks`: views of a block of the chunk pool, in use while
    any of them lives, if they are of chunk size and the pool has room, else arrays of their own.  (Buffers made
    afresh at each call cost their pages' faults each time wherever the C library gives large freed blocks back
    to the OS, as glibc does by default: 950 faults and 2.5 ms of a 4.8 ms GroupNorm (8,256,56,56) forward on a
    Zen 3.)"""
    largest = max((chunk.values for chunk in chunks), default=0)
    pooled = None
    if largest <= _HALF_CHUNK_VALUES:
        pooled = _chunk_pool.take(count * 4 * _HALF_CHUNK_VALUES, _float32_rows, count)
    return pooled or [np.empty(largest, np.float32) for _ in range(count)]


def _float32_rows(block, count):
    """A block's memory as `count` float32 arrays of equal size."""
    return list(block.view(np.float32).reshape(count, -1))


# The float16 calls' chunk buffers: a block per call running at once (up to the limit), of 2 or 3 buffers.
_chunk_pool = numpy_block_pool(limit=64 * 2 ** 20, allocate=lambda nbytes: np.empty(nbytes, np.uint8)[:])


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------

# (cached: pure functions of a few ints, which the PyTorch adapter asks for on every call)

@functools.lru_cache(maxsize=256)
def _group_geometry(shape, axis, groups):
    """(N, A, C, B) around the channel axis; channels-first (A == 1) is the rows view."""
    channels = shape[axis]
    before = math.prod(shape[1:axis])
    after = math.prod(shape[axis + 1:])
    if before == 1:
        return _Geometry(rows=True, groups=groups, chans_per_group=channels // groups, inner=after)
    return _Geometry(rows=False, groups=groups, n_rows=before, n_cols=channels * after, cols_per_channel=after)


@functools.lru_cache(maxsize=256)
def _layer_geometry(shape, axes):
    """Normalized axes followed by others (a middle axis) are the columns view, one column per group."""
    length = math.prod(shape[axes[0]:axes[-1] + 1])
    after = math.prod(shape[axes[-1] + 1:])
    if after == 1:
        return _Geometry(rows=True, groups=1, chans_per_group=length, inner=1)
    return _Geometry(rows=False, groups=after, n_rows=length, n_cols=after, affine_per_row=True)


# ---------------------------------------------------------------------------------------------------------
# Drivers shared by the four norms
# ---------------------------------------------------------------------------------------------------------

def _forward(x, geometry, weight, bias, eps, out, stats_shape, param_shape, centered):
    eps = _check_eps(eps)
    dtype = _compute_dtype(x.dtype)
    weight = _param(weight, "weight", param_shape, dtype, 1.0)
    bias = _param(bias, "bias", param_shape, dtype, 0.0)
    y = _output(out, x, "out")
    mean, rstd = np.empty(stats_shape), np.empty(stats_shape)
    if x.size == 0:   # the statistics of no values (the kernels skip empty input)
        mean.fill(np.nan)
        rstd.fill(np.nan)
    at = _kernels.address_of
    if x.dtype == np.float16 and _kernels.HAVE_FLOAT16:   # (native byte order)
        _forward_half(x, y, at(weight), at(bias), at(mean.reshape(-1)), at(rstd.reshape(-1)), geometry, eps,
                      centered)
        return y, mean, rstd
    y_flat = _flat_result(y, dtype)
    x_flat = _flat_input(x, dtype, y_flat, out is None)
    _run_forward(at(x_flat), at(y_flat), x_flat.size, at(weight), at(bias), at(mean.reshape(-1)),
                 at(rstd.reshape(-1)), dtype == np.float64, geometry, eps, centered,
                 temporary_output=y_flat.dtype != y.dtype)
    return _store(y, y_flat), mean, rstd


def _forward_half(x, y, weight, bias, mean, rstd, geometry, eps, centered):
    """_run_forward of float16 `x` into float16 `y` (arrays), in float32 a chunk at a time (see _half_chunks);
    the other arguments as _run_forward takes them, float32 parameters."""
    x_bits, y_bits = _flat_input(x, np.float16, y, False).view(np.uint16), y.view(np.uint16).reshape(-1)
    chunks = list(_half_chunks(geometry, x.size))
    at = _kernels.address_of
    x_chunk, y_chunk = _float_chunk_buffers(chunks, 2)
    for chunk in chunks:
        values, threads = slice(chunk.first, chunk.first + chunk.values), _thread_count(chunk.values)
        _kernels.half_to_float(x_bits[values], x_chunk[:chunk.values], threads)
        _run_forward(at(x_chunk), at(y_chunk), chunk.values, weight + 4 * chunk.first_param,
                     bias + 4 * chunk.first_param, mean + 8 * chunk.first_stat, rstd + 8 * chunk.first_stat,
                     False, chunk.geometry, eps, centered, temporary_output=True)
        _kernels.float_to_half(y_chunk[:chunk.values], y_bits[values], threads)


def _run_forward(x, y, size, weight, bias, mean, rstd, float64, geometry, eps, centered, temporary_output=False):
    """The forward kernel of `geometry` on arguments that have been checked, each array given by the address
    of its C-contiguous values: x and y `size` values of the compute dtype (float64 or float32, as `float64`
    says; y is x or does not overlap it), weight and bias that dtype and the geometry's parameter size, mean
    and rstd (OUT) float64, one per group of each sample; eps a float >= 0.  `temporary_output`: y is read back
    at once (a float16 result computed in float32), so it is never streamed.

    The NumPy API checks everything before calling it; so does the PyTorch adapter's eager path, whose tensors
    come with their shapes and dtypes known, and whose memory it passes without making NumPy arrays of it."""
    stream_from = _FORWARD_STREAM_FROM_BYTES if geometry.rows else _COLUMNS_FORWARD_STREAM_FROM_BYTES
    threads, stream, prefetch = _launch(y, size, float64, temporary_output, stream_from,
                                        _forward_prefetch_from_bytes(geometry, float64))
    if geometry.rows:
        _kernels.forward_rows(x, y, weight, bias, mean, rstd, float64, _units(geometry, size), geometry.groups,
                              geometry.chans_per_group, geometry.inner, eps, centered, stream, prefetch, threads)
    else:
        _kernels.forward_columns(x, y, weight, bias, mean, rstd, float64, _units(geometry, size), geometry.n_rows,
                                 geometry.n_cols, geometry.groups, geometry.cols_per_channel,
                                 geometry.affine_per_row, eps, centered, stream, prefetch, threads)


def _forward_prefetch_from_bytes(geometry, float64):
    """From how many bytes of input the forward of `geometry` asks for its rows ahead: sooner on rows whose output
    is asked for too (see _FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES)."""
    shortest, longest = _kernels.PREFETCHED_OUTPUT_ROWS
    if geometry.rows and shortest <= _group_size(geometry) * (8 if float64 else 4) <= longest:
        return _FORWARD_SHORT_ROWS_PREFETCH_FROM_BYTES
    return _FORWARD_STREAM_FROM_BYTES


def _launch(output, size, float64, temporary_output, outgrown_from_bytes, prefetch_from_bytes=None):
    """For a kernel on arrays of `size` values: its threads, whether it streams its `output` (an address), and
    whether it prefetches its input, both from `outgrown_from_bytes` on (streaming only into memory in use), or
    prefetching from `prefetch_from_bytes`."""
    nbytes = size * (8 if float64 else 4)
    stream = not temporary_output and _prepare_large_output(output, nbytes, outgrown_from_bytes)
    prefetch_from = outgrown_from_bytes if prefetch_from_bytes is None else prefetch_from_bytes
    return _thread_count(size), stream, nbytes >= prefetch_from


def _units(geometry, size):
    """How many rows (rows view) or samples (columns view) `size` values make."""
    per_unit = _group_size(geometry) if geometry.rows else geometry.n_rows * geometry.n_cols
    return size // per_unit if size else 0


def _backward(dy, x, mean, rstd, weight, geometry, out, stats_shape, param_shape, centered):
    dy = _float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"`dy` must have the shape of `x` {x.shape}, got {dy.shape}")
    mean = _stats(mean, "mean", stats_shape) if centered else None
    rstd = _stats(rstd, "rstd", stats_shape)
    dtype = _compute_dtype(x.dtype)
    weight = _param(weight, "weight", param_shape, dtype, 1.0)
    dx = _output(out, x, "out")
    # the parameters' gradients come in the compute dtype, float32 for float16 data as for its parameters
    dweight, dbias = np.empty(param_shape, dtype), np.empty(param_shape, dtype)
    at = _kernels.address_of
    if x.dtype == np.float16 and _kernels.HAVE_FLOAT16:   # (native byte order)
        _backward_half(dy, x, dx, 0 if mean is None else at(mean), at(rstd), at(weight), dweight.reshape(-1),
                       dbias.reshape(-1), geometry, centered)
        return dx, dweight, dbias
    dx_flat = _flat_result(dx, dtype)
    x_flat = _flat_input(x, dtype, dx_flat, out is None)
    dy_flat = _flat_input(dy, dtype, dx_flat, out is None)
    _run_backward(at(dy_flat), at(x_flat), at(dx_flat), x_flat.size, 0 if mean is None else at(mean), at(rstd),
                  at(weight), at(dweight.reshape(-1)), at(dbias.reshape(-1)), dtype == np.float64, geometry,
                  centered, temporary_output=dx_flat.dtype != dx.dtype)
    return _store(dx, dx_flat), dweight, dbias


def _backward_half(dy, x, dx, mean, rstd, weight, dweight, dbias, geometry, centered):
    """_run_backward of float16 `dy` and `x` into float16 `dx`, and float32 `dweight` and `dbias` (arrays), in
    float32 a chunk at a time (see _half_chunks); the other arguments as _run_backward takes them.  The chunks'
    parameter gradients are added up in float64, in chunk order, and rounded once (one chunk's come out as the
    kernels wrote them)."""
    dy_bits, x_bits = (_flat_input(arr, np.float16, dx, False).view(np.uint16) for arr in (dy, x))
    dx_bits = dx.view(np.uint16).reshape(-1)
    chunks = list(_half_chunks(geometry, x.size))
    chunk_dweight, chunk_dbias = np.empty_like(dweight), np.empty_like(dbias)
    total_dweight, total_dbias = np.zeros(dweight.shape), np.zeros(dbias.shape)
    at = _kernels.address_of
    dy_chunk, x_chunk, dx_chunk = _float_chunk_buffers(chunks, 3)
    for chunk in chunks:
        values, threads = slice(chunk.first, chunk.first + chunk.values), _thread_count(chunk.values)
        params = slice(chunk.first_param, chunk.first_param + _param_count(chunk.geometry))
        _kernels.half_to_float(dy_bits[values], dy_chunk[:chunk.values], threads)
        _kernels.half_to_float(x_bits[values], x_chunk[:chunk.values], threads)
        _run_backward(at(dy_chunk), at(x_chunk), at(dx_chunk), chunk.values,
                      mean + 8 * chunk.first_stat if mean else 0, rstd + 8 * chunk.first_stat,
                      weight + 4 * chunk.first_param, at(chunk_dweight), at(chunk_dbias), False,
                      chunk.geometry, centered, temporary_output=True)
        _kernels.float_to_half(dx_chunk[:chunk.values], dx_bits[values], threads)
        total_dweight[params] += chunk_dweight[:params.stop - params.start]
        total_dbias[params] += chunk_dbias[:params.stop - params.start]
    dweight[...] = total_dweight
    dbias[...] = total_dbias


def _run_backward(dy, x, dx, size, mean, rstd, weight, dweight, dbias, float64, geometry, centered,
                  temporary_output=False):
    """The backward kernel of `geometry` on checked arguments given by address as for _run_forward: dy, x and
    dx (OUT) `size` values, mean and rstd as the forward wrote them (mean 0 when not centered: zeros), weight,
    dweight and dbias (OUT) of the parameter size."""
    if not float64 and not _kernels.float_coefficients_hold(rstd, _stats_count(geometry, size)):
        _backward_in_float64(dy, x, dx, size, mean, rstd, weight, dweight, dbias, geometry, centered)
        return
    threads, stream, prefetch = _launch(dx, size, float64, temporary_output, _BACKWARD_STREAM_FROM_BYTES)
    if geometry.rows:
        _kernels.backward_rows(dy, x, mean, rstd, weight, dx, dweight, dbias, float64, _units(geometry, size),
                               geometry.groups, geometry.chans_per_group, geometry.inner, centered, stream, prefetch,
                               threads)
    else:
        _kernels.backward_columns(dy, x, mean, rstd, weight, dx, dweight, dbias, float64, _units(geometry, size),
                                  geometry.n_rows, geometry.n_cols, geometry.groups, geometry.cols_per_channel,
                                  geometry.affine_per_row, centered, stream, prefetch, threads)
    if centered and size and _group_size(geometry) == 1:
        # One value per group: y is the bias whatever x, so dx is 0 (NaN where the kernels made NaN), where their
        # rstd * weight * dy + coef_0 leaves rounding noise of a few ulps of rstd * weight * dy (torch gives 0)
        dx_values = _values_at(dx, size, np.float64 if float64 else np.float32)
        np.multiply(dx_values, 0, out=dx_values)


def _backward_in_float64(dy, x, dx, size, mean, rstd, weight, dweight, dbias, geometry, centered):
    """_run_backward of float32 arrays computed in float64, for groups of a spread the float32 kernels cannot
    take (see _kernels.float_coefficients_hold): copies in, the float64 kernels, the results rounded back."""
    params = _param_count(geometry)
    dy64, x64 = (_values_at(address, size, np.float32).astype(np.float64) for address in (dy, x))
    weight64 = _values_at(weight, params, np.float32).astype(np.float64)
    dx64, dweight64, dbias64 = np.empty(size), np.empty(params), np.empty(params)
    at = _kernels.address_of
    _run_backward(at(dy64), at(x64), at(dx64), size, mean, rstd, at(weight64), at(dweight64), at(dbias64), True,
                  geometry, centered, temporary_output=True)
    for address, values in ((dx, dx64), (dweight, dweight64), (dbias, dbias64)):
        _values_at(address, values.size, np.float32)[...] = values


def _values_at(address, count, dtype):
    """A NumPy view of the `count` values of `dtype` at `address`, memory the caller holds (its callers pass
    none empty)."""
    return np.frombuffer((ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address), dtype)


def _stats_count(geometry, size):
    """How many groups (statistics) `size` values of `geometry` make."""
    return _units(geometry, size) * (1 if geometry.rows else geometry.groups)


def _group_size(geometry):
    """How many values make a group (a row, or a sample's run of columns over the rows) of `geometry`."""
    if geometry.rows:
        return geometry.chans_per_group * geometry.inner
    return geometry.n_rows * (geometry.n_cols // geometry.groups)


def _param_count(geometry):
    """How many values weight, bias and their gradients of `geometry` hold."""
    if geometry.rows:
        return geometry.groups * geometry.chans_per_group
    return geometry.n_rows if geometry.affine_per_row else geometry.n_cols // geometry.cols_per_channel


def _grouped_input(x, axis, name):
    x = _float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"{name} expects `x` with at least 2 dimensions (batch, channels, ...), got shape {x.shape}")
    return x, _channel_axis(axis, x.ndim)


def _normalized_input(x, axis):
    x = _float_array(x, "x")
    axes = _normalized_axes(axis, x.ndim)
    stats_shape = x.shape[:axes[0]] + x.shape[axes[-1] + 1:]
    param_shape = tuple(x.shape[a] for a in axes)
    return x, _layer_geometry(x.shape, axes), stats_shape, param_shape


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------

def group_norm(x, num_groups, weight=None, bias=None, *, axis=1, eps=1e-5, out=None, return_stats=False):
    """Group normalization: each sample's channels split into ``num_groups`` groups, each normalized to zero
    mean and unit variance, then scaled and shifted per channel.

    Parameters
    ----------
    x : ndarray of float16, float32 or float64, shape (N, ..., C, ...)
        ``axis`` is the channel axis: 1 for channels-first ``(N, C, *spatial)``, -1 for channels-last
        ``(N, *spatial, C)``.  Any strides (a non-contiguous input costs one copy).
    num_groups : int, dividing C.
    weight, bias : ndarray of shape (C,), optional
        Per-channel scale and shift (identity when None).
    axis : int, default 1
    eps : float, default 1e-5
        Added to the variance.
    out : ndarray, optional
        C-contiguous array of x's shape and dtype to write into; may be ``x`` itself.
    return_stats : bool, default False
        Also return the float64 ``mean`` and inverse standard deviation ``rstd``, shape (N, num_groups).

    Returns
    -------
    y : ndarray like x, or ``(y, mean, rstd)``.
    """
    x, axis = _grouped_input(x, axis, "group_norm")
    groups = _check_groups(num_groups, x.shape[axis])
    y, mean, rstd = _forward(x, _group_geometry(x.shape, axis, groups), weight, bias, eps, out,
                             (x.shape[0], groups), (x.shape[axis],), centered=True)
    return (y, mean, rstd) if return_stats else y


def instance_norm(x, weight=None, bias=None, *, axis=1, eps=1e-5, out=None, return_stats=False):
    """Instance normalization: group normalization with one group per channel.

    Same arguments as :func:`group_norm`; ``mean`` and ``rstd`` have shape (N, C).
    """
    x, axis = _grouped_input(x, axis, "instance_norm")
    channels = x.shape[axis]
    y, mean, rstd = _forward(x, _group_geometry(x.shape, axis, channels), weight, bias, eps, out,
                             (x.shape[0], channels), (channels,), centered=True)
    return (y, mean, rstd) if return_stats else y


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, out=None, return_stats=False):
    """Layer normalization over the axes ``axis``: an int or a tuple of contiguous axes, trailing (torch's
    ``normalized_shape``) or not (Keras ``LayerNormalization(axis=1)``).

    ``weight`` and ``bias`` have the shape of the normalized axes, ``tuple(x.shape[a] for a in axes)``;
    ``mean`` and ``rstd`` (float64) have x's shape without them.  Other arguments as in :func:`group_norm`.
    """
    x, geometry, stats_shape, param_shape = _normalized_input(x, axis)
    y, mean, rstd = _forward(x, geometry, weight, bias, eps, out, stats_shape, param_shape, centered=True)
    return (y, mean, rstd) if return_stats else y


def rms_norm(x, weight=None, *, axis=-1, eps=1e-6, out=None, return_stats=False):
    """RMS normalization, ``x * rsqrt(mean(x**2) + eps) * weight``, over the contiguous axes ``axis``.

    As :func:`layer_norm` without centering and without bias; ``return_stats=True`` returns ``(y, rstd)``.
    """
    x, geometry, stats_shape, param_shape = _normalized_input(x, axis)
    y, _, rstd = _forward(x, geometry, weight, None, eps, out, stats_shape, param_shape, centered=False)
    return (y, rstd) if return_stats else y


def group_norm_backward(dy, x, mean, rstd, weight=None, *, axis=1, out=None):
    """Gradients of :func:`group_norm` given ``dy``, the gradient of its output.

    ``mean`` and ``rstd`` are those the forward returned (``return_stats=True``), ``weight`` the same weight.
    Returns ``(dx, dweight, dbias)``: ``dx`` like ``x`` (written into ``out`` if given), ``dweight`` and
    ``dbias`` of shape (C,), float64 for float64 input and float32 otherwise.
    """
    x, axis = _grouped_input(x, axis, "group_norm_backward")
    mean_shape = np.shape(mean)
    channels = x.shape[axis]
    if (len(mean_shape) != 2 or mean_shape[0] != x.shape[0] or not 1 <= mean_shape[1] <= channels
            or channels % mean_shape[1]):
        raise ValueError(f"`mean` must have shape (N, num_groups) as returned by the forward, with N = "
                         f"{x.shape[0]} and num_groups dividing the {channels} channels, got {mean_shape}")
    groups = mean_shape[1]
    return _backward(dy, x, mean, rstd, weight, _group_geometry(x.shape, axis, groups), out,
                     (x.shape[0], groups), (x.shape[axis],), centered=True)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, axis=1, out=None):
    """Gradients of :func:`instance_norm`; as :func:`group_norm_backward`."""
    x, axis = _grouped_input(x, axis, "instance_norm_backward")
    channels = x.shape[axis]
    return _backward(dy, x, mean, rstd, weight, _group_geometry(x.shape, axis, channels), out,
                     (x.shape[0], channels), (channels,), centered=True)


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, out=None):
    """Gradients of :func:`layer_norm`; returns ``(dx, dweight, dbias)`` as :func:`group_norm_backward`."""
    x, geometry, stats_shape, param_shape = _normalized_input(x, axis)
    return _backward(dy, x, mean, rstd, weight, geometry, out, stats_shape, param_shape, centered=True)


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1, out=None):
    """Gradients of :func:`rms_norm`; returns ``(dx, dweight, None)``."""
    x, geometry, stats_shape, param_shape = _normalized_input(x, axis)
    dx, dweight, _ = _backward(dy, x, None, rstd, weight, geometry, out, stats_shape, param_shape,
                               centered=False)
    return dx, dweight, None
