"""Run ``python -m nlgraph ARGS`` with Titans' MLP-memory kernels at a given warp count and hidden
block (a tuning run: the defaults are ``mlp_memory.default_warps`` / ``default_block_f``)::

    python -P benchmarks/with_mlp_warps.py WARPS BLOCK_F bench titans ...
"""

import sys

from nlgraph.cli import main
from nlgraph.compilers.kernels import mlp_memory

if __name__ == "__main__":
    warps, block_f = int(sys.argv[1]), int(sys.argv[2])
    mlp_memory.default_warps = lambda chunk, d: warps
    mlp_memory.default_block_f = lambda chunk, d: block_f
    sys.exit(main(sys.argv[3:]))
