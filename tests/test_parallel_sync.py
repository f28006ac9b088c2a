"""Replica consistency: the checksum in process, and under mpirun the start-up broadcast,
divergence/NaN detection naming the rank, and the BatchNorm statistics reduction."""
from __future__ import annotations

import numpy as np
import pytest
from mpirun_helper import assert_ok, run_mpi

from dtrain.comm.single import SingleCommunicator
from dtrain.parallel.sync import check_consistency, make_stats_reducer, params_checksum


def test_bit_checksum_is_exact_and_order_independent(rng):
    p = rng.standard_normal(10_001).astype(np.float32)
    bits, total = params_checksum(p)
    assert params_checksum(p[::-1].copy())[0] == bits  # order does not matter
    unaligned = np.concatenate([np.zeros(1, dtype=np.float32), p])[1:]  # 4-byte offset view
    assert params_checksum(unaligned)[0] == bits  # nor does alignment
    q = p.copy()
    q[5000] = np.nextafter(q[5000], np.float32(np.inf))
    assert params_checksum(q)[0] != bits  # one ulp anywhere changes it
    assert total == pytest.approx(float(p.astype(np.float64).sum()))
    q[3] = np.nan
    assert not np.isfinite(params_checksum(q)[1])


def test_world_of_one_is_always_consistent_and_stats_pass_through():
    class Flat:
        params = np.ones(10, dtype=np.float32)

    check_consistency(SingleCommunicator(), Flat(), step=0)
    stats = np.arange(6, dtype=np.float64)
    np.testing.assert_array_equal(make_stats_reducer(SingleCommunicator())(stats), np.arange(6))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_broadcast_and_consistency_check_under_mpi(n):
    assert_ok(run_mpi("consistency.py", n), n)
