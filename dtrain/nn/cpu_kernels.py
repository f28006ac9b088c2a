"""CPU kernels (Numba) for im2col, col2im, pooling, a convolution's output pass and ReLU's backward: the API and
arithmetic of :mod:`dtrain.nn.cuda_kernels`;
and, CPU only, direct convolutions and Winograd's tile transforms (:mod:`dtrain.nn.winograd`).

Built from NumPy operations, these passes need several array operations per kernel
offset (max pooling: a compare, a maximum and an argmax update in forward, a compare, a
multiply and an add in backward), each streaming its arrays through the cache. Here each
pass is one loop nest compiled by Numba. im2col fills a block of columns (a range of
output pixels, see :mod:`dtrain.nn.im2col`) straight from the unpadded input, writing
zeros where a window reaches into the padding; col2im adds such a block back. Pooling
forward reads every input once and writes the maxima and the winners' offsets; backward
*gathers*, each input element summing the gradients of the outputs whose window it won,
kernel offsets in increasing order, as the CUDA kernels do, so CPU and GPU agree bitwise
in float32 and float64 and no zeroing pass or scatter is needed. The innermost loop runs
over the batch (the arrays are batch-last, (C, H, W, N)), which the compiler vectorizes.

The kernels release the GIL and take a channel range: :func:`dtrain.nn.blocks.for_blocks`
spreads channel blocks over the thread budget.

Numba has no float16 on the CPU: float16 arrays are computed in float32 and rounded once,
which is what the CUDA kernels' float32 accumulator does. Compiled code is cached on disk
(Numba's ``cache=True``), so only the first run on a machine pays the compilation.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from dtrain.nn.blocks import for_blocks
from dtrain.nn.module import Array

Pair = tuple[int, int]


# Bytes of one block of im2col columns (:mod:`dtrain.nn.conv` multiplies block by block):
# small enough to stay in the last-level cache between im2col and its GEMM, large enough
# for the GEMM to run at full speed.
COLUMN_BLOCK_BYTES = 32 << 20


@njit(nogil=True, cache=True, inline="always")
def _row_runs(p, last, out_w, sw, kj, pw, width):  # pragma: no cover (compiled)
    """For the block's pixels from ``p`` (stopping at ``last``) in one output row: that row's
    index, its pixels ``ow0 .. ow1-1``, and the part ``lo .. hi-1`` of them whose input column
    ``ow*sw + kj - pw`` lies inside the image (the rest read padding)."""
    oh = p // out_w
    ow0 = p - oh * out_w
    ow1 = min(out_w, ow0 + (last - p))
    lo = max(ow0, (pw - kj + sw - 1) // sw) if pw > kj else ow0
    hi = max(lo, min(ow1, (width - 1 + pw - kj) // sw + 1))
    return oh, ow0, ow1, lo, hi


@njit(nogil=True, cache=True, inline="always")
def _copy(target, source):  # pragma: no cover (compiled)
    # An explicit loop over two 1-D views: compiled to a vectorized copy, unlike slice assignment.
    for i in range(target.shape[0]):
        target[i] = source[i]


@njit(nogil=True, cache=True, inline="always")
def _zero(target):  # pragma: no cover (compiled)
    for i in range(target.shape[0]):
        target[i] = 0


@njit(nogil=True, cache=True, inline="always")
def _add(target, source):  # pragma: no cover (compiled)
    for i in range(target.shape[0]):
        target[i] += source[i]


@njit(nogil=True, cache=True, inline="always")
def _axpy(target, coef, source):  # pragma: no cover (compiled)
    for i in range(target.shape[0]):
        target[i] += coef * source[i]


@njit(nogil=True, cache=True, inline="always")
def _channel_plane(flat, c, plane):  # pragma: no cover (compiled)
    """Channel c's (H, W, N) values of a flat C-contiguous (C, H, W, N) array."""
    return flat[c * plane:(c + 1) * plane]


@njit(nogil=True, cache=True, inline="always")
def _relu(target):  # pragma: no cover (compiled)
    # NumPy's maximum(v, 0): NaN stays NaN (and -0.0 becomes 0, as NumPy's vector loops give).
    for i in range(target.shape[0]):
        v = target[i]
        target[i] = 0 if v <= 0 else v  # noqa: FURB136 (max(0, v) would turn NaN into 0)


@njit(nogil=True, cache=True, inline="always")
def _at_least(v, low):  # pragma: no cover (compiled)
    # NumPy's maximum(v, low): NaN stays NaN (max(low, v) would not).
    return low if v <= low else v  # noqa: FURB136


@njit(nogil=True, cache=True)
def _relu_backward(grad, y):  # pragma: no cover (compiled)
    for i in range(grad.shape[0]):
        grad[i] = 0 if y[i] <= 0 else grad[i]  # a select, which the compiler vectorizes


@njit(nogil=True, cache=True)
def _bias_relu(y, bias, biased, relu, f0, f1):  # pragma: no cover (compiled)
    for f in range(f0, f1):
        row = y[f]
        if biased:
            shift = bias[f]
            for i in range(row.shape[0]):
                row[i] += shift
        if relu:
            _relu(row)


@njit(nogil=True, cache=True)
def _bias_relu_rows(y, bias, biased, relu, pixels, dest, target, f0, f1):  # pragma: no cover (compiled)
    # _bias_relu's arithmetic on y (F*P, N), filter f's rows at f*P .., each written to row
    # dest[.] of target (R, N) instead of in place (< 0: nowhere).
    batch = y.shape[1]
    floor = y.dtype.type(0) if relu else y.dtype.type(-np.inf)  # -inf: no clamp
    for f in range(f0, f1):
        for r in range(f * pixels, (f + 1) * pixels):
            out = dest[r]
            if out < 0:
                continue
            if biased:
                shift = bias[f]
                for n in range(batch):
                    target[out, n] = _at_least(y[r, n] + shift, floor)
            else:
                for n in range(batch):
                    target[out, n] = _at_least(y[r, n], floor)


