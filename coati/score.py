"""``python -m coati.score``: kept as a module path; the command line lives in :mod:`coati.cli.score`."""

import sys

from coati.cli.score import main

if __name__ == "__main__":
    sys.exit(main())
