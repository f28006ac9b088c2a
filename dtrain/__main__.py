"""``python -m dtrain`` and the ``dtrain`` command: see :mod:`dtrain.app`."""
from dtrain import limit_openblas_spin

limit_openblas_spin()  # before NumPy loads OpenBLAS

from dtrain.app import main  # noqa: E402

if __name__ == "__main__":
    main()
