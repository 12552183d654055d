"""Check the delta-rule and linear-attention kernels at small and uneven head widths on a GPU, each case
in a process of its own, so a kernel that faults (an illegal memory access poisons the whole CUDA
context, and every later call in that process fails with it) names its own case instead of the first
test after it. For each case: forward and backward of ``chunk_delta_rule`` (or ``chunk_linear_attention``)
against nlgraph's float64 reference form, the worst relative error over the output and every input's
gradient, or the error the child died with.

    python benchmarks/small_heads.py --json out.json                 # every case
    python benchmarks/small_heads.py --cases 8x6 16x16 --dtypes float32

A case is ``DKxDV``; ``--lengths`` the sequence lengths (70: a partial second chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = ["8x6", "8x8", "6x8", "16x16", "12x20", "32x32", "64x64"]


def child(kind: str, dk: int, dv: int, t: int, dtype_name: str, gated: bool, device: str) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels import make_inputs, reference, rel  # benchmarks/kernels.py

    dtype = getattr(torch, dtype_name)
    x = make_inputs(2, t, 2, dk, dv, dtype, gated=gated, with_h0=True, seed=0, device=device)
    leaves = {n: a.clone().requires_grad_() for n, a in x.items()}
    if kind == "delta_rule":
        from nlgraph.compilers.kernels import chunk_delta_rule

        o, ht = chunk_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves.get("g"),
                                 initial_state=leaves["h0"], output_final_state=True, scale=1.0)
        xd = {n: a.detach().double().requires_grad_() for n, a in x.items()}
        o_ref, ht_ref = reference(xd, 1.0, "reference")
    else:
        from nlgraph.compilers.kernels import chunk_linear_attention

        o, ht = chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                                       initial_state=leaves["h0"], output_final_state=True, scale=1.0)
        xd = {n: a.detach().double().requires_grad_() for n, a in x.items()}
        decay = xd["g"].exp() if gated else None
        h = xd["h0"]
        outs = []
        for i in range(t):  # h_t = α_t h_{t−1} + k_t v_tᵀ, o_t = q_t h_t
            if decay is not None:
                h = decay[:, i, :, None, None] * h
            h = h + xd["k"][:, i, :, :, None] * xd["v"][:, i, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", xd["q"][:, i], h))
        o_ref, ht_ref = torch.stack(outs, 1), h
    w = torch.randn_like(o_ref)
    wt = torch.randn_like(ht_ref)
    names = [n for n in ("q", "k", "v", "beta", "g", "h0") if n in leaves and (kind == "delta_rule" or n != "beta")]
    grads = torch.autograd.grad((o.double() * w).sum() + (ht.double() * wt).sum(), [leaves[n] for n in names])
    grads_ref = torch.autograd.grad((o_ref * w).sum() + (ht_ref * wt).sum(), [xd[n] for n in names])
    if device == "cuda":
        torch.cuda.synchronize()
    errs = {"o": rel(o, o_ref), "ht": rel(ht, ht_ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, grads, grads_ref)})
    return errs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=CASES)
    p.add_argument("--kinds", nargs="*", default=["delta_rule", "linear_attention"])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="*", type=int, default=[70])
    p.add_argument("--gated", nargs="*", type=int, default=[0, 1])
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (to check this script)")
    p.add_argument("--child", nargs=7, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, dk, dv, t, dt, gated, device = args.child
        print(json.dumps(child(kind, int(dk), int(dv), int(t), dt, bool(int(gated)), device)))
        return 0
    rows = []
    for kind in args.kinds:
        for case in args.cases:
            dk, dv = (int(s) for s in case.split("x"))
            for t in args.lengths:
                for dt in args.dtypes:
                    for gated in args.gated:
                        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--child", kind, str(dk), str(dv),
                               str(t), dt, str(gated), args.device]
                        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                           env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
                        row = {"kind": kind, "dk": dk, "dv": dv, "T": t, "dtype": dt, "gated": bool(gated)}
                        if r.returncode == 0:
                            row["errors"] = json.loads(r.stdout.strip().splitlines()[-1])
                            row["worst"] = max(row["errors"].values())
                            limit = 1e-4 if dt == "float32" else 3e-2
                            row["ok"] = row["worst"] < limit
                        else:
                            tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                            frames = [ln.strip() for ln in tail if ln.strip().startswith("File ") and "nlgraph" in ln]
                            row.update(ok=False, error=tail[-1][:300] if tail else f"exit {r.returncode}",
                                       where=frames[-3:])
                        rows.append(row)
                        status = f"worst {row['worst']:.1e}" if "worst" in row else row["error"]
                        print(f"{kind:<17} {dk:>3}x{dv:<3} T={t:<5} {dt:<9} {'gated' if gated else 'plain':<6} "
                              f"{'ok  ' if row['ok'] else 'FAIL'} {status}", flush=True)
                        for w in row.get("where", []):
                            print("      " + w)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
