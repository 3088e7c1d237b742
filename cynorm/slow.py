"""Float64 NumPy reference implementations of every cynorm kernel.

Plain, slow and obviously correct: the tests compare the compiled kernels against these.  Every function
takes the same arguments as its public counterpart (without ``out=``), computes in float64 from the given
values and returns float64 arrays.  Argument checking is left to the public API.
"""
import numpy as np

__all__ = [
    "group_norm", "instance_norm", "layer_norm", "rms_norm",
    "group_norm_backward", "instance_norm_backward", "layer_norm_backward", "rms_norm_backward",
]


def _normalized_axes(ndim, axis):
    axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _grouped(x, num_groups, axis):
    """View x as (N, G, M): channel axis moved next to the batch axis, each group's values in one row."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 1)
    return moved, moved.reshape(moved.shape[0], num_groups, -1)


def _inverse_std(var, eps):
    """1 / sqrt(var + eps) of a centred variance; NaN where it is past the float64 range (values beyond ~1e154
    from their mean), as torch gives, rather than 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isposinf(var), np.nan, 1.0 / np.sqrt(var + eps))


def _channel_param(param, moved_shape):
    """A per-channel parameter broadcast against the channel-second array."""
    return np.asarray(param, dtype=np.float64).reshape((1, -1) + (1,) * (len(moved_shape) - 2))


def group_norm(x, num_groups, weight=None, bias=None, *, axis=1, eps=1e-5, return_stats=False):
    moved, grouped = _grouped(x, num_groups, axis)
    mean = grouped.mean(axis=2)
    var = ((grouped - mean[:, :, None]) ** 2).mean(axis=2)
    rstd = _inverse_std(var, eps)
    y = ((grouped - mean[:, :, None]) * rstd[:, :, None]).reshape(moved.shape)
    if weight is not None:
        y = y * _channel_param(weight, moved.shape)
    if bias is not None:
        y = y + _channel_param(bias, moved.shape)
    y = np.moveaxis(y, 1, axis)
    return (y, mean, rstd) if return_stats else y


def instance_norm(x, weight=None, bias=None, *, axis=1, eps=1e-5, return_stats=False):
    return group_norm(x, np.shape(x)[axis], weight, bias, axis=axis, eps=eps, return_stats=return_stats)


def _rows(x, axis):
    """x as (..., L) with the normalized axes moved last and flattened; the kept shape; the axes."""
    x = np.asarray(x, dtype=np.float64)
    axes = _normalized_axes(x.ndim, axis)
    kept = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, kept + list(axes))
    kept_shape = tuple(x.shape[a] for a in kept)
    return moved.reshape(kept_shape + (-1,)), kept_shape, axes, kept


def _from_rows(rows, x_shape, axes, kept):
    moved_shape = tuple(x_shape[a] for a in kept) + tuple(x_shape[a] for a in axes)
    return np.transpose(rows.reshape(moved_shape), np.argsort(kept + list(axes)))


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, return_stats=False):
    rows, kept_shape, axes, kept = _rows(x, axis)
    mean = rows.mean(axis=-1)
    var = ((rows - mean[..., None]) ** 2).mean(axis=-1)
    rstd = _inverse_std(var, eps)
    y = (rows - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(-1)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(-1)
    y = _from_rows(y, np.shape(x), axes, kept)
    return (y, mean, rstd) if return_stats else y


def rms_norm(x, weight=None, *, axis=-1, eps=1e-6, return_stats=False):
    rows, kept_shape, axes, kept = _rows(x, axis)
    rstd = 1.0 / np.sqrt((rows ** 2).mean(axis=-1) + eps)
    y = rows * rstd[..., None]
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(-1)
    y = _from_rows(y, np.shape(x), axes, kept)
    return (y, rstd) if return_stats else y


def _backward_rows(dy_rows, x_rows, mean, rstd, weight):
    """Gradients for rows normalized over their last axis; weight indexes the last axis (or None)."""
    xhat = (x_rows - mean[..., None]) * rstd[..., None]
    w = 1.0 if weight is None else weight
    g = dy_rows * w
    dx = rstd[..., None] * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dy_rows * xhat


def group_norm_backward(dy, x, mean, rstd, weight=None, *, axis=1):
    num_groups = np.shape(mean)[1]
    moved, grouped = _grouped(x, num_groups, axis)
    dy_moved = np.moveaxis(np.asarray(dy, dtype=np.float64), axis, 1)
    per_element_weight = None
    if weight is not None:
        per_element_weight = np.broadcast_to(_channel_param(weight, moved.shape), moved.shape).reshape(grouped.shape)
    dx, dy_xhat = _backward_rows(dy_moved.reshape(grouped.shape), grouped, np.asarray(mean, np.float64),
                                 np.asarray(rstd, np.float64), per_element_weight)
    spatial = tuple(range(2, moved.ndim))
    dweight = dy_xhat.reshape(moved.shape).sum(axis=(0,) + spatial)
    dbias = dy_moved.sum(axis=(0,) + spatial)
    return np.moveaxis(dx.reshape(moved.shape), 1, axis), dweight, dbias


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, axis=1):
    return group_norm_backward(dy, x, mean, rstd, weight, axis=axis)


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1):
    x_rows, kept_shape, axes, kept = _rows(x, axis)
    dy_rows = _rows(dy, axis)[0]
    w = None if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    dx, dy_xhat = _backward_rows(dy_rows, x_rows, np.asarray(mean, np.float64), np.asarray(rstd, np.float64), w)
    param_shape = tuple(np.shape(x)[a] for a in axes)
    lead = tuple(range(dy_rows.ndim - 1))
    dweight = dy_xhat.sum(axis=lead).reshape(param_shape)
    dbias = dy_rows.sum(axis=lead).reshape(param_shape)
    return _from_rows(dx, np.shape(x), axes, kept), dweight, dbias


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1):
    x_rows, kept_shape, axes, kept = _rows(x, axis)
    dy_rows = _rows(dy, axis)[0]
    rstd = np.asarray(rstd, dtype=np.float64)
    xhat = x_rows * rstd[..., None]
    g = dy_rows if weight is None else dy_rows * np.asarray(weight, dtype=np.float64).reshape(-1)
    dx = rstd[..., None] * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    param_shape = tuple(np.shape(x)[a] for a in axes)
    dweight = (dy_rows * xhat).sum(axis=tuple(range(dy_rows.ndim - 1))).reshape(param_shape)
    return _from_rows(dx, np.shape(x), axes, kept), dweight, None
