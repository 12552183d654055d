"""Titans' MLP-memory kernel on the GPU: its checks, then its speed against nlgraph's PyTorch form.

``nlgraph.compilers.kernels.mlp_memory.chunk_mlp_memory`` is checked against the float64 token loop
on outputs, final state and every input's gradient (float32 and bfloat16, partial last chunks),
which is what rules out the Hopper backward miscompiles of triton 3.4–3.7 that Triton's CPU
interpreter cannot show. Then forward and forward + backward are timed at issue 11's anchor shape
(B=4, T=4096, H=16, D=128, MLP 128→512→128, bf16), at chunk 16 (the kernel does not run chunk 64 at
D = 128 on CUDA), and at the d_model-512 Titans model's level shape (B=8, T=2048, H=8, D=64,
hidden 128, chunk 16), next to the ``chunked`` form of ``specs/titans.yaml``'s memory level in the
same process (``--no-pytorch`` skips it). Without
CUDA it says so and exits 0. The Titans model with the kernel: ``python -P -m nlgraph bench titans ...``
and ``python benchmarks/model_speed.py --budget 0 --check-specs titans``. Each check and shape can be
run alone (``--checks``, ``--shapes``), so that a kernel that hangs or faults is found in its own
process. ``--splits`` picks the kernel layouts checked and timed: 0 is one program per (batch, head)
walking every chunk, ``n`` ≥ 1 one launch per chunk with ``n`` hidden blocks per program.

    bash benchmarks/device.sh python benchmarks/mlp_memory_kernel.py --json "$OUT/mlp_memory.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _rel(a, b) -> float:
    from nlgraph.bench import rel_err

    return rel_err(a.detach(), b.detach())


def _inputs(b, t, h, d, f, dev, seed=0):
    from nlgraph.compilers.kernels.mlp_memory import random_inputs

    qkv, gates, state = random_inputs(b, t, h, d, f, seed)
    return [x.to(dev) for x in qkv], [g.to(dev) for g in gates], [s.to(dev) for s in state]


CHECKS = [(2, 150, 2, 64, 128, 16, torch.float32, 1e-4, 1),
          (2, 150, 2, 64, 128, 16, torch.float32, 1e-4, 3),
          (1, 96, 2, 64, 128, 32, torch.bfloat16, 3e-2, 1),
          (1, 200, 2, 64, 128, 64, torch.float32, 1e-4, 1),
          (1, 200, 2, 128, 192, 16, torch.float32, 1e-4, 1),
          (1, 200, 2, 128, 192, 64, torch.float32, 1e-4, 1),
          (1, 200, 2, 128, 512, 64, torch.bfloat16, 3e-2, 2),
          (1, 200, 2, 128, 256, 32, torch.float32, 1e-4, 1),
          (1, 200, 2, 128, 512, 16, torch.bfloat16, 3e-2, 2),
          # bfloat16 at a tile of 4096 (they passed on the H200; MAX_CUDA_TILE was raised to 4096 after them)
          (1, 200, 2, 64, 128, 64, torch.bfloat16, 3e-2, 1),
          (1, 200, 2, 128, 256, 32, torch.bfloat16, 3e-2, 1)]


def checks(dev, which: list[int] | None = None, splits: tuple[int, ...] = (0,), warps: int | None = None,
           block_f: int | None = None) -> list[dict]:
    """The checks ``which`` (indices into ``CHECKS``, all by default), each row with its seconds
    (the first call's Triton compile included)."""
    import time

    from nlgraph.compilers.kernels.mlp_memory import (chunk_mlp_memory, default_block_f, default_warps, tile,
                                                      token_loop)

    rows = []
    for i, (b, t, h, d, f, chunk, dtype, tol, ck), split in ((i, c, sp) for i, c in enumerate(CHECKS) for sp in splits):
        if which is not None and i not in which:
            continue
        t0 = time.perf_counter()
        label = (f"{str(dtype).removeprefix('torch.')} B={b} T={t} H={h} D={d} F={f} chunk={chunk} checkpoint={ck} "
                 f"split={split}")
        try:
            rows.append(_check(chunk_mlp_memory, token_loop, b, t, h, d, f, chunk, dtype, tol, dev, label, ck, split,
                               warps, block_f))
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed row that says why
            rows.append({"check": label, "ok": False,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        # the wrapper's defaults unless given
        rows[-1].update({"seconds": round(time.perf_counter() - t0, 1), "block_f": block_f or default_block_f(chunk, d),
                         "warps": warps or default_warps(chunk, d), "tile": tile(chunk, d)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _check(chunk_mlp_memory, token_loop, b, t, h, d, f, chunk, dtype, tol, dev, label, ck, split, warps=None,
           block_f=None) -> dict:
    """One check against the float64 token loop: outputs, final state and every input's gradient."""
    qkv, gates, state = _inputs(b, t, h, d, f, dev, seed=t)
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates, *state)]
    o_ref, s_ref = token_loop(*leaves[:6], tuple(leaves[6:]), chunk)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(dev)
    ds = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dev) for x in s_ref]
    want = torch.autograd.grad((o_ref * do).sum() + sum((x * y).sum() for x, y in zip(s_ref, ds)), leaves)
    mine = [x.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(leaves)]
    o, s = chunk_mlp_memory(*mine[:6], tuple(mine[6:]), chunk=chunk, checkpoint=ck, split=split, warps=warps,
                            block_f=block_f)
    got = torch.autograd.grad((o.float() * do.float()).sum() + sum((x * y.float()).sum() for x, y in zip(s, ds)),
                              mine)
    errs = {"o": _rel(o, o_ref)}
    errs.update({f"state{i}": _rel(a, w) for i, (a, w) in enumerate(zip(s, s_ref))})
    names = ["q", "k", "v", "eta", "alpha", "mu", "W0", "W1", "S0", "S1"]
    errs.update({f"d{n}": _rel(a, w) for n, a, w in zip(names, got, want)})
    worst = max(errs.values())
    return {"check": label, "max_rel_err": worst, "limit": tol, "ok": worst < tol, "errors": errs}


# issue 11's anchor shape is chunk 64, whose D = 128 tile the kernel does not run on CUDA
# (mlp_memory.MAX_CUDA_TILE): it is timed at chunk 16
SHAPES = {"anchor-c16": (4, 4096, 16, 128, 512, 16), "titans": (8, 2048, 8, 64, 128, 16)}


def timings(dev, pytorch: bool, shapes: list[str], blocks: list[int], splits: tuple[int, ...] = (0,),
            warps: tuple[int, ...] = (4, 8)) -> list[dict]:
    from nlgraph.bench import time_rows
    from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory

    rows = []
    for label in shapes:
        b, t, h, d, f, chunk = SHAPES[label]
        qkv, gates, state = _inputs(b, t, h, d, f, dev)
        qkv = [x.bfloat16() for x in qkv]
        gates = [g.float() for g in gates]
        state = [s.float() for s in state]
        # the layout, the hidden block and the warps are the kernel's tuning knobs: each triple is a row
        impls = [(f"nlgraph chunk_mlp_memory (triton, split {sp}, block_f {bf}, {w} warps)",
                  lambda q, k, v, g=gates, s=state, bf=bf, w=w, sp=sp: chunk_mlp_memory(
                      q, k, v, *g, tuple(s), chunk=chunk, block_f=bf, warps=w, split=sp)[0], False)
                 for sp in splits for bf in blocks for w in warps if bf <= max(16, f)]
        ref = None
        if pytorch:  # the PyTorch form first: the kernel's rows carry their ratio to it
            from nlgraph.runtime import run_level
            from nlgraph.spec.loader import load_spec

            level = load_spec("titans", [f"vars.heads={h}", f"levels.memory.gradient_point.chunk={chunk}",
                                         f"levels.memory.memory.hidden={f}"]).levels["memory"]
            names = ("memory.w0", "memory.w1", "optimizer.memory.momentum.w0", "optimizer.memory.momentum.w1")
            st = dict(zip(names, state))

            def chunked(q, k, v, g=gates, st=st, level=level):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return run_level(level, keys=k, values=v, queries=q, lr=g[0], retention=g[1], momentum=g[2],
                                     state=st, form="chunked")[0]

            ref = "nlgraph chunked form (pytorch, eager, autocast)"
            impls.insert(0, (ref, chunked, True))
        shape = {"shape": label, "B": b, "T": t, "H": h, "D": d, "F": f, "chunk": chunk}
        rows += [{**shape, **r} for r in time_rows(impls, qkv, b * t, dev, lambda line: print(line, flush=True),
                                                     ref, compare=True)]
    return rows


def profiles(dev, shapes: list[str], blocks: list[int], splits: tuple[int, ...], warps: tuple[int, ...]) -> list[dict]:
    """Where one forward + backward's time goes, per layout: its wall time, the GPU's busy time (the
    kernels' summed device time) and the kernels that take the most, under ``torch.profiler``
    after three warm-up steps. A wall time far above the busy time is host-bound (launches)."""
    import itertools
    import time

    from torch.profiler import ProfilerActivity, profile

    from nlgraph.compilers.kernels.mlp_memory import chunk_mlp_memory

    rows = []
    for label in shapes:
        b, t, h, d, f, chunk = SHAPES[label]
        qkv, gates, state = _inputs(b, t, h, d, f, dev)
        leaves = [x.bfloat16().requires_grad_() for x in qkv]
        for sp, bf, w in itertools.product(splits, blocks, warps):
            def step():
                o, _ = chunk_mlp_memory(*leaves, *gates, tuple(state), chunk=chunk, block_f=bf, warps=w,
                                        split=sp)
                o.float().square().sum().backward()

            for _ in range(3):
                step()
            torch.cuda.synchronize(dev)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize(dev)
                wall = (time.perf_counter() - t0) * 1e3
            kernels = [e for e in prof.key_averages()
                       if e.device_time_total > 0 and e.device_type.name == "CUDA"]
            kernels.sort(key=lambda e: -e.device_time_total)
            row = {"shape": label, "split": sp, "block_f": bf, "warps": w, "wall_ms": round(wall, 3),
                   "gpu_busy_ms": round(sum(e.device_time_total for e in kernels) / 1e3, 3),
                   "top": [{"kernel": e.key[:80], "calls": e.count, "ms": round(e.device_time_total / 1e3, 3)}
                           for e in kernels[:6]]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch form's timing (slow)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--checks", type=int, nargs="*", default=None,
                    help=f"which checks to run (indices 0-{len(CHECKS) - 1}; all by default; none with no index)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32], help="hidden blocks to time")
    ap.add_argument("--any-tile", action="store_true",
                    help="lift mlp_memory.MAX_CUDA_TILE for this process, to check tiles beyond it")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["anchor-c16", "titans"])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1],
                    help="kernel layouts: 0 one program per (batch, head); n >= 1 one launch per chunk, n hidden "
                         "blocks per program")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="warps to time")
    ap.add_argument("--check-warps", type=int, default=None, help="warps of the checks (default: the wrapper's)")
    ap.add_argument("--check-block", type=int, default=None, help="hidden block of the checks (default: the wrapper's)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one forward + backward per layout, block and warps (instead of timing)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("mlp_memory_kernel: no CUDA device here; nothing to check or time")
        return 0
    dev = torch.device("cuda")
    if args.any_tile:
        from nlgraph.compilers.kernels import mlp_memory

        mlp_memory.MAX_CUDA_TILE = 1 << 30
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "checks": checks(dev, args.checks, tuple(args.splits), args.check_warps, args.check_block)}
    if args.profile:
        res["profiles"] = profiles(dev, args.shapes, args.blocks, tuple(args.splits), tuple(args.warps))
    elif not args.no_timing:
        res["timings"] = timings(dev, not args.no_pytorch, args.shapes, args.blocks, tuple(args.splits),
                                 tuple(args.warps))
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
