"""`python -m distorch plan MODEL_FILE ...` and `python -m distorch demo`."""

import sys

from .cli import main

sys.exit(main())
