"""Check and time the chunk-walk kernel (a mini-batch DGD chunk's recurrence, token by token) against
the chunked engine it replaces (``solve_chunk``: transfer products and a triangular solve).

    python benchmarks/chunk_walk.py --check --json benchmarks/results/chunk_walk_h100.json   # on a GPU
    python benchmarks/chunk_walk.py --device cpu --check --chunks 16 32 --batch 1 --heads 1 --dim 16   # interpreted

``--check`` compares the kernel with ``chunk_walk.loop`` in float64 on the same device (reads, end
state and momentum, and the gradients of every input), with float32 and bfloat16 inputs (the
kernel computes in float32 either way, so the reference takes the inputs as the kernel saw them):
HOPE's case (momentum, retention, one slot of five reading before the write) and variants (every
row reading, reads after the write, no read, neither momentum nor retention), and chunks that end
inside the backward's checkpoint block.
The timing runs HOPE's shapes: the five stacked memories × batch × heads as the leading axis, the
two layers of a hidden-2x residual MLP (``[2D, D]`` and ``[D, 2D]``), momentum, per-head retention,
a read before the write, at chunks of 16 (the paper's) and 256 (``hope_large_chunk``): forward and
forward + backward of the kernel and of the engine, eager, in the same process. Without CUDA (and
without ``--device cpu``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nlgraph.bench import median_ms, rel_err
from nlgraph.compilers import chunked
from nlgraph.compilers.kernels import chunk_walk as walk_module
from nlgraph.compilers.kernels.chunk_walk import chunk_walk, loop

NAMES = ("w0", "s0", "x", "erase", "b", "f", "alpha", "mu", "u")


def inputs(nn: int, n: int, o: int, i: int, dev: torch.device, dtype: torch.dtype, seed: int = 0,
           mom: bool = True, decay: bool = True, readers: int | None = None) -> dict:
    """HOPE-like inputs: unit-norm layer inputs, η' in (0, 1), α near 1, μ in (0, 1); queries for
    ``readers`` leading rows (all by default)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=0.3):
        return (scale * torch.randn(*s, generator=g)).to(dev, dtype)

    x = torch.nn.functional.normalize(torch.randn(nn, n, i, generator=g), dim=-1).to(dev, dtype)
    a = dict(w0=r(nn, o, i), s0=r(nn, o, i, scale=0.05), x=x, erase=x, b=torch.rand(nn, n, generator=g).to(dev, dtype),
             f=r(nn, n, o, scale=0.1), alpha=(0.9 + 0.1 * torch.rand(nn, n, generator=g)).to(dev, dtype),
             mu=torch.rand(nn, n, generator=g).to(dev, dtype), u=r(readers or nn, n, i, scale=1.0))
    if not mom:
        a["s0"] = a["mu"] = None
    if not decay:
        a["alpha"] = None
    return a


#: what the check varies around HOPE's case (momentum, retention, the memory slot's rows reading
#: before the write): (name, momentum, retention, read, only one slot's rows read)
VARIANTS = [("hope", True, True, "before", True), ("all_rows", True, True, "before", False),
            ("after", True, True, "after", True), ("no_read", True, True, "none", False),
            ("plain", False, False, "after", True)]


