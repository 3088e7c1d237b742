"""Helpers shared by the core kernel tests: the four norms described as data, seeded inputs, comparisons.

A `NormCase` is one norm applied to one input shape over one axis (or block of axes).  It knows the shapes of
its parameters and statistics and calls either the public `cynorm` function or its float64 reference in
`cynorm.slow` with the same arguments, so every test is written once for all four norms.
"""
import dataclasses

import numpy as np
from hypothesis import strategies as st

import cynorm

FLOAT_DTYPES = (np.float32, np.float64, np.float16)

# Accuracy expected of a result of a given dtype, relative to the float64 reference and to the magnitude of
# the result (see `assert_close`).  float16 results are rounded float32 computations: half a float16 ulp is
# 4.9e-4 relative.
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5, np.float16: 1e-3}

NORMS = ("group", "instance", "layer", "rms")


@dataclasses.dataclass(frozen=True)
class NormCase:
    """A norm, an input shape and the axis (or tuple of contiguous axes) the norm is taken over.

    For group and instance norm `axis` is the channel axis; for layer and RMS norm it is the normalized axis
    or axes.  `num_groups` is used by group norm only.
    """

    norm: str
    shape: tuple
    axis: object
    num_groups: int = None

    def __post_init__(self):
        assert self.norm in NORMS, self.norm
        assert (self.num_groups is not None) == (self.norm == "group"), self

    def __str__(self):
        shape = "x".join(map(str, self.shape))
        axis = ",".join(map(str, self.axis)) if isinstance(self.axis, tuple) else str(self.axis)
        groups = "" if self.num_groups is None else f"-G{self.num_groups}"
        return f"{self.norm}-{shape}-axis{axis}{groups}"

    @property
    def has_bias(self):
        """RMS norm neither centers nor shifts: no bias, no mean."""
        return self.norm != "rms"

    @property
    def normalized_axes(self):
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return tuple(sorted(a % len(self.shape) for a in axes))

    @property
    def param_shape(self):
        if self.norm in ("group", "instance"):
            return (self.shape[self.axis],)
        return tuple(self.shape[a] for a in self.normalized_axes)

    @property
    def stats_shape(self):
        if self.norm == "group":
            return (self.shape[0], self.num_groups)
        if self.norm == "instance":
            return (self.shape[0], self.shape[self.axis])
        return tuple(n for a, n in enumerate(self.shape) if a not in self.normalized_axes)

    @property
    def group_size(self):
        """How many elements of x share one (mean, rstd) pair."""
        return int(np.prod(self.shape)) // max(1, int(np.prod(self.stats_shape)))

    def with_shape(self, shape):
        return dataclasses.replace(self, shape=tuple(shape))

    def broadcastable(self, param):
        """A weight or bias reshaped to broadcast against x (size-1 axes where the parameter has none)."""
        param_axes = (self.axis % len(self.shape),) if self.norm in ("group", "instance") else self.normalized_axes
        return np.reshape(param, [n if a in param_axes else 1 for a, n in enumerate(self.shape)])

    def forward(self, module, x, weight=None, bias=None, **kwargs):
        """`module.<norm>_norm` (module is `cynorm` or `cynorm.slow`) called with this case's arguments."""
        assert self.has_bias or bias is None, "RMS norm has no bias"
        function = getattr(module, f"{self.norm}_norm")
        args = [x] + ([self.num_groups] if self.norm == "group" else []) + [weight]
        args += [bias] if self.has_bias else []
        return function(*args, axis=self.axis, **kwargs)

    def forward_with_stats(self, module, x, weight=None, bias=None, **kwargs):
        """(y, stats): stats is (mean, rstd), or (rstd,) for RMS norm, ready for `backward`."""
        y, *stats = self.forward(module, x, weight, bias, return_stats=True, **kwargs)
        return y, tuple(stats)

    def backward(self, module, dy, x, stats, weight=None, **kwargs):
        function = getattr(module, f"{self.norm}_norm_backward")
        return function(dy, x, *stats, weight, axis=self.axis, **kwargs)


def dtype_name(dtype):
    """Test ids: "float32" rather than "<class 'numpy.float32'>"."""
    return np.dtype(dtype).name


