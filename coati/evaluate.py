"""``python -m coati.evaluate``: kept as a module path; the command line lives in :mod:`coati.cli.evaluate`."""

import sys

from coati.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
