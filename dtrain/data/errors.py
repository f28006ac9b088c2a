"""Error types of the data package.

``DataError`` means a dataset file is missing its expected layout (corrupt, truncated or the
wrong file); its message names the file and what was expected. ``DatasetUnavailable`` means
the data cannot be had at all (not on disk and not downloadable), which a caller may answer
by falling back to another dataset.
"""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file or array is malformed; the message names the file and the problem."""


class DatasetUnavailable(DataError):
    """The dataset is neither on disk nor downloadable (offline, mirrors failing, no package)."""
