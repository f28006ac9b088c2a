"""``python -m dtrain``: see :mod:`dtrain.app`."""
from dtrain.app import main

if __name__ == "__main__":
    main()
