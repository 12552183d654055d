"""The online chunked form's full chunks solved for all chunks at once (``chunked.ONLINE_FULL``)
against one ``solve_chunk`` per chunk: operator launches per chunk and forward + backward time of
levels no kernel covers (momentum, DGD with momentum, linear attention with momentum), eager, and of
the gated delta rule's level beside them (the anchor: with ``--check`` each kernel row gives its
ratio to that level's time through its own kernels).

    OMP_NUM_THREADS=1 python benchmarks/online_form.py --json benchmarks/results/online_form_cpu.json
    bash benchmarks/device.sh python benchmarks/online_form.py --device cuda --batch 4 --length 4096 \\
        --heads 16 --dim 128 --json "$OUT/online_form.json"

Launches are the operators below autograd that compute something (``op_count.py``'s count), per
chunk from the difference between 8 and 4 chunks. Times are medians of ``--repeats`` runs.

``--check`` (on CUDA) first checks the recurrence kernel (``compilers/kernels/recurrence.py``)
against its float64 loop on every output and input gradient, in float32 and bfloat16, which is what
turning ``dispatch.ONLINE_RECURRENCE_ON_GPU`` on needs; when it passes, the table gets a third
column: the levels with the recurrence in the kernel (the ``triton`` form).

    bash benchmarks/device.sh python benchmarks/online_form.py --device cuda --check --batch 4 \
        --length 4096 --heads 16 --dim 128 --json "$OUT/online_form.json"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_count import _Launches  # noqa: E402

#: The anchor row: the gated delta rule's level (the same inputs but momentum), through its own
#: kernels under ``--check``; issue 10 asks the momentum levels for at most 1.2x its time.
ANCHOR = "gated_delta_rule"

LEVELS = {
    ANCHOR: {"memory": {"kind": "linear"}, "objective": {"kind": "l2"}, "optimizer": {"kind": "gd", "lr": {"act": "sigmoid"}},
             "retention": {"kind": "decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "momentum_weight_decay": {"memory": {"kind": "linear"}, "objective": {"kind": "l2"},
                              "optimizer": {"kind": "momentum", "lr": {"act": "sigmoid"}, "momentum": {"act": "sigmoid"}},
                              "retention": {"kind": "weight_decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
    "dgd_proximal_momentum_toward_initial": {
        "memory": {"kind": "linear"}, "objective": {"kind": "l2"},
        "optimizer": {"kind": "dgd", "form": "proximal", "lr": {"act": "sigmoid"}, "momentum": {"act": "sigmoid"}},
        "retention": {"kind": "decay", "gate": {"act": "sigmoid"}, "toward": "initial"}, "read": "before_write",
        "frequency": 1},
    "linear_attention_momentum": {"memory": {"kind": "linear"}, "objective": {"kind": "dot"},
                                  "optimizer": {"kind": "momentum", "lr": {"act": "sigmoid"},
                                                "momentum": {"act": "sigmoid"}},
                                  "retention": {"kind": "decay", "gate": {"act": "sigmoid"}}, "frequency": 1},
}


def _inputs(b, t, h, d, dev, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dev)

    return dict(keys=torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1), values=rnd(b, t, h, d),
                queries=torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1),
                lr=torch.rand(b, t, h, generator=g).to(dev) * 0.5, momentum=torch.rand(b, t, h, generator=g).to(dev) * 0.9,
                retention=(0.9 + 0.1 * torch.rand(b, t, h, generator=g)).to(dev))


def _run(spec, x, chunk, backward=True, form="chunked"):
    from nlgraph.runtime import run_level

    leaves = {k: v.clone().requires_grad_(backward) for k, v in x.items()}
    y, st = run_level(spec, form=form, chunk_size=chunk, **leaves)
    if backward:
        (y.square().sum() + st["memory.w0"].square().sum()).backward()
    return y


CHECKS = [  # (B, H, C, n, O, I, momentum, P1, P2, dtype, limit)
    (2, 2, 5, 64, 128, 128, True, True, True, torch.float32, 1e-4),
    (2, 2, 5, 32, 64, 64, True, False, False, torch.float32, 1e-4),
    (1, 4, 4, 64, 100, 72, False, True, False, torch.float32, 1e-4),
    (2, 2, 5, 64, 128, 128, True, True, True, torch.bfloat16, 3e-2),
    (1, 2, 3, 16, 64, 64, False, True, False, torch.bfloat16, 3e-2),
]


def check(dev: torch.device, states: str = "float32") -> list[dict]:
    """The recurrence kernel against its float64 loop: every output and every input's gradient
    (``states="input"``: the bfloat16 checks keep the chunk starts in bfloat16)."""
    from nlgraph.compilers.kernels.recurrence import loop, online_recurrence

    rows = []
    for b, h, c, n, o, i, mom, has_p1, has_p2, dtype, limit in CHECKS:
        g = torch.Generator().manual_seed(n + o)

        def r(*s):
            return 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)

        args = dict(w0=r(b, h, o, i), s0=r(b, h, o, i) if mom else None, u=r(b, h, c, n, o), xt=r(b, h, c, n, i),
                    ge=0.5 + 0.5 * torch.rand(b, h, c, generator=g, dtype=torch.float64),
                    p1=r(b, h, c, n, i) if has_p1 else None, yt=r(b, h, c, n, i) if mom else None,
                    ze=r(b, h, c) if mom else None, ye=torch.rand(b, h, c, generator=g, dtype=torch.float64) if mom else None,
                    p2=r(b, h, c, n, i) if mom and has_p2 else None)
        names = [k for k, v in args.items() if v is not None]
        ref_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in args.items()}
        ref = loop(**ref_in)
        cots = [None if t is None else torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
        ref_g = torch.autograd.grad(sum((t * ct).sum() for t, ct in zip(ref, cots) if t is not None),
                                    [ref_in[k] for k in names])
        # the state and the scalars stay float32; the [n, ·] operands take the dtype under test
        mine = {k: (None if v is None else v.to(dev, dtype if k in ("u", "xt", "p1", "yt", "p2") else torch.float32)
                    .requires_grad_()) for k, v in args.items()}
        extra = {"states": torch.bfloat16} if states == "input" and dtype == torch.bfloat16 else {}
        out = online_recurrence(**mine, **extra)
        got_g = torch.autograd.grad(sum((t * ct.to(dev).float()).sum() for t, ct in zip(out, cots) if t is not None),
                                    [mine[k] for k in names])
        errs = {}
        for name, a, r_ in zip(("starts_w", "starts_s", "es", "w_end", "s_end"), out, ref):
            if r_ is not None:
                errs[name] = float((a.double().cpu() - r_.detach()).norm() / r_.detach().norm())
        for name, a, r_ in zip(names, got_g, ref_g):
            errs[f"d{name}"] = float((a.double().cpu() - r_).norm() / r_.norm())
        worst = max(errs.values())
        label = (f"{str(dtype).removeprefix('torch.')} B={b} H={h} C={c} n={n} O={o} I={i} momentum={mom} "
                f"P1={has_p1} P2={has_p2}" + (" starts=bfloat16" if extra else ""))
        rows.append({"check": label, "max_rel_err": worst, "limit": limit, "ok": worst < limit, "errors": errs})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="check the recurrence kernel first (CUDA), then time it")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="of the timed keys, values and queries (the gates stay float32), as bf16 autocast gives them")
    ap.add_argument("--checks-only", action="store_true", help="with --check: stop after the checks")
    ap.add_argument("--states", default="float32", choices=("float32", "input"),
                    help="with --check: the bfloat16 checks keep the chunk starts in bfloat16 (input)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import nlgraph.compilers.chunked as chunked
    from nlgraph.compilers.kernels import dispatch
    from nlgraph.spec.loader import load_level

    dev = torch.device(args.device)
    checks, kernel = [], False
    if args.check and dev.type == "cuda":
        checks = check(dev, args.states)
        kernel = all(r["ok"] for r in checks)
        dispatch.ONLINE_RECURRENCE_ON_GPU = kernel
    rows = []
    if args.checks_only:
        if args.json:
            from nlgraph.io import atomic_write

            atomic_write(Path(args.json), json.dumps({"args": vars(args), "checks": checks}, indent=1).encode())
        return 0 if checks and all(r["ok"] for r in checks) else 1
    for name, level in LEVELS.items():
        spec = load_level({**level, "memory": {**level["memory"], "heads": args.heads}})
        x = _inputs(args.batch, args.length, args.heads, args.dim, dev)
        x.update({n: x[n].to(getattr(torch, args.dtype)) for n in ("keys", "values", "queries")})
        small = {n: _inputs(1, c * args.chunk, 1, 8, dev) for n, c in (("4", 4), ("8", 8))}
        if "momentum" not in level["optimizer"]:  # the anchor takes no momentum gate
            for xs in (x, *small.values()):
                xs.pop("momentum")
        row = {"level": name}
        outs = {}
        for flag in (False, True):
            chunked.ONLINE_FULL = flag
            tag = "all_chunks" if flag else "per_chunk"
            counts = {}
            for n, xs in small.items():
                launches = _Launches()
                with launches:
                    _run(load_level({**level, "memory": {**level["memory"], "heads": 1}}), xs, args.chunk)
                counts[n] = sum(launches.counts.values())
            row[f"{tag}_launches_per_chunk"] = (counts["8"] - counts["4"]) / 4
            outs[tag] = _run(spec, x, args.chunk, backward=False).detach()
            times = []
            for _ in range(args.repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _run(spec, x, args.chunk)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[f"{tag}_fwd_bwd_ms"] = round(1e3 * statistics.median(times[1:]), 2)
        chunked.ONLINE_FULL = True
        if kernel:
            outs["kernel"] = _run(spec, x, args.chunk, backward=False, form="triton").detach()
            times = []
            for _ in range(args.repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _run(spec, x, args.chunk, form="triton")
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row["kernel_fwd_bwd_ms"] = round(1e3 * statistics.median(times[1:]), 2)
            row["kernel_rel_diff"] = float((outs["kernel"].double() - outs["per_chunk"].double()).norm()
                                           / outs["per_chunk"].double().norm())
        a, b = outs["all_chunks"].double(), outs["per_chunk"].double()
        row["rel_diff"] = float((a - b).norm() / b.norm())
        row["speedup"] = round(row["per_chunk_fwd_bwd_ms"] / row["all_chunks_fwd_bwd_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nB={args.batch} T={args.length} H={args.heads} D={args.dim} chunk={args.chunk} {args.dtype} on {dev}, eager, "
          f"torch {torch.__version__}\n")
    print("| level | launches/chunk, per chunk → all chunks | f+b ms, per chunk → all chunks | speedup | rel. diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['per_chunk_launches_per_chunk']:.0f} → {r['all_chunks_launches_per_chunk']:.0f} | "
              f"{r['per_chunk_fwd_bwd_ms']} → {r['all_chunks_fwd_bwd_ms']} | {r['speedup']}x | {r['rel_diff']:.1e} |")
    anchor = next((r.get("kernel_fwd_bwd_ms") for r in rows if r["level"] == ANCHOR), None)
    for r in rows:
        if "kernel_fwd_bwd_ms" in r:
            if anchor and r["level"] != ANCHOR:
                r["x_anchor"] = round(r["kernel_fwd_bwd_ms"] / anchor, 2)
            ratio = f", {r['x_anchor']}x the {ANCHOR} level's {anchor} ms" if "x_anchor" in r else ""
            print(f"{r['level']}: kernels f+b {r['kernel_fwd_bwd_ms']} ms, rel. diff {r['kernel_rel_diff']:.1e}{ratio}")
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps({"args": vars(args), "checks": checks, "rows": rows},
                                                 indent=1).encode())
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
