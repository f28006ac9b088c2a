"""Parallel strategies: data-parallel gradient averaging (all-reduce in buckets, the ordered
chain of deterministic mode, synchronized BatchNorm), compute workers, and row-partitioned
GEMMs with their device mapping (model parallelism)."""
