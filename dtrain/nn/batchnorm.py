"""Batch normalization over the channel axis (PyTorch's ``BatchNorm1d`` / ``BatchNorm2d``).

Training normalizes with the statistics of the batch and updates the running estimates
(the variance estimate is the unbiased one, as in PyTorch); evaluation normalizes with
the running estimates.

Deferred running statistics: with ``defer_running_stats = True`` a training forward
records its batch mean and unbiased variance instead of updating the running estimates;
:meth:`take_running_stats` hands the records out and :meth:`apply_running_stats` applies
one. Deterministic data-parallel training uses this to apply every micro-batch's
statistics in one global order, whichever rank or thread computed it.

Synchronized batch norm: set ``stats_reducer`` to a callable that all-reduces (sums) a
1-D array across ranks. Forward then reduces the per-channel ``[sum, sum_sq, count]``
(each of length C, concatenated) and backward the per-channel ``[sum(g), sum(g * x_hat),
count]``, so every rank normalizes with, and back-propagates through, the statistics of
the global batch: the result equals batch norm on the concatenated batch. Parameter
gradients stay local (the data-parallel gradient all-reduce combines them).

The sums are taken of ``d = x - shift`` rather than of ``x`` so that the variance
``E[d^2] - E[d]^2`` does not subtract two large, nearly equal numbers when the data has
a large mean. Without a reducer the shift is the batch mean (the exact two-pass
variance); with one it is the running mean, the only estimate that is identical on every
rank, so synchronized statistics are as accurate as the running mean is close to the
batch mean.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, get_array_module
from dtrain.checks import check_int
from dtrain.nn.checks import check_dim, check_dtype
from dtrain.nn.module import Array, Module, Shape

StatsReducer = Callable[[Array], Array]


class _BatchNorm(Module):
    """Shared implementation; subclasses fix which input ranks are accepted."""

    _ranks: tuple[int, ...] = ()
    _layout: str = ""  # accepted input shapes, for error messages
    _sample_layout: str = ""  # the same without the batch axis

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(num_features, f"{name}: num_features", 1)
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.stats_reducer: StatsReducer | None = None
        self.defer_running_stats = False
        self._deferred: list[tuple[Array, Array]] = []
        dtype = np.dtype(dtype if dtype is not None else DEFAULT_DTYPE)
        if affine:
            self.register_param("weight", np.ones(num_features, dtype=dtype))
            self.register_param("bias", np.zeros(num_features, dtype=dtype))
        self.buffers["running_mean"] = np.zeros(num_features, dtype=dtype)
        self.buffers["running_var"] = np.ones(num_features, dtype=dtype)
        self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)
        self._cache: tuple[Array, Array, bool] | None = None  # x_hat, 1/std, batch statistics used

    # -- helpers ---------------------------------------------------------------------
    def _check_input(self, x: Array) -> None:
        if getattr(x, "ndim", None) not in self._ranks:
            raise ValueError(f"{self!r} expects input of shape ({self._layout}), got shape {tuple(getattr(x, 'shape', ()))}")
        check_dim(self, x.shape, 1, self.num_features, "channels (axis 1)")
        stats_dtype = self.buffers["running_mean"].dtype
        if x.dtype != np.float16:
            check_dtype(self, x, stats_dtype)
            return
        # float16 input (mixed precision, dtrain.precision): float16 parameters, and running
        # statistics in float16 or, shared with a float32 master model, in float32.
        if self.affine:
            check_dtype(self, x, self.params["weight"].dtype)
        if stats_dtype not in (np.float16, np.float32):
            raise TypeError(
                f"{self!r} got a float16 input but its running statistics are {stats_dtype}; float16 "
                f"input needs float16 or float32 statistics, convert the model with .to(xp, dtype)"
            )

    def _per_channel(self, v: Array, ndim: int) -> Array:
        """Reshape a (C,) vector to broadcast against an input of rank ``ndim``."""
        return v.reshape((1, self.num_features) + (1,) * (ndim - 2))

    def _all_reduce(self, a: Array, b: Array, local_count: int) -> tuple[Array, Array, Array]:
        """Per-channel ``(a, b, count)`` summed over ranks (unchanged without a reducer)."""
        xp = get_array_module(a)
        c = self.num_features
        packed = xp.concatenate([a, b, xp.full(c, local_count, dtype=a.dtype)])
        if self.stats_reducer is not None:
            packed = self.stats_reducer(packed)
            if tuple(getattr(packed, "shape", ())) != (3 * c,):
                raise ValueError(
                    f"{self!r}: stats_reducer must return the all-reduced 1-D array of length {3 * c}, "
                    f"got shape {tuple(getattr(packed, 'shape', ()))}"
                )
        return packed[:c], packed[c : 2 * c], packed[2 * c :]

    def _batch_stats(self, x: Array) -> tuple[Array, Array]:
        """Batch mean and biased variance per channel, and the update of the running estimates."""
        xp = get_array_module(x)
        axes = (0,) + tuple(range(2, x.ndim))
        local_count = x.size // self.num_features
        shift = self.buffers["running_mean"] if self.stats_reducer is not None else x.mean(axis=axes)
        d = x - self._per_channel(shift, x.ndim)
        s, ss, n = self._all_reduce(d.sum(axis=axes), (d * d).sum(axis=axes), local_count)
        mean_d = s / n
        var = xp.maximum(ss / n - mean_d * mean_d, 0)
        mean = shift + mean_d
        if local_count < 2 and float(n[0]) < 2:
            raise ValueError(
                f"{self!r} needs more than one value per channel in training mode, got input of shape "
                f"{tuple(x.shape)}; use a larger batch or call .eval()"
            )
        if self.defer_running_stats:
            self._deferred.append((mean, var * (n / (n - 1))))
        else:
            self.apply_running_stats(mean, var * (n / (n - 1)))
        return mean, var

    def take_running_stats(self) -> list[tuple[Array, Array]]:
        """The ``(batch mean, unbiased batch variance)`` pairs, each (C,), that training
        forwards recorded since the last call (``defer_running_stats``), oldest first."""
        records, self._deferred = self._deferred, []
        return records

    def apply_running_stats(self, mean: Array, unbiased_var: Array) -> None:
        """Move the running estimates towards one batch's statistics (momentum, or the
        cumulative average when ``momentum`` is None) and count the batch."""
        tracked = self.buffers["num_batches_tracked"]
        tracked[...] += 1
        factor = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        for key, value in (("running_mean", mean), ("running_var", unbiased_var)):
            buf = self.buffers[key]
            buf[...] = (1 - factor) * buf + factor * value

    # -- Module interface ------------------------------------------------------------
    def forward(self, x: Array) -> Array:
        """Normalize per channel (axis 1); same shape and dtype out.

        float16 input is normalized in float32 (statistics, running estimates, output
        before the final cast): float16's range (65504) and 11-bit significand hold
        neither sums of squares nor an accurate variance.
        """
        self._check_input(x)
        if x.dtype == np.float16:
            return self._forward(x.astype(np.float32)).astype(np.float16)
        return self._forward(x)

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        """Gradient w.r.t. the input; writes the (local) weight and bias gradients in place
        (computed in float32 for a float16 ``grad_out``, like the forward pass)."""
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        if grad_out.dtype == np.float16:
            return self._backward(grad_out.astype(np.float32)).astype(np.float16)
        return self._backward(grad_out)

    def _forward(self, x: Array) -> Array:
        """``forward`` on a checked input whose dtype is the one computed in."""
        xp = get_array_module(x)
        if self.training:
            mean, var = self._batch_stats(x)
        else:
            # no-ops unless float16 statistics serve an input upcast from float16
            mean = self.buffers["running_mean"].astype(x.dtype, copy=False)
            var = self.buffers["running_var"].astype(x.dtype, copy=False)
        inv_std = 1 / xp.sqrt(var + self.eps)
        x_hat = (x - self._per_channel(mean, x.ndim)) * self._per_channel(inv_std, x.ndim)
        self._cache = (x_hat, inv_std, self.training)
        if not self.affine:
            return x_hat
        return x_hat * self._per_channel(self.params["weight"], x.ndim) + self._per_channel(
            self.params["bias"], x.ndim
        )

    def _backward(self, grad_out: Array) -> Array:
        """``backward`` for a ``grad_out`` in the dtype computed in."""
        x_hat, inv_std, batch_stats = self._cache
        ndim = grad_out.ndim
        axes = (0,) + tuple(range(2, ndim))
        sum_g = grad_out.sum(axis=axes)
        sum_gx = (grad_out * x_hat).sum(axis=axes)
        scale = inv_std
        if self.affine:
            self.grads["weight"][...] = sum_gx
            self.grads["bias"][...] = sum_g
            scale = scale * self.params["weight"]
        if not batch_stats:
            return grad_out * self._per_channel(scale, ndim)
        sum_g, sum_gx, n = self._all_reduce(sum_g, sum_gx, grad_out.size // self.num_features)
        centered = (
            grad_out
            - self._per_channel(sum_g / n, ndim)
            - x_hat * self._per_channel(sum_gx / n, ndim)
        )
        return centered * self._per_channel(scale, ndim)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        if len(shape) + 1 not in self._ranks or shape[0] != self.num_features:
            raise ValueError(
                f"{self!r} expects per-sample shape ({self._sample_layout}) with C={self.num_features}, got {shape}"
            )
        return shape

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input over all axes but C."""

    _ranks = (2, 3)
    _layout = "N, C) or (N, C, L"
    _sample_layout = "C,) or (C, L"


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) input over N, H and W."""

    _ranks = (4,)
    _layout = "N, C, H, W"
    _sample_layout = "C, H, W"
