"""Check the delta-rule and linear-attention kernels at small and uneven head widths on a GPU: every
case in one process, and when a kernel faults (an illegal memory access poisons the whole CUDA
context, and every later call in that process fails with it) the cases that process did not finish
one process each, so each fault names its own case instead of the first test after it. For each
case: forward and backward of ``chunk_delta_rule`` (or ``chunk_linear_attention``) against nlgraph's
float64 reference form, the worst relative error over the output and every input's gradient, or the
error its process died with.

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
        from nlgraph.compilers.kernels.linear_attention import token_loop

        o, ht = chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                                       initial_state=leaves["h0"], output_final_state=True, scale=1.0)
        xd = {n: a.detach().double().requires_grad_() for n, a in x.items()}
        o_ref, ht_ref = token_loop(xd["q"], xd["k"], xd["v"], xd.get("g"), xd["h0"], 1.0)
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


def _row(case: tuple, result: dict | None, r: subprocess.CompletedProcess | None) -> dict:
    kind, dk, dv, t, dt, gated = case
    row = {"kind": kind, "dk": dk, "dv": dv, "T": t, "dtype": dt, "gated": bool(gated)}
    if result is not None:
        row["errors"] = result
        row["worst"] = max(result.values())
        row["ok"] = row["worst"] < (1e-4 if dt == "float32" else 3e-2)
    else:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        frames = [ln.strip() for ln in tail if ln.strip().startswith("File ") and "nlgraph" in ln]
        row.update(ok=False, error=tail[-1][:300] if tail else f"exit {r.returncode}", where=frames[-3:])
    return row


def _children(cases: list[tuple], device: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs ``cases`` in one child process, in order: ``({case: errors} of those it finished, the
    process)``; a fault stops the child at its case."""
    spec = ";".join(",".join(str(x) for x in c) for c in cases)
    r = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", spec, device],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
    done = {}
    for line in r.stdout.splitlines():
        if line.startswith("CASE "):
            key, errs = json.loads(line[5:])
            done[tuple(key)] = errs
    return done, r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=CASES)
    p.add_argument("--kinds", nargs="*", default=["delta_rule", "linear_attention"])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="*", type=int, default=[70])
    p.add_argument("--gated", nargs="*", type=int, default=[0, 1])
    p.add_argument("--isolate", choices=["auto", "always"], default="auto",
                   help="auto (default): every case in one process, and after a fault the cases it did not "
                        "finish one process each; always: one process a case")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (to check this script)")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        for item in args.child[0].split(";"):
            kind, dk, dv, t, dt, gated = item.split(",")
            case = [kind, int(dk), int(dv), int(t), dt, int(gated)]
            errs = child(kind, int(dk), int(dv), int(t), dt, bool(int(gated)), args.child[1])
            print("CASE " + json.dumps([case, errs]), flush=True)
        return 0
    cases = [(kind, *(int(x) for x in case.split("x")), t, dt, gated) for kind in args.kinds for case in args.cases
             for t in args.lengths for dt in args.dtypes for gated in args.gated]
    results: dict[tuple, dict] = {}
    failed: dict[tuple, subprocess.CompletedProcess] = {}
    if args.isolate == "auto":
        results, r = _children(cases, args.device)
        if r.returncode != 0:
            print(f"a case faulted after {len(results)} of {len(cases)}: the rest one process each", flush=True)
    for case in cases:
        if case not in results:
            done, r = _children([case], args.device)
            results.update(done)
            if case not in done:
                failed[case] = r
    rows = []
    for case in cases:
        row = _row(case, results.get(case), failed.get(case))
        rows.append(row)
        kind, dk, dv, t, dt, gated = case
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
