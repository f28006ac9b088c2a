"""Deterministic gradient averaging: the same bits for any number of ranks.

A plain all-reduce sums each rank's partial gradient, and both the partials (how a batch
is split) and the reduction order change with the number of ranks, so results agree only
to rounding. Here the global batch is cut into a fixed number of micro-batches
(``chunks``, a multiple of every rank count you want to compare, e.g. 6 for 1/2/3
ranks); rank ``r`` computes the gradients of micro-batches ``r*k .. r*k+k-1`` one at a
time (``k = chunks / size``), and the micro-batch gradients are summed in the one global
order ``((g0 + g1) + g2) + ...``: rank ``r`` receives the running sum from rank ``r-1``,
adds its own micro-batches in order and passes it on; the last rank broadcasts the total.
One process does exactly the same additions, so the averaged gradient, and every
parameter after the optimizer step, is bitwise identical for 1, 2, 3 ... ranks.

Cost: ``size - 1`` sequential sends plus a broadcast of the gradient buffer per step, and
on ranks > 0 a copy of each own micro-batch gradient until the running sum arrives. It is
a debugging and verification mode, not the fast path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dtrain.backend import get_array_module
from dtrain.dist.base import Communicator

if TYPE_CHECKING:
    from dtrain.nn.flat import FlatParameters


class OrderedChainReducer:
    """Averages ``flat.grads`` over ``chunks`` micro-batches in a rank-count-independent order.

    Use: for each local micro-batch, run backward, then :meth:`add`; after the last one,
    :meth:`finish` leaves the mean gradient in ``flat.grads`` on every rank.
    """

    def __init__(self, flat: "FlatParameters", comm: Communicator, chunks: int) -> None:
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or chunks % comm.size:
            raise ValueError(
                f"deterministic mode needs parallel.deterministic_chunks to be a positive multiple of the "
                f"number of ranks ({comm.size}); got {chunks!r}"
            )
        self.flat = flat
        self.comm = comm
        self.chunks = chunks
        self.local_chunks = chunks // comm.size
        xp = get_array_module(flat.grads)
        self._sum = xp.zeros_like(flat.grads)
        self._held: list = []
        self._added = 0

    def add(self) -> None:
        """Take the gradient of the micro-batch just back-propagated (in ``flat.grads``)."""
        if self._added == self.local_chunks:
            raise RuntimeError(
                f"OrderedChainReducer: add() called more than {self.local_chunks} times before finish()"
            )
        self._added += 1
        if self.comm.rank == 0:
            self._sum += self.flat.grads  # rank 0 starts the global order: no prefix to wait for
        else:
            self._held.append(self.flat.grads.copy())

    def finish(self) -> None:
        """Chain the running sum through the ranks and leave the mean in ``flat.grads``."""
        if self._added != self.local_chunks:
            raise RuntimeError(
                f"OrderedChainReducer: finish() after {self._added} of {self.local_chunks} micro-batches"
            )
        comm, rank, size = self.comm, self.comm.rank, self.comm.size
        with comm.watchdog.watch("deterministic gradient chain"):
            if rank > 0:
                comm.recv(self._sum, rank - 1)
                for g in self._held:
                    self._sum += g
                self._held.clear()
            if rank < size - 1:
                comm.send(self._sum, rank + 1)
            if size > 1:
                comm.broadcast(self._sum, root=size - 1)
        xp = get_array_module(self._sum)
        xp.multiply(self._sum, 1.0 / self.chunks, out=self.flat.grads)
        self._sum[...] = 0
        self._added = 0
