"""Train every library spec (or the ones named) for a few steps through ``nlgraph.train`` and report
whether the loss stays finite and falls, the tokens/s and the peak memory.

    python benchmarks/train_check.py --d-model 256 --layers 4 --length 512 --steps 300   # CPU or GPU
    bash benchmarks/device.sh python benchmarks/train_check.py --d-model 512 --layers 4 \\
        --length 2048 --batch 8 --steps 30 --time-per-spec 25 --json "$OUT/train_check.json"

One process trains the specs one after another on the default corpus (bytes); each run folder is
under ``--out``. tokens/s is the median over the steps after the first two (compile and warm-up).
A spec that fails (non-finite loss, an error) is reported in its row and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def train_row(spec: str, cfg) -> dict:
    """Train ``spec`` with ``cfg`` (a ``TrainConfig``) and summarise the run as one row: status,
    steps, params, first / last / lowest loss, validation loss, median tokens/s after the first two
    steps, seconds, and the peak GPU memory. A failure is the row's ``error``, not an exception."""
    import torch

    from nlgraph.errors import NLGraphError
    from nlgraph.train.loop import train

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    row: dict = {}
    try:
        res = train(spec, cfg)
        recs = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        tok = [r["tok_s"] for r in recs[2:]] or [r["tok_s"] for r in recs]
        row.update(status=res.stopped, steps=res.step, params=res.params, first_loss=recs[0]["loss"],
                   last_loss=recs[-1]["loss"], min_loss=min(r["loss"] for r in recs),
                   val_loss=res.val_loss, tok_s=statistics.median(tok))
    except NLGraphError as e:
        row.update(status="FAILED", error=e.render())
    except Exception as e:  # a crash in one run must not hide the others' results
        row.update(status="CRASHED", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*", help="library specs (default: every non-equiv library spec)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default: d_model / 64")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--time-per-spec", type=float, default=None, help="seconds of training per spec at most")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="per-block torch.compile (default eager)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="runs/train_check")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every spec")
    args = ap.parse_args()

    import torch

    import nlgraph
    from nlgraph.train.loop import TrainConfig

    specs = args.specs or [n for n in nlgraph.library_specs() if not n.startswith("equiv/")]
    heads = args.heads or max(1, args.d_model // 64)
    rows = []
    print(f"# train_check: d_model {args.d_model}, {args.layers} layers, {heads} heads, B={args.batch}, "
          f"T={args.length}, {args.steps} steps, lr {args.lr}, precision {args.precision}, "
          f"{'compiled' if args.compile else 'eager'}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)
    for name in specs:
        ov = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={heads}", *args.set]
        out = Path(args.out) / name.replace("/", "_")
        cfg = TrainConfig(out=str(out), steps=args.steps, batch=args.batch, length=args.length, lr=args.lr,
                          eval_every=args.steps, eval_batches=2, device=args.device, compile=args.compile,
                          precision=args.precision, overrides=ov, time_limit=args.time_per_spec, progress=False,
                          replace=True)
        row = {"spec": name, **train_row(name, cfg)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every spec: a sweep cut short by its command's time limit keeps its rows
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))

    print()
    print("| spec | status | steps | params | first loss | last loss | val loss | tok/s | peak GiB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['spec']} | {r['status']}: {r['error'][:160]} | | | | | | | | {r['seconds']} |")
            continue
        val = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None and math.isfinite(r["val_loss"]) else "-"
        print(f"| {r['spec']} | {r['status']} | {r['steps']} | {r['params']:,} | {r['first_loss']:.3f} | "
              f"{r['last_loss']:.3f} | {val} | {r['tok_s']:,.0f} | {r.get('peak_gib', '-')} | {r['seconds']} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
