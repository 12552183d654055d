"""``python -m nlgraph``: the nlgraph command (what torchrun runs: ``torchrun -m nlgraph train ...``)."""

import sys

from .cli import main

sys.exit(main())
