"""``python -m coati.launch``: kept as a module path; the command line lives in :mod:`coati.cli.launch`."""

import sys

from coati.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
