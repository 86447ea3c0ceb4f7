"""`python -m training`: train the seed's network and export it (see training.train)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from training.train import main  # noqa: E402

sys.exit(main())
