"""The online levels that the plan hands to the Triton kernels, checked on the GPU against the float64
reference form: outputs, final state and the gradients of keys, values, queries, the learning rate,
the gate's pre-activation and the initial state, in float32 and bfloat16, and that a kernel ran.

    bash benchmarks/device.sh python benchmarks/level_check.py --json "$OUT/level_check.json"

The same comparisons run on CPU through Triton's interpreter in tests/compilers/test_kernels_dispatch.py;
Triton 3.4–3.7 miscompiles some backward kernels on Hopper, which the interpreter cannot show, so the
mapping of each level onto a kernel (β, values and decay of the Titans order, DGD's β = 2η′) is
checked here on the machine that runs it. The decays include tokens with α = 1e-6, 1e-20 and 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

GATE = {"act": "sigmoid"}
LEVELS = {
    "gd l2, decay (Gated DeltaNet)": {"objective": "l2", "optimizer": {"kind": "gd", "lr": GATE},
                                      "retention": {"kind": "decay", "gate": GATE}},
    "gd l2, weight_decay (Titans order)": {"objective": "l2", "optimizer": {"kind": "gd", "lr": GATE},
                                           "retention": {"kind": "weight_decay", "gate": GATE}},
    "dgd l2 proximal, weight_decay (HOPE's DGD)": {
        "objective": "l2", "optimizer": {"kind": "dgd", "form": "proximal", "lr": GATE},
        "retention": {"kind": "weight_decay", "gate": GATE}},
    "dgd dot proximal, decay": {"objective": "dot", "optimizer": {"kind": "dgd", "form": "proximal", "lr": GATE},
                                "retention": {"kind": "decay", "gate": GATE}},
    "gd dot, weight_decay (linear attention kernel)": {
        "objective": "dot", "optimizer": {"kind": "gd", "lr": GATE},
        "retention": {"kind": "weight_decay", "gate": GATE}},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str, body: dict, dtype: torch.dtype, device: str, *, b=2, t=300, h=4, d=64) -> dict:
    from nlgraph.compilers.kernels import delta_rule as dr
    from nlgraph.compilers.kernels import linear_attention as la
    from nlgraph.runtime import level_form, run_level
    from nlgraph.spec.loader import load_level

    spec = load_level({"memory": {"kind": "linear", "heads": h}, "objective": {"kind": body["objective"]},
                       "optimizer": body["optimizer"], "retention": body["retention"], "frequency": 1})
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k = F.normalize(rnd(b, t, h, d), dim=-1)
    q, v = rnd(b, t, h, d), rnd(b, t, h, d)
    lr = 0.05 + 0.9 * torch.rand(b, t, h, generator=gen, dtype=torch.float64)
    alpha = 0.6 + 0.4 * torch.rand(b, t, h, generator=gen, dtype=torch.float64)
    alpha[:, 5], alpha[:, 6], alpha[:, 100] = 1e-6, 1e-20, 0.0
    z = torch.logit(alpha.clamp(1e-300, 1 - 1e-12))
    s0 = 0.3 * rnd(b, h, d, d)
    calls = {"n": 0}
    real = (dr.chunk_delta_rule, la.chunk_linear_attention)

    def spy(fn):
        def wrapped(*a, **kw):
            calls["n"] += 1
            return fn(*a, **kw)
        return wrapped

    dr.chunk_delta_rule, la.chunk_linear_attention = spy(real[0]), spy(real[1])
    try:
        outs = {}
        for form, dt in (("triton", dtype), ("reference", torch.float64)):
            leaves = [x.to(device, dt if i < 3 else (torch.float32 if dt != torch.float64 else dt)).requires_grad_()
                      for i, x in enumerate((k, v, q, lr, z, s0))]
            state = {"memory.w0": leaves[5], "position": torch.zeros((), dtype=torch.int64, device=device)}
            # bfloat16 streams with float32 rates and state, as a model under autocast hands them over
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                y, st = run_level(spec, keys=leaves[0], values=leaves[1], queries=leaves[2], lr=leaves[3],
                                  retention=torch.sigmoid(leaves[4]), state=state, form=form)
            w = torch.linspace(-1, 1, y.shape[-1], device=device, dtype=torch.float64)
            loss = (y.double() * w).sum() + st["memory.w0"].double().square().sum()
            outs[form] = (y, st["memory.w0"], torch.autograd.grad(loss, leaves))
        form = level_form(spec, device=device)
    finally:
        dr.chunk_delta_rule, la.chunk_linear_attention = real
    (y, m, g), (y_ref, m_ref, g_ref) = outs["triton"], outs["reference"]
    errs = {"outputs": rel(y, y_ref), "state": rel(m, m_ref)}
    errs.update({f"d{n}": rel(a, r) for n, a, r in zip(("k", "v", "q", "lr", "gate", "h0"), g, g_ref)})
    finite = all(torch.isfinite(x).all() for x in (y, m, *g))
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    worst = max(errs.values())
    return {"level": name, "dtype": str(dtype).replace("torch.", ""), "form": form, "kernel_calls": calls["n"],
            "errors": errs, "worst": worst, "limit": limit,
            "ok": bool(finite and calls["n"] == 1 and worst <= limit)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--levels", type=int, nargs="*", default=None,
                    help=f"indices into the list of levels (0-{len(LEVELS) - 1}; default all)")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.device is None:
        print("no CUDA device: nothing to check (tests/compilers/test_kernels_dispatch.py runs these on CPU "
              "through Triton's interpreter)")
        return 0
    rows = []
    for i, (name, body) in enumerate(LEVELS.items()):
        if args.levels is not None and i not in args.levels:
            continue
        for dtype in (getattr(torch, d) for d in args.dtypes):
            try:
                row = check(name, body, dtype, args.device)
            except Exception as e:  # a failed check is a row, the others still run
                row = {"level": name, "dtype": str(dtype), "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            rows.append(row)
            detail = row.get("error") or " ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {name} [{row['dtype']}] form {row.get('form')} "
                  f"calls {row.get('kernel_calls')}: {detail}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
