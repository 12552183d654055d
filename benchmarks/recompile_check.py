"""Whether a compiled model makes a new graph for each sequence length (issue 11: no recompiles
across lengths that are multiples of the chunk).

Builds each spec small, compiles its blocks (``compile_blocks(dynamic=..., backend=...)``), runs a
forward and backward at each length in turn and prints the graphs Dynamo has captured after each
(``torch._dynamo`` counters). ``--kernels interpret`` routes the levels through the Triton kernels
in Triton's interpreter, the plan a GPU run uses (on CPU; slow, so keep the model small).

    OMP_NUM_THREADS=1 python benchmarks/recompile_check.py titans gla hope --kernels interpret
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192])
    ap.add_argument("--dynamic", choices=["true", "false", "none"], default="true")
    ap.add_argument("--backend", default="aot_eager", help="aot_eager (fast) or inductor")
    ap.add_argument("--kernels", choices=["auto", "off", "interpret"], default="auto")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    if args.kernels == "interpret":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch
    from torch._dynamo.utils import counters

    from nlgraph.compilers.kernels import dispatch
    from nlgraph.lower import build

    dispatch.set_kernels(args.kernels)
    dynamic = {"true": True, "false": False, "none": None}[args.dynamic]
    ok = True
    for spec in args.specs:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build(spec, overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1", "model.vocab=64"])
        model.compile_blocks(dynamic=dynamic, backend=args.backend)
        graphs = []
        for t in args.lengths:
            tokens = torch.randint(0, 64, (args.batch, t))
            model(tokens).logsumexp(-1).mean().backward()
            graphs.append(int(counters["stats"]["unique_graphs"]))
        row = {"spec": spec, "forms": model.plan.executions(), "dynamic": dynamic, "lengths": args.lengths,
               "graphs_after_each": graphs, "new_graphs_after_the_first": graphs[-1] - graphs[0]}
        ok &= row["new_graphs_after_the_first"] == 0
        print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
