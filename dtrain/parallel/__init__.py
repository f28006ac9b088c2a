"""Parallel execution across devices: row-partitioned GEMMs (model parallelism)."""
from dtrain.parallel.row_partition import (
    RowPartitioner,
    disable_row_partition,
    enable_row_partition,
    row_partition_matmul,
)

__all__ = ["RowPartitioner", "disable_row_partition", "enable_row_partition", "row_partition_matmul"]
