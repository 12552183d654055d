"""Training speed of deep-memory language models (HOPE, Titans ...) eager and replayed as CUDA
graphs, with a per-kernel profile of where a step's time goes (issue 11).

    bash benchmarks/device.sh python benchmarks/deep_speed.py --json "$OUT/deep_speed.json"

For each spec × gradient-point chunk, at d_model 512, 4 layers, 8 heads, vocab 256, B × T tokens,
bf16 autocast, fused AdamW:

1. **eager**: seconds per training step (forward, backward, optimizer), median over ``--steps``
   after one warm-up step; peak memory.
2. **profile** (``--profile``): one eager forward+backward under ``torch.profiler``: CUDA kernels
   launched, their summed GPU time and the top kernels — the floor a CUDA graph can reach is the GPU
   time, the rest of an eager step is host overhead.
3. **graph**: the step captured with ``nlgraph.train.loop.graph_step`` (what ``nlgraph train`` does
   by default on a GPU), checked against eager on one batch (loss and every parameter gradient,
   relative error), then timed like eager.

Runs start in the order given; once ``--budget`` seconds have passed no new one starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# the gradient snapshot and relative error of the kernel check, one directory over (run as a script)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import _grads, _rel  # noqa: E402


def _overrides(spec: str, chunk: int | None, width: int, layers: int, heads: int) -> list[str]:
    ov = ["model.vocab=256", f"vars.d_model={width}", f"vars.layers={layers}", f"vars.heads={heads}"]
    if chunk is not None:
        ov.append("vars.chunk=%d" % chunk if spec.startswith("hope") else f"levels.memory.gradient_point.chunk={chunk}")
    return ov


def _log(row: dict, phase: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: {json.dumps(row)}", file=sys.stderr, flush=True)


def run_one(spec: str, chunk: int | None, args, deadline: float) -> dict:
    import torch

    from nlgraph.lower import build
    from nlgraph.spec.loader import load_spec
    from nlgraph.train.loop import graph_step, lm_loss

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build(load_spec(spec, _overrides(spec, chunk, args.width, args.layers, args.heads)), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, 256, (args.batch, args.length), generator=g).to(dev)
    y = torch.roll(x, -1, 1)
    row: dict = {"spec": spec, "chunk": chunk, "batch": args.batch, "length": args.length,
                 "params": sum(p.numel() for p in model.parameters())}

    def eager_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        return lm_loss(logits, y)

    def timed(loss_fn, n):
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    torch.cuda.reset_peak_memory_stats()
    first = timed(eager_loss, 1)[0]
    row["eager_first_s"] = round(first, 3)
    _log(row, "first step")
    steps = args.steps if first * args.steps < max(deadline - time.time(), 0) / 3 else 1
    times = timed(eager_loss, steps)
    row["eager_step_s"] = round(statistics.median(times), 4)
    row["eager_tok_s"] = round(args.batch * args.length / statistics.median(times), 1)
    row["eager_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    _log(row, "eager")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        # at a short length: a profile's cost grows with the events (hundreds of thousands a step)
        xp, yp = x[:, :args.profile_length], y[:, :args.profile_length]

        def short_loss():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(xp)
            return lm_loss(logits, yp)

        short_loss().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        short_loss().backward()
        torch.cuda.synchronize()
        row["profile_eager_s"] = round(time.perf_counter() - t0, 3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            short_loss().backward()
            torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        gpu = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0]
        gpu.sort(key=lambda r: -r[2])
        row["profile"] = {"length": args.profile_length,
            "kernels": sum(c for _, c, _ in gpu),
            "gpu_ms": round(sum(t for _, _, t in gpu) / 1e3, 1),
            "top": [{"name": k[:80], "count": c, "ms": round(t / 1e3, 2)} for k, c, t in gpu[:15]],
        }

        _log(row, "profile")
    if time.time() > deadline:
        row["graph"] = "skipped (budget)"
        return row
    # correctness of the graph on one batch: loss and gradients against eager at the same weights
    eager_loss().backward()
    ref_loss = None
    with torch.no_grad():
        ref_loss = float(eager_loss())
    ref = _grads(model)
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    step = graph_step(model, x, y, "bf16")
    torch.cuda.synchronize()
    row["capture_s"] = round(time.perf_counter() - t0, 2)
    _log(row, "capture")
    loss = step(x, y)
    loss.backward()
    got = _grads(model)
    opt.zero_grad(set_to_none=True)
    row["graph_loss_diff"] = abs(float(loss) - ref_loss)
    row["graph_grad_rel_max"] = max(_rel(got[n], ref[n]) for n in ref)
    row["graph_grads_missing"] = sorted(set(ref) - set(got))
    times = timed(lambda: step(x, y), args.steps)
    row["graph_step_s"] = round(statistics.median(times), 4)
    row["graph_tok_s"] = round(args.batch * args.length / statistics.median(times), 1)
    row["graph_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", default=["hope:16", "hope:64", "titans:16"],
                   help="spec:chunk (chunk optional: the spec's own)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-length", type=int, default=128)
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    deadline = time.time() + args.budget
    rows, failed = [], False
    for item in args.specs:
        spec, _, chunk = item.partition(":")
        if time.time() > deadline:
            rows.append({"spec": spec, "chunk": chunk, "skipped": "budget"})
            continue
        try:
            row = run_one(spec, int(chunk) if chunk else None, args, deadline)
        except Exception as e:  # noqa: BLE001 - a failed run is reported, the others still run
            import traceback

            traceback.print_exc()
            row = {"spec": spec, "chunk": chunk, "error": f"{type(e).__name__}: {e}"[:500]}
            failed = True
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
