"""`python -m serving`: parse flags/environment into Settings and run the server."""

import sys

from serving.config import parse_args
from serving.server import run

if __name__ == "__main__":
    sys.exit(run(parse_args()))
