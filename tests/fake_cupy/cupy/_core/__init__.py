"""Fake ``cupy._core``: only :mod:`cupy._core._routines_linalg` (dtrain's TF32 switch)."""
