"""`python -m cclddg` runs the command line, as `cclddg` does."""

import sys

from cclddg.cli import main

if __name__ == "__main__":
    sys.exit(main())
