"""Check and time the chunk solves of the mini-batch forms (``NLGRAPH_CHUNK_SOLVE``: ``triangular``,
one ``torch.linalg.solve_triangular``; ``blocked``, the inverse by doubling from the diagonal blocks'
and one matmul; ``kernel``, nlgraph's Triton solve, which the default ``auto`` takes on CUDA since
this script timed it there; ``compilers/chunked.py``'s ``_solve_lower``).

    bash benchmarks/device.sh python -P benchmarks/chunk_solve.py --json "$OUT/chunk_solve.json"

1. check: a small ``hope_large_chunk`` model (d_model 64, one layer, T=512: two 256-token chunks)
   gives the same logits and parameter gradients through each solve as through ``triangular``, in
   float32 (limit 1e-4) and, on CUDA, under bf16 autocast as training runs (limit 2e-2), and the
   solve runs there; the Triton solve alone, forward and both gradients (``a⁻¹ r`` and ``a⁻ᵀ r``),
   against float64 at the model's chunk (limit 1e-5; Triton 3.4–3.7 miscompiles some kernels on
   Hopper that its CPU interpreter runs right);
2. timing: the solve alone, forward and forward + backward, float32, median of CUDA-event timings,
   at the two calls ``hope_large_chunk`` makes per chunk at d_model 512, B=8 (``--batch``), 8 heads:
   ``a [B, H, 256, 256]`` against right-hand sides ``[5, B, H, 256, 128]`` (the five memories'
   first layers, broadcast) and ``a [5, B, H, 256, 256]`` against ``[5, B, H, 256, 64]``.

The model check runs on CPU too (``--device cpu``); the timing needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def model_check(device: str, mode: str, bf16: bool = False) -> dict:
    from nlgraph import load_spec
    from nlgraph.bench import rel_err as rel
    from nlgraph.compilers import chunked
    from nlgraph.lower import build

    torch.manual_seed(0)
    model = build(load_spec("hope_large_chunk", ["vars.d_model=64", "vars.heads=2", "vars.layers=1"]),
                  device=torch.device(device))
    tokens = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(1)).to(device)
    from nlgraph.compilers.kernels import dispatch, solve_lower

    out, calls = {}, []
    saved = (chunked.CHUNK_SOLVE, chunked._inverse_lower, solve_lower._solve_op, dispatch.chunk_walk_for)
    try:
        chunked._inverse_lower = lambda *a: calls.append(1) or saved[1](*a)
        solve_lower._solve_op = lambda *a: calls.append(1) or saved[2](*a)
        # on CUDA the chunk walk takes chunks up to 16 only; interpreted on CPU it would take these
        dispatch.chunk_walk_for = lambda run: None
        for m in ("triangular", mode):
            chunked.CHUNK_SOLVE = m
            calls.clear()
            model.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(tokens).float()
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            out[m] = (logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        chunked.CHUNK_SOLVE, chunked._inverse_lower, solve_lower._solve_op, dispatch.chunk_walk_for = saved
    (lt, gt), (lb, gb) = out["triangular"], out[mode]
    limit = 2e-2 if bf16 else 1e-4
    row = {"check": f"hope_large_chunk d_model 64, T=512, {'bf16 autocast' if bf16 else 'float32'}: "
                    f"{mode} == triangular",
           "logits": rel(lb, lt), "grads": max(rel(b, a) for a, b in zip(gt, gb)), "calls": len(calls),
           "limit": limit}
    row["ok"] = row["logits"] <= limit and row["grads"] <= limit and len(calls) > 0
    return row


def kernel_check(dev: torch.device, n: int = 256, prec: str = "ieee") -> dict:
    """The Triton solve alone against float64: ``a⁻¹ r`` and ``a⁻ᵀ r`` and both operands' gradients,
    ``a`` broadcast over the right-hand sides' leading dim as the model calls it."""
    from nlgraph.compilers.kernels import solve_lower
    from nlgraph.compilers.kernels.solve_lower import solve_unit_lower

    gen = torch.Generator().manual_seed(3)
    a = torch.eye(n, dtype=torch.float64) + torch.tril(torch.randn(4, 2, n, n, generator=gen, dtype=torch.float64),
                                                       -1) * (0.5 / n ** 0.5)
    r = torch.randn(3, 4, 2, n, 40, generator=gen, dtype=torch.float64)
    dy = torch.randn(3, 4, 2, n, 40, generator=gen, dtype=torch.float64)
    worst, saved, solve_lower._PREC = 0.0, solve_lower._PREC, prec
    try:
        for transpose in (False, True):
            got, want = [], []
            for fn, dtype, d in ((solve_unit_lower, torch.float32, dev), (None, torch.float64, torch.device("cpu"))):
                aa = a.to(d, dtype).requires_grad_()
                rr = r.to(d, dtype).requires_grad_()
                y = fn(aa, rr, transpose) if fn else torch.linalg.solve_triangular(
                    aa.mT if transpose else aa, rr, upper=transpose, unitriangular=True)
                ga, gr = torch.autograd.grad((y * dy.to(d, dtype)).sum(), (aa, rr))
                (got if fn else want).append([t.detach().double().cpu() for t in (y, ga.tril(-1), gr)])
            for x, w in zip(got[0], want[0]):
                worst = max(worst, ((x - w).norm() / w.norm()).item())
    finally:
        solve_lower._PREC = saved
    return {"check": f"Triton solve ({prec}) vs float64, n={n}, fwd and grads, plain and transposed", "rel": worst,
            "limit": 1e-5, "ok": worst <= 1e-5}


