"""Whole-model training speed with and without the Triton delta-rule kernels, and a check that the
kernel path computes what the PyTorch path computes.

    bash benchmarks/device.sh python benchmarks/model_speed.py --json "$OUT/model_speed.json"

1. **Check** (CUDA, small shape: d_model 128, 2 layers, 2 heads, B=2, T=300, a partial last chunk):
   DeltaNet, Gated DeltaNet and the closed-form gated delta rule (``equiv/gated_deltanet_rule``),
   logits and every parameter gradient with kernels against the PyTorch path (``set_kernels("off")``)
   in float32, under bf16 autocast (against the float32 PyTorch result, next to the PyTorch path's
   own bf16 error), and (``--check-compile``, default Gated DeltaNet) with per-block
   ``torch.compile`` (float32); ``--check-specs retnet mamba2`` checks the linear-attention kernel's
   models the same way, and ``--check-specs titans`` the MLP-memory kernel's. A spy counts the
   kernels' calls, so a silent fallback fails the check.
2. **Speed**: training tokens/s through ``nlgraph.train`` (AdamW, bf16 autocast, the default byte
   corpus) for each spec × length × eager / ``--compile`` (per-block ``torch.compile``), median over
   the steps after the first two; the first step's seconds (compile and autotuning) are reported too.
   ``--baseline`` adds Gated DeltaNet eager with kernels off at the first length. Runs are ordered
   eager first, then compiled; once ``--budget`` seconds have passed since the start no new run
   starts (the rest say "skipped"), so the command fits the device tool's 10-minute limit.

Exit status 1 if a check fails or a run fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _calls_per_run(model, length: int) -> int:
    """Kernel calls per layer and run: 2 where Titans' MLP memory runs a sequence that ends inside
    a chunk (its full chunks, then the rest), else 1."""
    from nlgraph.compilers.kernels.dispatch import why_no_mlp_memory_kernel
    from nlgraph.levels.run import periods
    from nlgraph.spec.schema import LevelSpec

    for level in model.spec.levels.values():
        if isinstance(level, LevelSpec) and why_no_mlp_memory_kernel(level) is None:
            chunk = periods(level)[1]
            return 2 if length % chunk and length > chunk else 1
    return 1


def check(specs: list[str], device: str, on: str, width: int, length: int, compiled: list[str]) -> list[dict]:
    import torch

    from nlgraph.compilers.kernels import delta_rule as kernel_module
    from nlgraph.compilers.kernels import dispatch
    from nlgraph.compilers.kernels import linear_attention as la_module
    from nlgraph.compilers.kernels import mlp_memory as mlp_module
    from nlgraph.lower import build

    calls = {"n": 0}
    real, real_la = kernel_module.chunk_delta_rule, la_module.chunk_linear_attention
    real_mlp = mlp_module.chunk_mlp_memory

    def counted(fn):
        def spy(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return spy

    # any kernel: the delta rules', linear attention's (RetNet, Mamba2) or Titans' MLP memory's
    kernel_module.chunk_delta_rule = counted(real)
    la_module.chunk_linear_attention = counted(real_la)
    mlp_module.chunk_mlp_memory = counted(real_mlp)
    rows = []
    try:
        for name in specs:
            torch.manual_seed(0)
            ov = ["model.vocab=256", f"vars.d_model={width}", "vars.heads=2", "vars.layers=2"]
            # the plan chooses the triton forms only while the kernels are on; switching them off
            # later hands those levels to their fallback (chunked), which the "off" runs use
            dispatch.set_kernels(on)
            model = build(name, overrides=ov, device=device)
            tokens = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(1)).to(device)

            def run(mode: str, bf16: bool):
                dispatch.set_kernels(mode)
                model.zero_grad()
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(tokens)
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                             tokens[:, 1:].flatten())
                loss.backward()
                return logits.detach().float(), _grads(model)

            n0 = calls["n"]
            ref = run("off", False)
            off_calls = calls["n"] - n0
            results = {"fp32": run(on, False), "bf16": run(on, True), "bf16 pytorch": run("off", True)}
            kernel_calls = calls["n"] - n0
            compiled_calls = 0
            if name in compiled:  # per-block torch.compile: tens of seconds per spec, so not for all
                model.compile_blocks()
                results["compiled fp32"] = run(on, False)
                compiled_calls = calls["n"] - n0 - kernel_calls
                model.eager()
            row = {"spec": name, "kernel calls": kernel_calls, "calls with kernels off": off_calls,
                   "compiled calls": compiled_calls}
            for key, (logits, grads) in results.items():
                row[f"{key} logits"] = _rel(logits, ref[0])
                row[f"{key} grads"] = max(_rel(grads[n], ref[1][n]) for n in ref[1])
            tol = 1e-3
            # bf16: the kernel keeps q, k, v in bf16 where the PyTorch path solves in float32, so its
            # error against float32 may be larger, but not by more than 2x the PyTorch path's own
            bf16_ok = all(row[f"bf16 {w}"] <= 2.0 * row[f"bf16 pytorch {w}"] + 2e-3 for w in ("logits", "grads"))
            # 2 layers × (fp32, bf16), each once, or twice where the MLP memory splits off a partial chunk
            row["ok"] = bool(off_calls == 0 and kernel_calls == 4 * _calls_per_run(model, length) and
                             row["fp32 logits"] < tol and row["fp32 grads"] < tol and bf16_ok
                             and row.get("compiled fp32 logits", 0.0) < tol
                             and row.get("compiled fp32 grads", 0.0) < tol)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        kernel_module.chunk_delta_rule, la_module.chunk_linear_attention = real, real_la
        mlp_module.chunk_mlp_memory = real_mlp
        dispatch.set_kernels(None)
    return rows


def speed(args, plan: list[tuple[str, int, bool, str]], t_start: float) -> list[dict]:
    import torch

    from nlgraph.compilers.kernels import dispatch
    from nlgraph.errors import NLGraphError
    from nlgraph.train.loop import TrainConfig, train

    heads = max(1, args.d_model // 64)
    cuda = args.device == "cuda"
    rows = []
    for name, length, compiled, kernels in plan:
        row = {"spec": name, "T": length, "mode": "compile" if compiled else "eager", "kernels": kernels}
        if time.perf_counter() - t_start > args.budget:
            row["status"] = f"skipped (budget of {args.budget:.0f} s spent)"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        dispatch.set_kernels(kernels if kernels == "off" else args.kernels)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = Path(args.out) / f"{name.replace('/', '_')}_T{length}_{row['mode']}_{kernels}"
        ov = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={heads}"]
        steps = args.steps if kernels != "off" else 6
        cfg = TrainConfig(out=str(out), steps=steps, batch=args.batch, length=length, lr=3e-4, eval_every=steps,
                          eval_batches=1, device=args.device, compile=compiled, precision="bf16", overrides=ov,
                          progress=False, replace=True)
        t0 = time.perf_counter()
        try:
            res = train(name, cfg)
            recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            tok = [r["tok_s"] for r in recs[2:]] or [r["tok_s"] for r in recs]
            row.update(status=res.stopped, steps=res.step, params=res.params, tok_s=statistics.median(tok),
                       first_step_s=round(args.batch * length / recs[0]["tok_s"], 1),
                       last_loss=recs[-1]["loss"])
        except NLGraphError as e:
            row.update(status="FAILED", error=e.render())
        except Exception as e:  # one failing run must not hide the others
            row.update(status="CRASHED", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dispatch.set_kernels(None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=["transformer_pp", "deltanet", "gated_deltanet"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="training steps per run (median over steps 3..)")
    ap.add_argument("--budget", type=float, default=400,
                    help="seconds from the start (checks included) after which no new run starts")
    ap.add_argument("--baseline", action="store_true", help="also Gated DeltaNet eager with kernels off")
    ap.add_argument("--check-specs", nargs="*", default=["deltanet", "gated_deltanet", "equiv/gated_deltanet_rule"])
    ap.add_argument("--check-compile", nargs="*", default=["gated_deltanet"],
                    help="check specs also checked with per-block torch.compile")
    ap.add_argument("--check-width", type=int, default=128)
    ap.add_argument("--check-length", type=int, default=300)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (with --kernels interpret "
                    "and TRITON_INTERPRET=1 in the environment)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "interpret"], help="mode of the kernel runs")
    ap.add_argument("--out", default="/tmp/model_speed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("model_speed: no CUDA device here; nothing to measure")
        return 0
    print(f"# model_speed: d_model {args.d_model}, {args.layers} layers, B={args.batch}, T={args.lengths}, "
          f"bf16 autocast, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else args.device}", flush=True)
    checks = (check(args.check_specs, args.device, args.kernels, args.check_width, args.check_length,
                    args.check_compile)
              if args.check_specs else [])
    plan = []
    if args.baseline:
        plan.append(("gated_deltanet", args.lengths[0], False, "off"))
    for mode in args.modes:
        for length in args.lengths:
            for name in args.specs:
                plan.append((name, length, mode == "compile", "auto"))
    rows = speed(args, plan, t_start)

    print()
    if checks:
        cols = ["fp32", "bf16", "bf16 pytorch", "compiled fp32"]
        print("| spec | kernel calls | " + " | ".join(f"{c} logits / grads" for c in cols) + " | ok |")
        print("|---|---|" + "---|" * len(cols) + "---|")
        for r in checks:
            errs = " | ".join(f"{r[f'{c} logits']:.1e} / {r[f'{c} grads']:.1e}" if f"{c} logits" in r else "-"
                              for c in cols)
            print(f"| {r['spec']} | {r['kernel calls']} | {errs} | {'PASS' if r['ok'] else 'FAIL'} |")
        print("\n(relative L2 errors against the float32 PyTorch path; 'bf16 pytorch' is the PyTorch path's "
              "own bf16 error)\n")
    print("| spec | T | mode | kernels | tok/s | first step s | peak GiB | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['tok_s']:,.0f}" if "tok_s" in r else "-"
        status = r["status"] + (f": {r['error'][:160]}" if "error" in r else "")
        print(f"| {r['spec']} | {r['T']} | {r['mode']} | {r['kernels']} | {tok} | {r.get('first_step_s', '-')} | "
              f"{r.get('peak_gib', '-')} | {status} |")
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps({"args": vars(args), "checks": checks, "rows": rows},
                                                 indent=1).encode())
    ok = all(r["ok"] for r in checks) and all("error" not in r for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
