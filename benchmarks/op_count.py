"""Count the aten calls of one training forward+backward on CPU: how many operations (most of
them a kernel launch on a GPU) a spec's step issues — the host-side cost that bounds eager deep
memories (docs/benchmarks.md, "Deep memories").

    OMP_NUM_THREADS=1 python benchmarks/op_count.py hope --length 64

Prints the total of every ``aten::`` call the profiler records (views included) and the 15 most
frequent, then the operators that would launch a kernel on a GPU (counted below autograd, views and
metadata-only operators left out), forward and backward: on a GPU, replayed as CUDA graphs, a deep
memory's step time is about that count times a few microseconds. The first step is run unprofiled
(lazy initialisation).

``--bf16`` runs the step under bf16 autocast (what training runs on a GPU). ``--per-segment N``
counts instead what N more tokens add (the step at ``--length`` and at twice it, the difference
over ``length / N``), forward and backward apart, with the copies among them (casts, clones,
concatenations, stacks): a deep memory's cost per segment or chunk, without what every step pays
once.

    NLGRAPH_KERNELS=interpret OMP_NUM_THREADS=1 python benchmarks/op_count.py hope vars.d_model=32 \
        vars.heads=2 vars.layers=1 --batch 1 --bf16 --per-segment 16
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from nlgraph.lower import build
from nlgraph.spec.loader import load_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", default=["vars.d_model=128", "vars.heads=2", "vars.layers=1"])
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="the step under bf16 autocast")
    p.add_argument("--per-segment", type=int, default=None, metavar="N",
                   help="what N more tokens launch, forward and backward (from --length and twice it)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(load_spec(args.spec, args.overrides))
    if args.per_segment:
        _per_segment(model, args)
        return
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length))

    def step():
        _loss(model, tokens, args.bf16).backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    print(f"{args.spec} B={args.batch} T={args.length}: {sum(e.count for e in ops)} aten calls")
    for e in sorted(ops, key=lambda e: -e.count)[:15]:
        print(f"  {e.key:36s}{e.count}")
    launches = _Launches()
    with launches:
        step()
    print(f"operators that launch a kernel: {sum(launches.counts.values())}")
    for name, n in launches.counts.most_common(10):
        print(f"  {name:36s}{n}")


def _loss(model, tokens: torch.Tensor, bf16: bool) -> torch.Tensor:
    """A scalar of the logits that reaches every parameter (under bf16 autocast with ``bf16``)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(tokens).float().logsumexp(-1).mean()


def _per_segment(model, args) -> None:
    counts = {}
    for t in (args.length, 2 * args.length):
        tokens = torch.randint(0, model.spec.model.vocab, (args.batch, t))
        _loss(model, tokens, args.bf16).backward()  # lazy initialisation, uncounted
        fwd = _Launches()
        with fwd:
            loss = _loss(model, tokens, args.bf16)
        bwd = _Launches()
        with bwd:
            loss.backward()
        counts[t] = (fwd.counts, bwd.counts)
    n = args.length / args.per_segment
    print(f"{args.spec} B={args.batch}{' bf16 autocast' if args.bf16 else ''}: what {args.per_segment} "
          f"tokens add (T={args.length} → {2 * args.length}, over {n:g} segments)")
    for i, phase in enumerate(("forward", "backward")):
        d = collections.Counter(counts[2 * args.length][i])
        d.subtract(counts[args.length][i])
        copies = sum(v for k, v in d.items() if k in _COPIES)
        print(f"  {phase}: {sum(d.values()) / n:g} operators, {copies / n:g} of them copies")
        for name, c in d.most_common(8):
            print(f"    {name:34s}{c / n:g}")


#: operators that copy: dtype casts (autocast's among them), clones, concatenations, stacks
_COPIES = {"aten._to_copy", "aten.copy_", "aten.clone", "aten.cat", "aten.stack"}

#: operators that make no kernel: allocation, metadata, aliasing (views are told by their schema)
_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.resolve_conj", "aten.resolve_neg",
              "aten.detach", "aten.lift_fresh", "aten._local_scalar_dense", "aten.sym_size", "aten.sym_stride",
              "aten.sym_numel", "aten.sym_storage_offset", "aten.is_same_size", "aten.set_", "aten._unsafe_view"}


class _Launches(TorchDispatchMode):
    """Counts the operators below autograd that compute something (each one or more kernels on a
    GPU, unless a compiler fuses them)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func._opname}"
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        on_meta = isinstance(first, torch.Tensor) and first.is_meta  # shapes only: no kernel
        if not func.is_view and name not in _NO_KERNEL and not on_meta:
            self.counts[name] += 1
        return out


if __name__ == "__main__":
    main()