def timing(args, dev: torch.device) -> list[dict]:
    from nlgraph.bench import median_ms
    from nlgraph.compilers import chunked

    gen = torch.Generator(device=dev).manual_seed(0)
    from nlgraph.compilers.kernels import solve_lower

    n, b, h = args.chunk, args.batch, args.heads
    rows, saved = [], (chunked.CHUNK_SOLVE, solve_lower.ROWS, solve_lower._PREC)
    for a_shape, r_shape in (((b, h, n, n), (5, b, h, n, 128)), ((5, b, h, n, n), (5, b, h, n, 64))):
        a = torch.eye(n, device=dev) + torch.tril(torch.randn(*a_shape, device=dev, generator=gen), -1) * (0.5 / n ** 0.5)
        r = torch.randn(*r_shape, device=dev, generator=gen)
        a.requires_grad_(), r.requires_grad_()
        try:
            runs = [(m, bs, p) for m in args.modes for bs in (args.kernel_blocks if m == "kernel" else [None])
                    for p in (args.kernel_products if m == "kernel" else [None])]
            for mode, bs, prec in runs:
                chunked.CHUNK_SOLVE = mode
                if bs:
                    solve_lower.ROWS, solve_lower._PREC = str(bs), prec

                def f_b():
                    a.grad = r.grad = None
                    chunked._solve_lower(a, r).sum().backward()

                with torch.no_grad():
                    fwd = median_ms(lambda: chunked._solve_lower(a, r), dev, reps=args.reps, warmup=3)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                row = {"solve": mode + (f" (rows {bs} a block, {prec})" if bs else ""), "a": list(a_shape),
                       "rhs": list(r_shape), "fwd_ms": fwd,
                       "fwd_bwd_ms": median_ms(f_b, dev, reps=args.reps, warmup=3),
                       "peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            chunked.CHUNK_SOLVE, solve_lower.ROWS, solve_lower._PREC = saved
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--modes", nargs="+", default=["triangular", "blocked", "kernel"])
    ap.add_argument("--kernel-blocks", type=int, nargs="+", default=[16, 32, 64], choices=(16, 32, 64),
                    help="the Triton solve's rows a block to time (NLGRAPH_SOLVE_ROWS; its own default: 16)")
    ap.add_argument("--kernel-products", nargs="+", default=["ieee", "tf32x3"],
                    help="the Triton solve's float32 products (tl.dot input_precision) to time (its own: ieee)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps(res), flush=True)
    others = [m for m in args.modes if m != "triangular"]
    if "kernel" in others:
        from nlgraph.compilers.kernels import dispatch

        dispatch.set_kernels("auto" if dev.type == "cuda" else "interpret")
    checks = [kernel_check(dev, prec=p) for p in args.kernel_products] if "kernel" in others else []
    checks += [model_check(device, m) for m in others]
    checks += [model_check(device, m, bf16=True) for m in others] if dev.type == "cuda" else []
    res["checks"] = checks
    for row in res["checks"]:
        print(json.dumps(row), flush=True)
    res["timings"] = timing(args, dev) if dev.type == "cuda" else []
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