def check(dev: torch.device, cases: list[tuple[int, int, int, int, str]]) -> list[dict]:
    rows = []
    for nn, n, o, i, variant in cases:
        _, mom, decay, read, one_slot = next(v for v in VARIANTS if v[0] == variant)
        span = (0, nn // 5) if one_slot and read != "none" else None  # the memory slot of five
        for dtype in (torch.float32, torch.bfloat16):
            a = inputs(nn, n, o, i, dev, dtype, mom=mom, decay=decay, readers=span[1] if span else None)
            if read == "none":
                a["u"] = None
            names = [k for k in NAMES if a[k] is not None]
            ref_in = {k: (v.double().requires_grad_() if v is not None else None) for k, v in a.items()}
            ref = loop(**ref_in, read=read, rows=span)
            gen = torch.Generator().manual_seed(5)
            cots = [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dev) for t in ref]
            ref_g = torch.autograd.grad(sum((t * c).sum() for t, c in zip(ref, cots) if t is not None),
                                        [ref_in[k] for k in names])
            ker_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in a.items()}
            out = chunk_walk(**ker_in, read=read, rows=span)
            ker_g = torch.autograd.grad(sum((t.double() * c).sum() for t, c in zip(out, cots) if t is not None),
                                        [ker_in[k] for k in names])
            errs = {k: rel_err(t.detach(), r.detach()) for k, t, r in zip(("reads", "w_end", "s_end"), out, ref)
                    if r is not None}
            errs |= {f"d{k}": rel_err(gk, gr) for k, gk, gr in zip(names, ker_g, ref_g)}
            # the kernel's arithmetic is float32 whatever the inputs; the gradients are cast to them
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            ok = all(e < (tol if k in ("reads", "w_end", "s_end") or dtype == torch.float32 else 1e-2)
                     for k, e in errs.items())
            rows.append({"nn": nn, "n": n, "o": o, "i": i, "variant": variant, "dtype": str(dtype),
                         "worst": max(errs.values()), "errors": errs, "ok": ok})
            print(f"check {variant} nn={nn} n={n} [{o}, {i}] {dtype}: worst {max(errs.values()):.2e} "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    return rows


def engine(a: dict):
    """The chunked form's maths for the same chunk: transfer products, the triangular solve, the
    reads before the write and the end state."""
    g = chunked.transfer(a["alpha"], False)
    y = chunked.transfer(a["mu"], False)
    sol = chunked.solve_chunk(a["w0"], a["s0"], a["x"], a["erase"], a["b"], a["f"], g, y, False)
    return (sol.read(a["u"], True), *sol.end())


def time_case(dev: torch.device, nn: int, n: int, o: int, i: int, dtype: torch.dtype, reps: int,
              kernels_only: bool = False) -> dict:
    a = inputs(nn, n, o, i, dev, dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in a.items()}

    def fwd(fn):
        with torch.no_grad():
            return fn()

    def fb(fn):
        outs = fn()
        torch.autograd.grad(sum(t.float().sum() for t in outs), list(leaves.values()))

    walk = (lambda: chunk_walk(**leaves, read="before"))

    def eng():  # as in a model under bf16 autocast: float32 products of the gates, the rest autocast
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return engine(leaves)

    row = {"nn": nn, "n": n, "o": o, "i": i, "dtype": str(dtype)}
    if not kernels_only:
        for name, fn in (("walk", walk), ("engine", eng)):
            row[f"{name}_fwd_ms"] = median_ms(lambda: fwd(fn), dev, reps)
            row[f"{name}_fb_ms"] = median_ms(lambda: fb(fn), dev, reps)
    # the kernels' own GPU time (the profiler's, averaged over the launches): eager timings of ops
    # this small measure the host's dispatch, not the kernels
    ops = torch.ops.nlgraph
    c = [a[k].contiguous() for k in NAMES]
    lay = (walk_module.TILE, walk_module.WARPS)
    rd, wt, st = ops.chunk_walk_fwd(*c, 1, 0, nn, *lay)
    cot = (torch.ones_like(rd), torch.ones_like(wt), torch.ones_like(st))
    ops.chunk_walk_bwd(*c, 1, 0, nn, *cot, *lay)
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                ops.chunk_walk_fwd(*c, 1, 0, nn, *lay)
                ops.chunk_walk_bwd(*c, 1, 0, nn, *cot, *lay)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.key in ("_fwd", "_bwd"):
                us = getattr(ev, "device_time_total", None) or ev.cuda_time_total
                row[f"kernel{ev.key}_us"] = us / ev.count
    kern = (f"kernels {row['kernel_fwd_us']:.1f} / {row['kernel_bwd_us']:.1f} µs (fwd / bwd, GPU time)"
            if "kernel_fwd_us" in row else "")
    print(f"time nn={nn} n={n} [{o}, {i}] {dtype}: {kern}" + ("" if kernels_only else
          f", walk {row['walk_fwd_ms']:.3f} / {row['walk_fb_ms']:.3f} ms, "
          f"engine {row['engine_fwd_ms']:.3f} / {row['engine_fb_ms']:.3f} ms (fwd / fwd+bwd)"), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--batch", type=int, default=4, help="sequences (the leading axis is 5 memories × batch × heads)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64, help="head width D (the layers are [2D, D] and [D, 2D])")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernels-only", action="store_true",
                    help="only the kernels' GPU time under the profiler (no eager walk or engine timing)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to time (--device cpu runs the kernels interpreted with "
              "NLGRAPH_KERNELS=interpret)")
        return 0
    if dev.type == "cpu":  # Triton's interpreter, read when triton is first imported (the first launch)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    nn, d = 5 * args.batch * args.heads, args.dim
    layers = [(2 * d, d), (d, 2 * d)]
    res = {"command": " ".join(sys.argv), "torch": torch.__version__,
           "layout": {"tile": walk_module.TILE, "warps": walk_module.WARPS, "checkpoint": walk_module.CHECKPOINT,
                      "prefetch": walk_module.PREFETCH},
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "checks": [], "timings": []}
    if args.check:
        # every variant at the model's leading size and the short chunk; HOPE's case at a chunk that
        # ends inside a checkpoint block (20) and at the long chunks, a smaller leading size there
        # (the float64 reference walks token by token)
        small = max(5, min(nn, 20) // 5 * 5)
        res["checks"] = check(dev, [(nn, args.chunks[0], o, i, v[0]) for v in VARIANTS for o, i in layers]
                              + [(small, n, o, i, "hope") for n in (20, *args.chunks[1:]) for o, i in layers])
    if not args.no_timing:
        for n in args.chunks:
            for o, i in layers:
                for dtype in (torch.float32, torch.bfloat16):
                    res["timings"].append(time_case(dev, nn, n, o, i, dtype, args.reps, args.kernels_only))
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
