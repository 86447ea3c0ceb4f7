"""`python -m serving`: the server process (serving.lifecycle)."""

import sys

from serving.lifecycle import main

if __name__ == "__main__":
    sys.exit(main())
