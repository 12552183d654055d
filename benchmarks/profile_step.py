"""Where a training step's GPU time goes: one AdamW step of a spec under ``torch.profiler``, after
warm-up steps (Triton autotuning and cuDNN plans happen there), as a table of the kernels with the
most GPU time, grouped by kernel name, and the share of the step each takes.

    bash benchmarks/device.sh python benchmarks/profile_step.py gated_deltanet --d-model 512 --layers 4 \\
        --batch 8 --length 2048 --json "$OUT/profile_gdn.json"

The step runs eagerly (``--compile``: with per-block ``torch.compile``) under bf16 autocast (``nlgraph.train.loop.lm_loss``, fused AdamW), the way
``nlgraph bench`` times its ``eager`` mode; the table's wall time is that of the profiled step.
``--graph`` captures the step's forward and backward as CUDA graphs first
(``nlgraph.train.loop.graph_step``, what ``nlgraph train`` runs on CUDA) and profiles a replay:
the host then launches a few graphs, so the table is what the GPU does in the mode training uses
(``--compile --graph``: ``nlgraph bench``'s ``compile-graph``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default d_model / 64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra spec override")
    ap.add_argument("--compile", action="store_true",
                    help="per-block torch.compile, as `nlgraph bench --modes compile` (compiled in the warm-up)")
    ap.add_argument("--graph", action="store_true",
                    help="profile a replay of the step captured as CUDA graphs (captured in the warm-up)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.graph:
        args.warmup = max(args.warmup, 1)  # the capture happens in the first step, not under the profiler

    import torch
    from torch.profiler import ProfilerActivity, profile

    from nlgraph.lower import build
    from nlgraph.train.loop import graph_step, lm_loss, param_groups

    if not torch.cuda.is_available():
        print("profile_step: no CUDA device here; nothing to profile")
        return 0
    dev = torch.device("cuda")
    heads = args.heads or max(1, args.d_model // 64)
    ov = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={heads}", *args.set]
    torch.manual_seed(0)
    model = build(args.spec, overrides=ov, device=dev)
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    vocab = model.spec.model.vocab
    x = torch.randint(0, vocab, (args.batch, args.length), device=dev)
    y = torch.randint(0, vocab, (args.batch, args.length), device=dev)

    graphed = None

    def step():
        nonlocal graphed
        if args.graph:
            if graphed is None:
                graphed = graph_step(model, x, y, "bf16")
            loss = graphed(x, y)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t1 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t1
    rows = []
    for ev in prof.key_averages():
        gpu_us = getattr(ev, "device_time_total", None)
        if gpu_us is None:
            gpu_us = ev.cuda_time_total
        # user annotations (the optimizer's step) span kernels that are counted on their own
        annotation = getattr(ev, "is_user_annotation", False) or ev.key.startswith("Optimizer.")
        if ev.device_type == torch.autograd.DeviceType.CUDA and gpu_us > 0 and not annotation:
            rows.append({"kernel": ev.key, "ms": gpu_us / 1e3, "calls": ev.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    print(f"{args.spec}: d_model {args.d_model}, {args.layers} layers, {heads} heads, B={args.batch}, "
          f"T={args.length}, bf16 autocast, {'compiled' if args.compile else 'eager'}"
          f"{' as CUDA graphs' if args.graph else ''}; warm-up {warm_s:.1f} s; profiled step wall "
          f"{wall * 1e3:.1f} ms, summed GPU time {total:.1f} ms in {sum(r['calls'] for r in rows)} kernels")
    print("| kernel | GPU ms | calls | share of GPU time |")
    print("|---|---|---|---|")
    for r in rows[:args.top]:
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        print(f"| `{name}` | {r['ms']:.3f} | {r['calls']} | {100 * r['ms'] / total:.1f} % |")
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    print("\nhost ops with the most self CPU time:")
    for e in cpu:
        print(f"  {e.key[:70]:70s} {e.self_cpu_time_total / 1e3:9.2f} ms  x{e.count}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": args.spec, "overrides": ov, "batch": args.batch,
                                               "compile": args.compile, "graph": args.graph,
                                               "length": args.length, "wall_ms": wall * 1e3, "gpu_ms": total,
                                               "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
