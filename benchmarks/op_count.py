"""Count the aten calls of one training forward+backward on CPU: how many operations (most of
them a kernel launch on a GPU) a spec's step issues — the host-side cost that bounds eager deep
memories (docs/benchmarks.md, "Deep memories").

    OMP_NUM_THREADS=1 python benchmarks/op_count.py hope --length 64

Prints the total of every ``aten::`` call the profiler records (views included) and the 15 most
frequent. The first step is run unprofiled (lazy initialisation).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from nlgraph.lower import build
from nlgraph.spec.loader import load_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", default=["vars.d_model=128", "vars.heads=2", "vars.layers=1"])
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(load_spec(args.spec, args.overrides))
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length))

    def step():
        model(tokens).float().logsumexp(-1).mean().backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    print(f"{args.spec} B={args.batch} T={args.length}: {sum(e.count for e in ops)} aten calls")
    for e in sorted(ops, key=lambda e: -e.count)[:15]:
        print(f"  {e.key:36s}{e.count}")


if __name__ == "__main__":
    main()
