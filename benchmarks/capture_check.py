"""Capture each spec's training step as CUDA graphs the way ``nlgraph train`` does
(``nlgraph.train.loop.graph_step``, bf16 autocast), each spec in a fresh process so that one failed
capture cannot leave state behind for the next, and check the replayed loss and gradients against
eager on the same batch, next to a second eager step (the kernels' own run-to-run difference).

    bash benchmarks/device.sh python benchmarks/capture_check.py titans_mal titans_mac titans_mag
    bash benchmarks/device.sh python benchmarks/capture_check.py --eager-first titans_mal

``--eager-first`` runs one eager training step on the default stream before capturing (what
``benchmarks/deep_speed.py`` does; ``nlgraph train`` captures on its first step); ``--no-cudnn-sdpa``
keeps scaled_dot_product_attention off its cuDNN backend (whose per-shape plans are built on first
use). A failure prints
the exception and the CUDA warnings the process wrote (the ``(function …)`` in a warning names
the CUDA call that was refused). Exit status 1 if any spec failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one(args) -> dict:
    import torch

    from model_speed import _grads, _rel
    from nlgraph.lower import build
    from nlgraph.spec.loader import load_spec
    from nlgraph.train.loop import graph_step, lm_loss

    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    overrides = ["model.vocab=256", f"vars.d_model={args.width}", f"vars.heads={args.heads}",
                 f"vars.layers={args.layers}"]
    torch.manual_seed(0)
    model = build(load_spec(args.one, overrides), device="cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.batch, args.length), generator=g).cuda()
    y = torch.roll(x, -1, 1)

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return lm_loss(model(x), y)

    row = {"spec": args.one, "eager_first": args.eager_first, "cudnn_sdpa": not args.no_cudnn_sdpa}
    if args.eager_first:
        eager().backward()
        model.zero_grad(set_to_none=True)
    try:
        step = graph_step(model, x, y, "bf16")
        loss = step(x, y)
        loss.backward()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the failure is the result
        row["capture"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    got, graph_loss = _grads(model), float(loss)
    model.zero_grad(set_to_none=True)
    ref_loss = eager()
    ref_loss.backward()
    ref = _grads(model)
    # a second eager step on the same batch: a graph-vs-eager difference no larger than this one is
    # run-to-run nondeterminism of the kernels (atomics in a backward), not the graph
    model.zero_grad(set_to_none=True)
    again_loss = eager()
    again_loss.backward()
    again = _grads(model)
    row.update(capture="ok", loss_diff=abs(graph_loss - float(ref_loss)),
               grad_rel_max=max(_rel(got[n], ref[n]) for n in ref), grads_missing=sorted(set(ref) - set(got)),
               eager_twice_loss_diff=abs(float(again_loss) - float(ref_loss)),
               eager_twice_grad_rel_max=max(_rel(again[n], ref[n]) for n in ref),
               worst_param=max(ref, key=lambda n: _rel(got[n], ref[n])))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="*")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--eager-first", action="store_true")
    p.add_argument("--no-cudnn-sdpa", action="store_true")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    failed = False
    for spec in args.specs:
        cmd = [sys.executable, __file__, "--one", spec, "--width", str(args.width), "--layers", str(args.layers),
               "--heads", str(args.heads), "--batch", str(args.batch), "--length", str(args.length)]
        cmd += ["--eager-first"] * args.eager_first + ["--no-cudnn-sdpa"] * args.no_cudnn_sdpa
        proc = subprocess.run(cmd, capture_output=True, text=True)
        results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(results[-1]) if results else {"spec": spec, "capture": f"crashed (exit {proc.returncode})"}
        print(json.dumps(row), flush=True)
        if row.get("capture") != "ok":
            failed = True
            lines = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower() or "error" in ln.lower()]
            print("\n".join(f"  {ln}" for ln in (lines or proc.stderr.splitlines())[-12:]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