def random_array(shape, dtype=np.float64, *, seed, loc=0.0, scale=1.0):
    """loc + scale * N(0, 1), drawn in float64 and rounded once to dtype."""
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def random_params(case, dtype, *, seed, weight=True, bias=True):
    """(weight, bias) of the case's parameter shape, either replaced by None on request."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, case.param_shape) * rng.choice([-1.0, 1.0], case.param_shape)
    b = rng.standard_normal(case.param_shape)
    return (w.astype(dtype) if weight else None), (b.astype(dtype) if bias and case.has_bias else None)


def compute_dtype(dtype):
    """The precision the kernels compute in, and the dtype of dweight and dbias: float16 input -> float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def assert_close(actual, desired, *, dtype=None, scale=None, err_msg=""):
    """`actual` within TOLERANCE[dtype] of `desired`, relative to each value and to the scale of the result.

    dtype defaults to actual's dtype.  The absolute part, tolerance times `scale` (by default the largest
    |desired|, at least 1), keeps values near zero from demanding a relative accuracy that no finite-precision
    computation of a difference can give; pass the magnitude of the terms when a result is a cancellation of
    much larger ones.  NaNs must sit in the same places.
    """
    actual = np.asarray(actual)
    tolerance = TOLERANCE[np.dtype(dtype or actual.dtype).type]
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    finite = desired[np.isfinite(desired)]
    largest = float(np.max(np.abs(finite))) if finite.size else 0.0
    scale = max(1.0, largest, scale or 0.0)
    np.testing.assert_allclose(actual.astype(np.float64), desired, rtol=tolerance, atol=tolerance * scale,
                               err_msg=err_msg)


