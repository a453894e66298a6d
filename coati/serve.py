"""``python -m coati.serve``: the reward server's command line (:mod:`coati.cli.serve`); the server itself is the
:mod:`coati.serving` package."""

import sys

from coati.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