@njit(nogil=True, cache=True)
def _im2col(x, kh, kw, sh, sw, ph, pw, out_w, first, cols, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = x.shape
    flat = x.reshape(-1)
    last = first + cols.shape[1] // batch
    for c in range(c0, c1):
        for ki in range(kh):
            for kj in range(kw):
                row = cols[(c * kh + ki) * kw + kj]
                p = first
                while p < last:  # one output row at a time: with stride 1 its inputs are one run
                    oh, ow0, ow1, lo, hi = _row_runs(p, last, out_w, sw, kj, pw, width)
                    h = oh * sh + ki - ph
                    at = (p - first) * batch
                    if h < 0 or h >= height:
                        _zero(row[at:at + (ow1 - ow0) * batch])
                    else:
                        _zero(row[at:at + (lo - ow0) * batch])
                        if sw == 1:
                            src = ((c * height + h) * width + lo + kj - pw) * batch
                            dst = at + (lo - ow0) * batch
                            _copy(row[dst:dst + (hi - lo) * batch], flat[src:src + (hi - lo) * batch])
                        else:
                            for ow in range(lo, hi):
                                src = ((c * height + h) * width + ow * sw + kj - pw) * batch
                                dst = at + (ow - ow0) * batch
                                _copy(row[dst:dst + batch], flat[src:src + batch])
                        _zero(row[at + (hi - ow0) * batch:at + (ow1 - ow0) * batch])
                    p += ow1 - ow0


@njit(nogil=True, cache=True)
def _col2im_add(cols, kh, kw, sh, sw, ph, pw, out_w, first, fresh, gate, gated, img, c0, c1):  # pragma: no cover
    _, height, width, batch = img.shape
    flat = img.reshape(-1)
    plane = height * width * batch
    last = first + cols.shape[1] // batch
    for c in range(c0, c1):
        if fresh:  # the channel's plane, zeroed in cache right before the adds
            _zero(_channel_plane(flat, c, plane))
        for ki in range(kh):  # offsets in increasing order: each input sums them in that order
            for kj in range(kw):
                row = cols[(c * kh + ki) * kw + kj]
                p = first
                while p < last:
                    oh, ow0, ow1, lo, hi = _row_runs(p, last, out_w, sw, kj, pw, width)
                    h = oh * sh + ki - ph
                    at = (p - first) * batch
                    if 0 <= h < height:
                        if sw == 1:
                            dst = ((c * height + h) * width + lo + kj - pw) * batch
                            src = at + (lo - ow0) * batch
                            _add(flat[dst:dst + (hi - lo) * batch], row[src:src + (hi - lo) * batch])
                        else:
                            for ow in range(lo, hi):
                                dst = ((c * height + h) * width + ow * sw + kj - pw) * batch
                                src = at + (ow - ow0) * batch
                                _add(flat[dst:dst + batch], row[src:src + batch])
                    p += ow1 - ow0
        if gated:
            _relu_backward(_channel_plane(flat, c, plane), _channel_plane(gate.reshape(-1), c, plane))


@njit(nogil=True, cache=True)
def _col2im_disjoint(cols, kh, kw, sh, sw, ph, pw, out_w, covered, gate, gated, gate_columns, img, c0,
                     c1):  # pragma: no cover (compiled)
    # Windows that do not overlap (kernel <= stride) and every output pixel's columns: each
    # input gets at most one value, written (as 0 + value, the bits of adding it to a zeroed
    # gradient) and gated in the same pass; only inputs no window covers need zeroing first.
    # The gate is laid out like img, or with gate_columns like cols (the columns of the gate).
    _, height, width, batch = img.shape
    target = img.reshape(-1, batch)
    guard = gate.reshape(-1, batch)
    plane = height * width * batch
    pixels = cols.shape[1] // batch
    source = cols.reshape(cols.shape[0], pixels, batch)
    zero = img.dtype.type(0)
    for c in range(c0, c1):
        if not covered:
            _zero(_channel_plane(img.reshape(-1), c, plane))
        for ki in range(kh):
            for kj in range(kw):
                r = (c * kh + ki) * kw + kj
                p = 0
                while p < pixels:
                    oh, ow0, ow1, lo, hi = _row_runs(p, pixels, out_w, sw, kj, pw, width)
                    h = oh * sh + ki - ph
                    if 0 <= h < height:
                        for ow in range(lo, hi):
                            dst = (c * height + h) * width + ow * sw + kj - pw
                            src = p + ow - ow0
                            if gated:
                                at = r * pixels + src if gate_columns else dst
                                for n in range(batch):
                                    v = zero + source[r, src, n]
                                    target[dst, n] = 0 if guard[at, n] <= 0 else v
                            else:
                                for n in range(batch):
                                    target[dst, n] = zero + source[r, src, n]
                    p += ow1 - ow0


@njit(nogil=True, cache=True)
def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, gated, y, arg, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = x.shape
    _, out_h, out_w, _ = y.shape
    for c in range(c0, c1):
        for oh in range(out_h):
            for ow in range(out_w):
                best = y[c, oh, ow]
                at = arg[c, oh, ow]
                found = False
                for ki in range(kh):
                    h = oh * sh + ki - ph
                    if h < 0 or h >= height:
                        continue
                    for kj in range(kw):
                        w = ow * sw + kj - pw
                        if w < 0 or w >= width:
                            continue
                        values = x[c, h, w]
                        k = ki * kw + kj
                        if not found:
                            for n in range(batch):
                                best[n] = values[n]
                                at[n] = k
                            found = True
                        else:
                            for n in range(batch):
                                better = values[n] > best[n]  # strict: the first maximum keeps the win
                                best[n] = values[n] if better else best[n]
                                at[n] = k if better else at[n]
                if gated:  # no winner (offset kh*kw) where the maximum is <= 0: no gradient passes
                    for n in range(batch):
                        at[n] = kh * kw if best[n] <= 0 else at[n]


@njit(nogil=True, cache=True, inline="always")
def _covering(i, pad, k, s, out):  # pragma: no cover (compiled)
    """The outputs ``o`` whose window (padded rows o*s .. o*s+k-1) holds input ``i``: from the
    highest to the lowest, which is the window offset ``i + pad - o*s`` in increasing order."""
    at = i + pad
    return min(at // s, out - 1), max(0, (at - k + s) // s)


@njit(nogil=True, cache=True)
def _max_pool_backward(gy, arg, kh, kw, sh, sw, ph, pw, gx, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = gx.shape
    _, out_h, out_w, _ = gy.shape
    for c in range(c0, c1):
        for h in range(height):
            oh_hi, oh_lo = _covering(h, ph, kh, sh, out_h)
            for w in range(width):
                ow_hi, ow_lo = _covering(w, pw, kw, sw, out_w)
                acc = gx[c, h, w]
                for n in range(batch):
                    acc[n] = 0
                for oh in range(oh_hi, oh_lo - 1, -1):  # the outputs whose window holds (h, w)
                    ki = h + ph - oh * sh
                    for ow in range(ow_hi, ow_lo - 1, -1):
                        grad = gy[c, oh, ow]
                        won = arg[c, oh, ow]
                        k = ki * kw + w + pw - ow * sw
                        for n in range(batch):
                            if won[n] == k:
                                acc[n] += grad[n]


@njit(nogil=True, cache=True)
def _avg_pool_forward(x, kh, kw, sh, sw, ph, pw, share, y, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = x.shape
    _, out_h, out_w, _ = y.shape
    for c in range(c0, c1):
        for oh in range(out_h):
            for ow in range(out_w):
                acc = y[c, oh, ow]
                for n in range(batch):
                    acc[n] = 0
                for ki in range(kh):
                    h = oh * sh + ki - ph
                    if h < 0 or h >= height:
                        continue
                    for kj in range(kw):
                        w = ow * sw + kj - pw
                        if w < 0 or w >= width:
                            continue
                        values = x[c, h, w]
                        for n in range(batch):
                            acc[n] += values[n]
                for n in range(batch):
                    acc[n] *= share


@njit(nogil=True, cache=True)
def _avg_pool_backward(gy, kh, kw, sh, sw, ph, pw, share, gx, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = gx.shape
    _, out_h, out_w, _ = gy.shape
    for c in range(c0, c1):
        for h in range(height):
            oh_hi, oh_lo = _covering(h, ph, kh, sh, out_h)
            for w in range(width):
                ow_hi, ow_lo = _covering(w, pw, kw, sw, out_w)
                acc = gx[c, h, w]
                for n in range(batch):
                    acc[n] = 0
                for oh in range(oh_hi, oh_lo - 1, -1):
                    for ow in range(ow_hi, ow_lo - 1, -1):
                        grad = gy[c, oh, ow]
                        for n in range(batch):
                            acc[n] += grad[n] * share


@njit(nogil=True, cache=True, inline="always")
def _window_taps(weight, f, oh, ow, sh, sw, ph, pw, height, width, taps, rows):  # pragma: no cover (compiled)
    """Filter f's taps whose input lies inside the image for output pixel (oh, ow), in im2col
    row order (c, ki, kj): their weights into ``taps``, their inputs' row numbers in the
    (C*H*W, N) view of the input into ``rows``; returns how many."""
    channels, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    count = 0
    for c in range(channels):
        for ki in range(kh):
            h = oh * sh + ki - ph
            if h < 0 or h >= height:
                continue
            for kj in range(kw):
                w = ow * sw + kj - pw
                if w < 0 or w >= width:
                    continue
                taps[count] = weight[f, c, ki, kj]
                rows[count] = (c * height + h) * width + w
                count += 1
    return count


@njit(nogil=True, cache=True)
def _conv_direct_forward(x, weight, bias, sh, sw, ph, pw, out_h, out_w, relu, dest, target, f0, f1):  # pragma: no cover
    # Output row (f, oh, ow) goes to row dest[(f*OH + oh)*OW + ow] of target (R, N); < 0: not computed.
    _, height, width, batch = x.shape
    # (pixel, sample) views indexed in place: a 1-D view sliced per tap costs more than the
    # tap's arithmetic (each view takes a reference count).
    source = x.reshape(-1, batch)
    taps = np.empty(weight[0].size, dtype=target.dtype)
    rows = np.empty(weight[0].size, dtype=np.int64)
    # Each pass clamps what it writes from below: at -inf (no change) but for the last pass
    # with ReLU, at 0 (NumPy's maximum: NaN stays NaN).
    floor = target.dtype.type(0) if relu else target.dtype.type(-np.inf)
    unclamped = target.dtype.type(-np.inf)
    for f in range(f0, f1):
        shift = bias[f]
        for oh in range(out_h):
            for ow in range(out_w):
                out = dest[(f * out_h + oh) * out_w + ow]
                if out < 0:
                    continue
                count = _window_taps(weight, f, oh, ow, sh, sw, ph, pw, height, width, taps, rows)
                if count == 0:
                    for n in range(batch):
                        target[out, n] = _at_least(shift, floor)
                # Up to four taps per pass over the samples, added one after another to the
                # bias or the running sum: the order of a sum over all taps, one write per pass.
                t = 0
                while t < count:
                    k = 4 if count - t >= 4 else 1
                    low = floor if t + k == count else unclamped
                    if k == 4:
                        w0, w1, w2, w3 = taps[t], taps[t + 1], taps[t + 2], taps[t + 3]
                        r0, r1, r2, r3 = rows[t], rows[t + 1], rows[t + 2], rows[t + 3]
                        if t == 0:
                            for n in range(batch):
                                v = (((shift + w0 * source[r0, n]) + w1 * source[r1, n]) + w2 * source[r2, n]) \
                                    + w3 * source[r3, n]
                                target[out, n] = _at_least(v, low)
                        else:
                            for n in range(batch):
                                v = (((target[out, n] + w0 * source[r0, n]) + w1 * source[r1, n])
                                     + w2 * source[r2, n]) + w3 * source[r3, n]
                                target[out, n] = _at_least(v, low)
                        t += 4
                    else:  # the last taps (fewer than four), one per pass
                        w0, r0 = taps[t], rows[t]
                        if t == 0:
                            for n in range(batch):
                                v = shift + w0 * source[r0, n]
                                target[out, n] = _at_least(v, low)
                        else:
                            for n in range(batch):
                                v = target[out, n] + w0 * source[r0, n]
                                target[out, n] = _at_least(v, low)
                        t += 1


@njit(nogil=True, cache=True)
def _conv_direct_weight_grad(x, gy, sh, sw, ph, pw, gw, gb, f0, f1):  # pragma: no cover (compiled)
    channels, height, width, batch = x.shape
    _, out_h, out_w, _ = gy.shape
    kh, kw = gw.shape[2], gw.shape[3]
    acc = np.empty(batch, dtype=gw.dtype)  # one partial sum per sample, added up at the end
    for f in range(f0, f1):
        for c in range(channels):
            for ki in range(kh):
                for kj in range(kw):
                    acc[:] = 0
                    for oh in range(out_h):
                        h = oh * sh + ki - ph
                        if h < 0 or h >= height:
                            continue
                        for ow in range(out_w):
                            w = ow * sw + kj - pw
                            if w < 0 or w >= width:
                                continue
                            grad = gy[f, oh, ow]
                            values = x[c, h, w]
                            for n in range(batch):
                                acc[n] += grad[n] * values[n]
                    gw[f, c, ki, kj] = acc.sum()
        acc[:] = 0
        for oh in range(out_h):
            for ow in range(out_w):
                grad = gy[f, oh, ow]
                for n in range(batch):
                    acc[n] += grad[n]
        gb[f] = acc.sum()


@njit(nogil=True, cache=True, inline="always")
def _transform_columns(rows, mat, target, channel, t, batch):  # pragma: no cover (compiled)
    """The second half of a tile's 2-D transform: ``target[a*alpha + b, channel, tile t's
    batch] = sum_j mat[b, j] * rows[a, j]`` for the tile's rows (alpha, J, batch) already
    transformed along the other axis (alpha = rows.shape[0], J = mat.shape[1])."""
    alpha = rows.shape[0]
    for a in range(alpha):
        for b in range(mat.shape[0]):
            out = target[a * alpha + b, channel, t * batch:(t + 1) * batch]
            _zero(out)
            for j in range(mat.shape[1]):
                coef = mat[b, j]
                if coef != 0:
                    _axpy(out, coef, rows[a, j])


@njit(nogil=True, cache=True)
def _winograd_weight(weight, g, u, f0, f1):  # pragma: no cover (compiled)
    channels, r = weight.shape[1], weight.shape[2]
    alpha = g.shape[0]
    taps = np.empty((r, r, channels), dtype=u.dtype)  # one filter, channels innermost
    half = np.empty((alpha, r, channels), dtype=u.dtype)  # G w: (a, l, c)
    for f in range(f0, f1):
        for k in range(r):
            for l in range(r):
                for c in range(channels):
                    taps[k, l, c] = weight[f, c, k, l]
        half[:] = 0
        for a in range(alpha):
            for k in range(r):
                coef = g[a, k]
                if coef != 0:
                    for l in range(r):
                        _axpy(half[a, l], coef, taps[k, l])
        for a in range(alpha):
            for b in range(alpha):
                out = u[a * alpha + b, f]
                _zero(out)
                for l in range(r):
                    coef = g[b, l]
                    if coef != 0:
                        _axpy(out, coef, half[a, l])


@njit(nogil=True, cache=True)
def _winograd_weight_grad(du, g, weight_grad, f0, f1):  # pragma: no cover (compiled)
    channels, r = weight_grad.shape[1], weight_grad.shape[2]
    alpha = g.shape[0]
    half = np.empty((r, alpha, channels), dtype=du.dtype)  # G^T dU over a: (k, b, c)
    tap = np.empty(channels, dtype=du.dtype)
    for f in range(f0, f1):
        half[:] = 0
        for a in range(alpha):
            for k in range(r):
                coef = g[a, k]
                if coef != 0:
                    for b in range(alpha):
                        _axpy(half[k, b], coef, du[a * alpha + b, f])
        for k in range(r):
            for l in range(r):
                _zero(tap)
                for b in range(alpha):
                    coef = g[b, l]
                    if coef != 0:
                        _axpy(tap, coef, half[k, b])
                for c in range(channels):
                    weight_grad[f, c, k, l] = tap[c]


@njit(nogil=True, cache=True)
def _winograd_input(x, bt, m, ph, pw, tiles_w, first, v, c0, c1):  # pragma: no cover (compiled)
    _, height, width, batch = x.shape
    alpha = bt.shape[0]
    rows = np.empty((alpha, alpha, batch), dtype=v.dtype)  # B^T d: (a, j, n)
    for c in range(c0, c1):
        for t in range(v.shape[2] // batch):
            ty, tx = divmod(first + t, tiles_w)
            rows[:] = 0
            for i in range(alpha):
                h = ty * m + i - ph
                if h < 0 or h >= height:
                    continue
                for j in range(alpha):
                    w = tx * m + j - pw
                    if w < 0 or w >= width:
                        continue
                    for a in range(alpha):
                        coef = bt[a, i]
                        if coef != 0:
                            _axpy(rows[a, j], coef, x[c, h, w])
            _transform_columns(rows, bt, v, c, t, batch)


@njit(nogil=True, cache=True)
def _winograd_output(mm, at, bias, m, tiles_w, first, relu, y, f0, f1):  # pragma: no cover (compiled)
    _, out_h, out_w, batch = y.shape
    alpha = at.shape[1]
    cols = np.empty((m, alpha, batch), dtype=y.dtype)  # A^T M: (i, b, n)
    for f in range(f0, f1):
        for t in range(mm.shape[2] // batch):
            ty, tx = divmod(first + t, tiles_w)
            cols[:] = 0
            for a in range(alpha):
                for b in range(alpha):
                    values = mm[a * alpha + b, f, t * batch:(t + 1) * batch]
                    for i in range(m):
                        coef = at[i, a]
                        if coef != 0:
                            _axpy(cols[i, b], coef, values)
            for i in range(min(m, out_h - ty * m)):
                for j in range(min(m, out_w - tx * m)):
                    out = y[f, ty * m + i, tx * m + j]
                    out[:] = bias[f]
                    for b in range(alpha):
                        coef = at[j, b]
                        if coef != 0:
                            _axpy(out, coef, cols[i, b])
                    if relu:
                        _relu(out)


@njit(nogil=True, cache=True)
def _winograd_output_grad(gy, at, m, tiles_w, first, dm, f0, f1):  # pragma: no cover (compiled)
    _, out_h, out_w, batch = gy.shape
    alpha = at.shape[1]
    rows = np.empty((alpha, m, batch), dtype=dm.dtype)  # A dY over i: (a, j, n)
    for f in range(f0, f1):
        for t in range(dm.shape[2] // batch):
            ty, tx = divmod(first + t, tiles_w)
            rows[:] = 0
            for i in range(min(m, out_h - ty * m)):
                for j in range(min(m, out_w - tx * m)):
                    for a in range(alpha):
                        coef = at[i, a]
                        if coef != 0:
                            _axpy(rows[a, j], coef, gy[f, ty * m + i, tx * m + j])
            _transform_columns(rows, at.T, dm, f, t, batch)


@njit(nogil=True, cache=True)
def _winograd_input_grad_add(dv, bt, m, ph, pw, tiles_w, first, fresh, gate, gated, gx, c0, c1):  # pragma: no cover
    _, height, width, batch = gx.shape
    plane = height * width * batch
    flat = gx.reshape(-1)
    alpha = bt.shape[0]
    cols = np.empty((alpha, alpha, batch), dtype=gx.dtype)  # B dV over a: (i, b, n)
    for c in range(c0, c1):
        if fresh:  # the channel's plane, zeroed in cache right before the adds
            _zero(_channel_plane(flat, c, plane))
        for t in range(dv.shape[2] // batch):
            ty, tx = divmod(first + t, tiles_w)
            cols[:] = 0
            for a in range(alpha):
                for b in range(alpha):
                    values = dv[a * alpha + b, c, t * batch:(t + 1) * batch]
                    for i in range(alpha):
                        coef = bt[a, i]
                        if coef != 0:
                            _axpy(cols[i, b], coef, values)
            for i in range(alpha):
                h = ty * m + i - ph
                if h < 0 or h >= height:
                    continue
                for j in range(alpha):
                    w = tx * m + j - pw
                    if w < 0 or w >= width:
                        continue
                    out = gx[c, h, w]
                    for b in range(alpha):
                        coef = bt[b, j]
                        if coef != 0:
                            _axpy(out, coef, cols[i, b])
        if gated:
            _relu_backward(_channel_plane(flat, c, plane), _channel_plane(gate.reshape(-1), c, plane))


def _computable(a: Array) -> Array:
    """``a`` in a dtype the kernels compile for: float16 goes to float32 (see the module docstring)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"cpu_kernels: expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _share(kernel: Pair, dtype: np.dtype) -> np.generic:
    """1 / (kh*kw) in the arrays' dtype, as the CUDA kernels round it (the kernels multiply in that dtype)."""
    return dtype.type(1.0 / (kernel[0] * kernel[1]))


# Bytes of work per block: a kernel call holds no chain of passes to keep in cache, so blocks
# only set how evenly the channels are shared out over the threads.
KERNEL_BLOCK_BYTES = 1 << 20


def _per_channel_blocks(kernel, args: tuple, out: Array, bytes_per_channel: int) -> None:
    """Run ``kernel(*args, c0, c1)`` over ``out``'s channels on the thread budget, one call
    per thread (a call costs microseconds of argument checks)."""
    for_blocks(lambda c0, c1: kernel(*args, c0, c1), out.shape[0], bytes_per_channel, out,
               block_bytes=KERNEL_BLOCK_BYTES, merge=True)


# The dtypes in which a layer writes its output straight into the next convolution's columns.
TILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def tiled_columns_pay(kernel: Pair, stride: Pair, dtype: np.dtype) -> bool:
    """Whether a convolution whose input is a ReLU's output takes that input as its im2col
    columns, written there by the layer before it (:func:`conv_direct_forward` or
    :func:`bias_relu_rows` with the map of :func:`dtrain.nn.im2col.tiled_rows`): when its
    windows tile the input (stride = kernel), the columns are the input's values in another
    order, and writing them there in the pass that writes the output anyway spares im2col's
    pass over them. Its input gradient then takes :func:`col2im_tiled`, gated by the columns."""
    return tuple(kernel) == tuple(stride) and np.dtype(dtype) in TILED_DTYPES


# Convolutions whose output values take at most this many multiply-adds each (out_channels
# x in_channels*kh*kw) run as direct convolutions (see direct_conv_pays).
DIRECT_CONV_MAX_MACS = 320


def direct_conv_pays(out_channels: int, rows: int) -> bool:
    """Whether a convolution with ``out_channels`` filters of ``rows`` = C*kh*kw taps runs
    direct (:func:`conv_direct_forward`; its weight gradient: :func:`direct_weight_grad_pays`)
    rather than as im2col + GEMM: a GEMM that small per column is memory-bound, it streams a column matrix
    kh*kw times the input's size (see the README's Performance section for the measurement)."""
    return out_channels * rows <= DIRECT_CONV_MAX_MACS


# A direct convolution with at least this many filters per column row (out_channels >= this
# x C*kh*kw) computes its weight gradient as im2col + GEMM (see direct_weight_grad_pays).
GEMM_WEIGHT_GRAD_FILTERS_PER_ROW = 4


def direct_weight_grad_pays(out_channels: int, rows: int) -> bool:
    """Whether a direct convolution (:func:`direct_conv_pays`) also computes its weight
    gradient directly (:func:`conv_direct_weight_grad`) rather than as im2col + GEMM with
    the bias gradient as a GEMV. The direct kernel passes over the output gradient once per
    tap; the GEMM streams it once, with columns (``rows`` per pixel and sample) that are
    small against it when the filters outnumber the rows enough (simple_cnn's first layer:
    32 filters, 4 rows; LeNet's, 6 filters of 25 rows, stays direct; see the README's
    Performance section for the measurement)."""
    return out_channels < GEMM_WEIGHT_GRAD_FILTERS_PER_ROW * rows


def conv_direct_forward(x: Array, weight: Array, bias: Array | None, stride: Pair, padding: Pair, y: Array,
                        relu: bool = False, rows: Array | None = None) -> Array:
    """Fill ``y`` (F, OH, OW, N) with the cross-correlation of the batch-last input ``x``
    (C, H, W, N) with ``weight`` (F, C, kh, kw), plus ``bias`` (F,) when given; C-contiguous
    arrays. Each output sums its taps in im2col row order, starting from the bias; with
    ``relu``, then takes ``maximum(., 0)`` (NaN stays NaN).

    With ``rows`` (F*OH*OW,) int64, ``y`` is instead any C-contiguous array of rows of N
    values: output row (f, oh, ow) goes to its row ``rows[(f*OH + oh)*OW + ow]``, or nowhere
    where that is -1 (:func:`dtrain.nn.im2col.tiled_rows` maps a layer's output into the
    columns of a convolution whose windows tile it). float32 and float64 only then."""
    source = _computable(x)
    f, (kh, kw) = weight.shape[0], weight.shape[2:]
    out_h = (x.shape[1] + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (x.shape[2] + 2 * padding[1] - kw) // stride[1] + 1
    taps = weight.astype(source.dtype, copy=False)
    shift = bias.astype(source.dtype, copy=False) if bias is not None else np.zeros(f, source.dtype)
    if rows is None:
        rows = np.arange(f * out_h * out_w)
        target = y if y.dtype == source.dtype else np.empty(y.shape, source.dtype)
    elif y.dtype != source.dtype or not y.flags.c_contiguous:
        raise ValueError(f"conv_direct_forward: a row-mapped target must be C-contiguous {source.dtype}, got "
                         f"{y.dtype} with strides {y.strides}")
    else:
        target = y
    args = (source, taps, shift, *stride, *padding, out_h, out_w, relu, rows, target.reshape(-1, x.shape[3]))
    _per_channel_blocks(_conv_direct_forward, args, taps, out_h * out_w * x.shape[3] * source.itemsize * taps[0].size)
    if target is not y:
        y[...] = target
    return y


def conv_direct_weight_grad(x: Array, grad: Array, stride: Pair, padding: Pair, weight_grad: Array,
                            bias_grad: Array | None) -> None:
    """Write the gradients of :func:`conv_direct_forward`'s ``weight`` into ``weight_grad``
    (F, C, kh, kw) and of its bias into ``bias_grad`` (F,) if given, from the batch-last
    input ``x`` (C, H, W, N) and output gradient ``grad`` (F, OH, OW, N). Each tap sums
    per sample over the output pixels, then over the samples."""
    source, gy = _computable(x), _computable(grad)
    f = weight_grad.shape[0]
    gw = weight_grad if weight_grad.dtype == source.dtype else np.empty(weight_grad.shape, source.dtype)
    gb = bias_grad if bias_grad is not None and bias_grad.dtype == source.dtype else np.empty(f, source.dtype)
    args = (source, gy, *stride, *padding, gw, gb)
    _per_channel_blocks(_conv_direct_weight_grad, args, gy, gy[0].nbytes * gw[0].size)
    if gw is not weight_grad:
        weight_grad[...] = gw
    if bias_grad is not None and gb is not bias_grad:
        bias_grad[...] = gb


# Winograd's F(m x m, r x r) (see dtrain.nn.winograd) runs convolutions whose filters and
# input channels both number at least this; with fewer, the GEMMs in the transformed domain
# are too small to be compute-bound and the transforms cost more than they save.
WINOGRAD_MIN_CHANNELS = 64
# The largest transformed tile side (alpha = m + r - 1): larger tiles take interpolation
# points beyond 0, 1, -1 and 2, whose transforms lose float32 accuracy.
WINOGRAD_MAX_ALPHA = 7


def winograd_tile(out_channels: int, in_channels: int, kernel: Pair, stride: Pair, out_hw: Pair,
                  dtype: np.dtype) -> int:
    """The output tile side m with which a convolution runs as Winograd F(m x m, r x r)
    (:mod:`dtrain.nn.winograd`), or 0 when it runs otherwise: square kernels of r >= 2 taps,
    stride 1, float32 or float64, enough filters and channels. m is the one, among tiles of
    at most ``WINOGRAD_MAX_ALPHA`` transformed values a side, that multiplies least (tiles
    x alpha^2; the smaller m on a tie)."""
    r = kernel[0]
    if (kernel[1] != r or r < 2 or tuple(stride) != (1, 1) or np.dtype(dtype) not in (np.float32, np.float64)
            or min(out_channels, in_channels) < WINOGRAD_MIN_CHANNELS):
        return 0

    def products(m: int) -> int:  # multiplications per channel pair and sample
        return -(-out_hw[0] // m) * -(-out_hw[1] // m) * (m + r - 1) ** 2

    sizes = range(2, WINOGRAD_MAX_ALPHA - r + 2)
    best = min(sizes, key=products, default=0)
    return best if best and products(best) < out_hw[0] * out_hw[1] * r * r else 0


def winograd_weight(weight: Array, g: Array, u: Array) -> Array:
    """Fill ``u`` (alpha^2, F, C) with the transformed filters ``G w G^T`` of ``weight`` (F, C,
    r, r), ``u[a*alpha + b, f, c] = sum_kl G[a, k] weight[f, c, k, l] G[b, l]``."""
    _per_channel_blocks(_winograd_weight, (_computable(weight), g, u), weight, u[:, 0].nbytes * 2)
    return u


def winograd_weight_grad(du: Array, g: Array, weight_grad: Array) -> Array:
    """The adjoint of :func:`winograd_weight`: write ``G^T du G`` of ``du`` (alpha^2, F, C)
    into ``weight_grad`` (F, C, r, r)."""
    _per_channel_blocks(_winograd_weight_grad, (du, g, weight_grad), weight_grad, du[:, 0].nbytes * 2)
    return weight_grad


def winograd_input(x: Array, bt: Array, m: int, padding: Pair, tiles_w: int, first: int, v: Array) -> Array:
    """Fill ``v`` (alpha^2, C, T*N) with ``B^T d B`` of each input tile d (alpha x alpha, zero
    outside the image) of tiles ``first .. first+T-1`` (row-major over the tile grid, ``tiles_w``
    tiles a row; tile (ty, tx) starts at input pixel (ty*m - ph, tx*m - pw)) of the batch-last
    input ``x`` (C, H, W, N); column ``t*N + n`` holds tile ``first + t`` of sample n."""
    args = (_computable(x), bt, m, *padding, tiles_w, first, v)
    _per_channel_blocks(_winograd_input, args, x, v[:, 0].nbytes * 2)
    return v


def winograd_output(mm: Array, at: Array, bias: Array, m: int, tiles_w: int, first: int, y: Array,
                    relu: bool = False) -> Array:
    """Write ``A^T M A + bias`` of each transformed product M in ``mm`` (alpha^2, F, T*N) to
    output tiles ``first .. first+T-1`` (m x m, cut at the edge) of ``y`` (F, OH, OW, N);
    with ``relu``, its ``maximum(., 0)`` (NaN stays NaN)."""
    _per_channel_blocks(_winograd_output, (mm, at, bias, m, tiles_w, first, relu, y), y, mm[:, 0].nbytes * 2)
    return y


def winograd_output_grad(grad: Array, at: Array, m: int, tiles_w: int, first: int, dm: Array) -> Array:
    """The adjoint of :func:`winograd_output`: fill ``dm`` (alpha^2, F, T*N) with ``A dY A^T``
    of output tiles ``first .. first+T-1`` of the gradient ``grad`` (F, OH, OW, N)."""
    _per_channel_blocks(_winograd_output_grad, (_computable(grad), at, m, tiles_w, first, dm), grad,
                        dm[:, 0].nbytes * 2)
    return dm


def winograd_input_grad_add(dv: Array, bt: Array, m: int, padding: Pair, tiles_w: int, first: int,
                            gx: Array, fresh: bool = False, gate: Array | None = None) -> Array:
    """The adjoint of :func:`winograd_input`: add ``B dV B^T`` of each tile of ``dv`` (alpha^2,
    C, T*N) into the input gradient ``gx`` (C, H, W, N) where the tile lies inside the image;
    overlapping tiles add in tile order. ``fresh`` and ``gate`` as in :func:`col2im_add`."""
    args = (dv, bt, m, *padding, tiles_w, first, fresh, gx if gate is None else gate, gate is not None, gx)
    _per_channel_blocks(_winograd_input_grad_add, args, gx, dv[:, 0].nbytes * 2)
    return gx


def bias_relu(y: Array, bias: Array | None, relu: bool) -> Array:
    """In place on ``y`` (F, P), C-contiguous: add ``bias[f]`` (F,) to row f when given, then
    with ``relu`` take ``maximum(., 0)`` (NaN stays NaN), as NumPy's ``y += bias[:, None]``
    and ``maximum`` do, in one pass over each block of rows."""
    target = _computable(y)
    shift = np.empty(0, target.dtype) if bias is None else bias.astype(target.dtype, copy=False)
    _per_channel_blocks(_bias_relu, (target, shift, bias is not None, relu), target, target[0].nbytes)
    if target is not y:
        y[...] = target
    return y


def bias_relu_rows(y: Array, bias: Array | None, relu: bool, rows: Array, target: Array) -> Array:
    """:func:`bias_relu` of ``y`` (F, P*N), C-contiguous, written elsewhere: row (f, p) of
    its (F*P, N) view goes to row ``rows[f*P + p]`` of ``target`` (a C-contiguous array of
    rows of N values, ``y``'s dtype), or nowhere where that is -1 (see
    :func:`conv_direct_forward`). float32 and float64; returns ``target``."""
    f = y.shape[0]
    pixels = rows.shape[0] // f
    batch = y.shape[1] // pixels
    if y.dtype not in TILED_DTYPES or target.dtype != y.dtype or not (y.flags.c_contiguous and target.flags.c_contiguous):
        raise ValueError(f"bias_relu_rows: needs C-contiguous float32 or float64 arrays of one dtype, got {y.dtype} "
                         f"and {target.dtype}")
    shift = np.empty(0, y.dtype) if bias is None else bias.astype(y.dtype, copy=False)
    args = (y.reshape(f * pixels, batch), shift, bias is not None, relu, pixels, rows, target.reshape(-1, batch))
    _per_channel_blocks(_bias_relu_rows, args, y, y[0].nbytes)
    return target


def im2col(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, cols: Array, first: int = 0) -> Array:
    """Fill ``cols`` (C*kh*kw, P*N) with the columns of output pixels ``first .. first+P-1``
    (row-major over (OH, OW)) of the C-contiguous batch-last input ``x`` (C, H, W, N)."""
    source = _computable(x)
    target = cols if cols.dtype == source.dtype else np.empty(cols.shape, source.dtype)
    args = (source, *kernel, *stride, *padding, out_hw[1], first, target)
    _per_channel_blocks(_im2col, args, source, cols[0].nbytes * kernel[0] * kernel[1])
    if target is not cols:
        cols[...] = target
    return cols


def col2im_add(cols: Array, img: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair,
               first: int = 0, fresh: bool = False, gate: Array | None = None) -> Array:
    """The adjoint of :func:`im2col`: add the columns (C*kh*kw, P*N) of output pixels
    ``first ..`` into ``img`` (C, H, W, N), C-contiguous, each input in kernel-offset order.

    ``fresh``: ``img``'s content is ignored, as if it were zeros (a new gradient's first
    block: its memory needs no zeroing pass). ``gate`` (like ``img``): then zero ``img``
    where ``gate`` <= 0, as ReLU's backward does with its output (:func:`relu_backward`);
    for the last block, when ``gate`` is the output of a ReLU that fed this convolution."""
    source = _computable(cols)
    target = img if img.dtype == source.dtype else img.astype(source.dtype)
    gating = target if gate is None else _computable(gate).astype(source.dtype, copy=False)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if fresh and kh <= sh and kw <= sw and first == 0 and cols.shape[1] == out_hw[0] * out_hw[1] * img.shape[3]:
        # All the columns of windows that do not overlap: one writing pass.
        covered = (kh, kw) == (sh, sw) and out_hw[0] * sh - ph >= img.shape[1] and out_hw[1] * sw - pw >= img.shape[2]
        kernel_fn, args = _col2im_disjoint, (source, kh, kw, sh, sw, ph, pw, out_hw[1], covered, gating,
                                             gate is not None, False, target)
    else:
        kernel_fn, args = _col2im_add, (source, kh, kw, sh, sw, ph, pw, out_hw[1], first, fresh, gating,
                                        gate is not None, target)
    _per_channel_blocks(kernel_fn, args, target, cols[0].nbytes * kh * kw)
    if target is not img:
        img[...] = target
    return img


def col2im_tiled(cols: Array, img: Array, kernel: Pair, padding: Pair, out_hw: Pair, gate: Array | None = None
                 ) -> Array:
    """:func:`col2im_add` with ``fresh`` of all the columns (C*kh*kw, OH*OW*N) of a convolution
    whose windows tile its input (stride = kernel) into ``img`` (C, H, W, N), gated, when
    ``gate`` is given, by ``gate`` laid out like ``cols``: the columns of the ReLU output that
    was the convolution's input, as the layer before wrote them (see :func:`tiled_columns_pay`)."""
    (kh, kw), (ph, pw) = kernel, padding
    if cols.shape[1] != out_hw[0] * out_hw[1] * img.shape[3] or (gate is not None and gate.shape != cols.shape):
        raise ValueError(f"col2im_tiled: columns {cols.shape} and gate {None if gate is None else gate.shape} do not "
                         f"hold all {out_hw} pixels of a batch of {img.shape[3]}")
    source = _computable(cols)
    target = img if img.dtype == source.dtype else img.astype(source.dtype)
    gating = target if gate is None else _computable(gate).astype(source.dtype, copy=False)
    covered = out_hw[0] * kh - ph >= img.shape[1] and out_hw[1] * kw - pw >= img.shape[2]
    args = (source, kh, kw, kh, kw, ph, pw, out_hw[1], covered, gating, gate is not None, True, target)
    _per_channel_blocks(_col2im_disjoint, args, target, cols[0].nbytes * kh * kw)
    if target is not img:
        img[...] = target
    return img


def max_pool_forward(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, argmax: Array,
                     gated: bool = False) -> Array:
    """(C, H, W, N) -> new (C, OH, OW, N) window maxima; ``argmax`` (C, OH, OW, N) gets each winner's offset.

    ``gated`` (the input is a ReLU's output, whose backward the pooling runs): a window
    whose maximum is <= 0 gets offset kh*kw, no winner, so backward passes it no gradient,
    as ReLU's backward would have zeroed it at the winner."""
    source = _computable(x)
    y = np.empty(argmax.shape, dtype=source.dtype)
    _per_channel_blocks(_max_pool_forward, (source, *kernel, *stride, *padding, gated, y, argmax), y,
                        source[0].nbytes + y[0].nbytes + argmax[0].nbytes)
    return y.astype(x.dtype, copy=False)


def max_pool_backward(grad: Array, argmax: Array, input_chwn: tuple[int, ...], kernel: Pair, stride: Pair,
                      padding: Pair) -> Array:
    """(C, OH, OW, N) gradient -> new (C, H, W, N): each output's gradient to its window's winner."""
    source = _computable(grad)
    gx = np.empty(input_chwn, dtype=source.dtype)
    _per_channel_blocks(_max_pool_backward, (source, argmax, *kernel, *stride, *padding, gx), gx,
                        gx[0].nbytes + source[0].nbytes + argmax[0].nbytes)
    return gx.astype(grad.dtype, copy=False)


def avg_pool_forward(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair) -> Array:
    """(C, H, W, N) -> new (C, OH, OW, N) window means (padding counts as zeros)."""
    source = _computable(x)
    y = np.empty((x.shape[0], *out_hw, x.shape[3]), dtype=source.dtype)
    args = (source, *kernel, *stride, *padding, _share(kernel, source.dtype), y)
    _per_channel_blocks(_avg_pool_forward, args, y, source[0].nbytes + y[0].nbytes)
    return y.astype(x.dtype, copy=False)


def avg_pool_backward(grad: Array, input_chwn: tuple[int, ...], kernel: Pair, stride: Pair, padding: Pair) -> Array:
    """(C, OH, OW, N) gradient -> new (C, H, W, N): each window input gets grad / (kh*kw)."""
    source = _computable(grad)
    gx = np.empty(input_chwn, dtype=source.dtype)
    args = (source, *kernel, *stride, *padding, _share(kernel, source.dtype), gx)
    _per_channel_blocks(_avg_pool_backward, args, gx, gx[0].nbytes + source[0].nbytes)
    return gx.astype(grad.dtype, copy=False)


def relu_backward(grad: Array, y: Array) -> Array:
    """Zero ``grad`` in place where ReLU's output ``y`` is <= 0, as PyTorch's ReLU backward
    does (a NaN output passes its gradient on); same-shaped arrays, ideally the 1-D pieces
    of :func:`dtrain.nn.blocks.elementwise`. Others (and float16) are worked on as
    C-ordered copies in a compiled dtype, written back."""
    if grad.ndim == 1 and grad.flags.c_contiguous and y.flags.c_contiguous and grad.dtype != np.float16:
        _relu_backward(grad, y)
        return grad
    work = np.float32 if grad.dtype == np.float16 else grad.dtype
    g = np.array(grad, dtype=work, order="C").reshape(-1)
    _relu_backward(g, np.array(y, dtype=work, order="C").reshape(-1))
    grad[...] = g.reshape(grad.shape)
    return grad