def assert_bitwise_equal(actual, desired, err_msg=""):
    """Same dtype, shape and bytes (so NaNs and signed zeros must match too)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype, err_msg)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    differ = np.ascontiguousarray(actual).view(np.uint8) != np.ascontiguousarray(desired).view(np.uint8)
    assert not differ.any(), f"{err_msg}: {int(differ.sum())} bytes differ"


def run_forward_and_backward(case, x, weight, bias, dy):
    """Every array the public API produces for one forward and backward pass, as a dict of name -> array."""
    y, stats = case.forward_with_stats(cynorm, x, weight, bias)
    dx, dweight, dbias = case.backward(cynorm, dy, x, stats, weight)
    arrays = {"y": y, "dx": dx, "dweight": dweight}
    arrays.update(zip(("mean", "rstd") if case.has_bias else ("rstd",), stats))
    if dbias is not None:
        arrays["dbias"] = dbias
    return arrays


# Every norm in each of its layouts, small enough for exhaustive parametrization.
LAYOUT_CASES = (
    NormCase("group", (2, 6, 5, 4), 1, 3),  # channels-first
    NormCase("group", (2, 5, 4, 6), -1, 3),  # channels-last
    NormCase("group", (2, 3, 6, 5), 2, 3),  # a channel axis in the middle of the spatial axes
    NormCase("instance", (2, 5, 4, 3), 1),
    NormCase("instance", (2, 4, 3, 5), -1),
    NormCase("layer", (4, 10), -1),
    NormCase("layer", (3, 4, 5), (-2, -1)),  # torch's normalized_shape=(4, 5)
    NormCase("layer", (2, 6, 5, 3), 1),  # Keras LayerNormalization(axis=1)
    NormCase("rms", (4, 10), -1),
    NormCase("rms", (3, 4, 5), (-2, -1)),
    NormCase("rms", (2, 6, 5, 3), 1),
)

# Rows view with short rows, whose statistics (up to 64 values) and gradients (up to 20) the kernels take 16 rows
# at a time, a row per vector lane: whole and partial blocks of 16 rows, the longest rows either way and the
# first past them, and a weight that changes along the rows.
SHORT_ROW_CASES = (
    NormCase("layer", (37, 10), -1),            # two blocks and a partial one
    NormCase("layer", (16, 20), -1),            # one block; the longest rows of the backward's blocks
    NormCase("layer", (3, 7, 21), -1),          # statistics in blocks, gradients row by row
    NormCase("layer", (33, 64), -1),            # the longest rows of the forward's blocks
    NormCase("layer", (20, 65), -1),            # row by row
    NormCase("rms", (40, 3), -1),
    NormCase("rms", (2, 9, 16), -1),
    NormCase("group", (50, 12, 1), 1, 4),       # rows of 3 channels, the weight by group
    NormCase("group", (13, 64, 1), 1, 2),       # rows of 32 channels, the weight by group, gradients row by row
    NormCase("group", (9, 8, 2, 2), 1, 4),      # rows of 2 channels of 4 values
    NormCase("group", (21, 32, 2, 2), 1, 4),    # rows of 8 channels of 4 values, their constants spread
    NormCase("group", (5, 48, 3), 1, 3),        # of 16 channels of 3 values
    NormCase("group", (17, 64, 4), 1, 4),       # of 16 channels of 4: the longest
)

# Rows view cases that AVX-512 builds take four rows or four channels at a time.  Rows of a multiple of 16 values
# (one element per channel): 32 lanes and a tail of 16, no 32-lane part, rows of several groups, the longest
# rows of the backward's and of the forward's, and rows left over.
FOUR_ROW_CASES = (
    NormCase("layer", (37, 48), -1),
    NormCase("rms", (3, 7, 32), -1),
    NormCase("group", (21, 96, 1), 1, 3),       # rows of 32 channels
    NormCase("layer", (9, 512), -1),
    NormCase("layer", (6, 1024), -1),
    NormCase("rms", (11, 80), -1),
    # channels-first groups of several channels on small maps, whose backward sums four channels at a time
    NormCase("group", (5, 36, 7, 7), 1, 4),     # 9 channels of 49 values a group
    NormCase("group", (3, 32, 4, 5), 1, 4),     # 8 of 20
    NormCase("group", (2, 20, 3), 1, 4),        # 5 of 3
    # rows of one channel, four samples' at a time (the backward's 4 blocks of samples need 4 each), left over
    NormCase("instance", (18, 6, 5, 5), 1),
    NormCase("instance", (17, 3, 8, 8), 1),
)

# Channels-last with fewer than 32 channels, whose backward takes a tile's rows several at a time as one wide
# row: whole wide rows four at a time, the wide rows after them, and rows left over; several tiles a sample.
NARROW_COLUMN_CASES = (
    NormCase("group", (3, 37, 29, 10), -1, 5),   # 8 rows of 10 as one of 80
    NormCase("instance", (2, 41, 43, 3), -1),     # 32 rows of 3 as one of 96
    NormCase("group", (2, 30, 30, 24), -1, 8),    # 2 rows of 24 as one of 48
)

# Channels-last rows of 128 columns or more in tiles of 150 rows, which AVX2 builds sum eight rows at a time where
# the rows are not asked for ahead: 18 eights, a four and two rows left in each tile.
WIDE_COLUMN_CASES = (
    NormCase("group", (2, 20, 30, 160), -1, 5),
    NormCase("instance", (1, 24, 25, 128), -1),
)

# Channels-last samples of a single tile and hundreds of channels, whose forward takes blocks of whole column
# groups over all the rows, their statistics then their normalization, where samples are too few to share out a
# tile at a time (float32 block sizes in the comments, by thread count).
GROUP_BLOCK_CASES = (
    NormCase("group", (1, 8, 8, 1280), -1, 32),   # 10-11 groups on 1 and 3 threads, 8 on 2
    NormCase("group", (2, 7, 7, 2560), -1, 32),   # a tile a sample on 1 thread, 8 groups on 2, 5-6 on 3
    NormCase("group", (1, 8, 8, 1024), -1, 16),   # 8 groups on 1 and 2 threads, 5-6 on 3
    NormCase("group", (3, 8, 8, 2560), -1, 32),   # 5-6
    NormCase("instance", (1, 8, 8, 1024), -1),    # groups of one column: 512 on 1 and 2 threads, 341-342 on 3
)

# Shapes that leave fewer (sample, group) blocks or rows than threads, so a multi-threaded kernel has to split
# one block's reduction between threads; and a few long rows that 2 threads cannot share evenly, which the
# kernels split the same way.
SPLIT_CASES = (
    NormCase("group", (1, 4, 1000, 100), 1, 1),
    NormCase("group", (1, 4, 1000, 100), 1, 2),
    NormCase("group", (1, 1000, 100, 4), -1, 1),
    NormCase("group", (1, 1000, 100, 4), -1, 2),
    NormCase("instance", (1, 1, 400, 400), 1),
    NormCase("instance", (1, 400, 400, 1), -1),
    NormCase("layer", (1, 100_000), -1),
    NormCase("rms", (1, 100_000), -1),
    NormCase("layer", (3, 40_000), -1),
    NormCase("group", (3, 4, 100, 100), 1, 1),
    NormCase("group", (3, 18000), 1, 2),
)


def with_layout(array, layout):
    """An array equal to `array` with the given memory layout (strides, flags or byte order)."""
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided":
        padded = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        padded[..., ::2] = array
        return padded[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(array[::-1])[::-1]
    if layout == "read-only":
        read_only = array.copy()
        read_only.flags.writeable = False
        return read_only
    if layout == "byte-swapped":
        return array.astype(array.dtype.newbyteorder())
    raise ValueError(layout)


LAYOUTS = ["fortran", "strided", "reversed", "read-only", "byte-swapped"]


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def norm_cases(draw):
    """Any valid norm, shape and axis (or block of axes); sizes small enough for many examples."""
    norm = draw(st.sampled_from(NORMS))
    channel_norm = norm in ("group", "instance")
    ndim = draw(st.integers(2 if channel_norm else 1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    negative = draw(st.booleans())
    if channel_norm:
        axis = draw(st.integers(1, ndim - 1))
        axis = axis - ndim if negative else axis
        groups = draw(st.sampled_from(_divisors(shape[axis]))) if norm == "group" else None
        return NormCase(norm, shape, axis, groups)
    first = draw(st.integers(0, ndim - 1))
    axes = tuple(range(first, draw(st.integers(first + 1, ndim))))
    axes = tuple(a - ndim for a in axes) if negative else axes
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    return NormCase(norm, shape, axis)
