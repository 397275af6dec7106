"""`python -m rnq_ep ...` is `rnq-ep ...`."""

import sys

from rnq_ep.cli import main

if __name__ == "__main__":
    sys.exit(main())
