"""Batch-last memory for (N, C, H, W) activations.

Convolution, pooling and elementwise layers take and return arrays of shape
(N, C, H, W), but Conv2d and the pooling layers return views of (C, H, W, N)-ordered
memory (``batch_last.transpose(3, 0, 1, 2)``), and their input gradients likewise:

* Conv2d's GEMM produces (F, OH*OW*N) with the batch fastest (see :mod:`dtrain.nn.im2col`),
  so handing it out as a view costs nothing, where an NCHW copy cost two passes over
  the largest arrays of the network;
* the next Conv2d's im2col and a pooling layer's window slices then read runs of N
  contiguous elements, instead of OW-element runs or single elements strided across
  the whole array;
* elementwise layers (ReLU, Dropout) keep whatever memory order they are given.

Any (N, C, H, W) array is accepted: :func:`batch_last` makes the (C, H, W, N) version
a layer works on, a free view when the memory already is in that order.
"""
from __future__ import annotations

from dtrain.backend import get_array_module
from dtrain.nn.blocks import for_blocks
from dtrain.nn.module import Array
from dtrain.nn.workspace import Workspace


def batch_last(x: Array, workspace: Workspace, name: str) -> Array:
    """(C, H, W, N) contents of the (N, C, H, W) array ``x``, C-contiguous.

    A view of ``x`` when its memory is batch-last already, else a copy into the workspace
    buffer ``name`` (valid until that buffer's next use).
    """
    view = x.transpose(1, 2, 3, 0)
    if view.flags.c_contiguous:
        return view
    xp = get_array_module(x)
    out = workspace.get(name, view.shape, x.dtype, xp)

    def copy(start: int, stop: int) -> None:
        out[start:stop] = view[start:stop]

    for_blocks(copy, view.shape[0], 2 * view[0].nbytes, x)
    return out


def as_nchw(batch_last_array: Array) -> Array:
    """The (N, C, H, W) view of a (C, H, W, N) array."""
    return batch_last_array.transpose(3, 0, 1, 2)
