"""``python -m diffkiln`` (and ``torchrun ... -m diffkiln optimize``): the command line."""

import sys

from diffkiln.cli import main

if __name__ == "__main__":
    sys.exit(main())
