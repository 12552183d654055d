"""Which tensors a compiled training step adds gradients for outside its compiled graphs: one step of a
spec (compiled blocks, bf16 autocast) under ``torch.profiler`` on CPU with shapes recorded, every
``aten::add`` / ``aten::add_`` attributed to the autograd node that runs it (or to the forward when
none does) and to what its shape is: a parameter's shape, or an activation's / a state's.

A model that calls its blocks once per segment (in-context levels: HOPE) runs one compiled graph per
segment and block; a tensor that several of those graphs read (a weight, the memory state a segment
hands on, an in-context level's values) gets one gradient from each, and autograd adds them between
the graphs, one small kernel each on a GPU.

    python benchmarks/grad_adds.py hope --d-model 64 --layers 2 --heads 2 --batch 2 --length 256
"""

from __future__ import annotations

import argparse
import collections
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from nlgraph.lower import build
    from nlgraph.train.loop import lm_loss

    torch.manual_seed(0)
    model = build(args.spec, overrides=[f"vars.d_model={args.d_model}", f"vars.layers={args.layers}",
                                        f"vars.heads={args.heads}"])
    model.compile_blocks()
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length + 1))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()

    t0 = time.perf_counter()
    step()  # compiles
    step()
    print(f"compile and two steps: {time.perf_counter() - t0:.1f} s")
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    by_node: collections.Counter = collections.Counter()
    by_shape: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.name not in ("aten::add", "aten::add_"):
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        node = next((c.replace("autograd::engine::evaluate_function: ", "") for c in chain
                     if "evaluate_function" in c), "forward (no autograd node)")
        shape = tuple(e.input_shapes[0]) if e.input_shapes and e.input_shapes[0] else ()
        kind = "parameter" if shape in param_shapes else "scalar" if not shape else "activation / state"
        by_node[node] += 1
        by_shape[(node, kind, shape)] += 1
    total = sum(by_node.values())
    print(f"{args.spec}: d_model {args.d_model}, {args.layers} layers, B={args.batch}, T={args.length}: "
          f"{total} adds in one step")
    print("\nby autograd node")
    for node, n in by_node.most_common(args.top):
        print(f"{n:6d}  {node}")
    print("\nby node, kind and shape")
    for (node, kind, shape), n in by_shape.most_common(args.top):
        print(f"{n:6d}  {node:40s} {kind:20s} {list(shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
