"""Large gradient-point chunks (LaCT-style): train one deep-memory spec at several chunk sizes and
read semantics on the same data, and report speed and quality side by side (issue 11, item 5).

A chunk of ``C`` tokens takes all its inner gradients at the chunk-start weights, so a larger chunk
is fewer, larger matmuls but a coarser inner optimizer (one step of C summed gradients instead of
C / 16 steps of 16). With ``read: chunk_start`` the chunked form needs only each chunk's end state
(``compilers/chunked.py``, ``chunk_rows``), so its cost per token no longer grows with C; with the
rolling read (``before_write``) a chunk is an attention-like C x C product per layer.

    OMP_NUM_THREADS=1 python benchmarks/large_chunks.py --d-model 128 --layers 2 --length 512 \\
        --batch 4 --steps 150 --json benchmarks/results/large_chunks_cpu.json
    bash benchmarks/device.sh python benchmarks/large_chunks.py --d-model 512 --layers 4 \\
        --length 2048 --batch 4 --steps 60 --json "$OUT/large_chunks.json"

Each configuration is ``CHUNK:READ``; every run trains from the same seed (``--seed``) on the same
batches and evaluates the same validation batches. tokens/s is the median over the steps after the
first two.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT = ["16:before_write", "64:before_write", "16:chunk_start", "64:chunk_start", "512:chunk_start",
           "2048:chunk_start"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="titans")
    ap.add_argument("--configs", nargs="+", default=DEFAULT, metavar="CHUNK:READ")
    ap.add_argument("--level", default="memory", help="the level whose chunk and read are varied")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None, help="default: d_model / 64")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--time-per-run", type=float, default=None, help="seconds of training per run at most")
    ap.add_argument("--out", default="runs/large_chunks")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="spec overrides applied to every configuration (e.g. the CMS levels' updates)")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (weights and batches; all runs share it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from nlgraph.train.loop import TrainConfig
    from train_check import train_row  # this folder is on sys.path when a script of it runs

    heads = args.heads or max(1, args.d_model // 64)
    print(f"# large_chunks: {args.spec}, d_model {args.d_model}, {args.layers} layers, {heads} heads, "
          f"B={args.batch}, T={args.length}, {args.steps} steps, lr {args.lr}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
          + (f", set {' '.join(args.set)}" if args.set else ""), flush=True)
    rows = []
    for config in args.configs:
        chunk, _, read = config.partition(":")
        ov = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={heads}",
              f"levels.{args.level}.gradient_point.chunk={int(chunk)}", f"levels.{args.level}.read={read}",
              *args.set]
        out = Path(args.out) / f"{args.spec}-{chunk}-{read}"
        cfg = TrainConfig(out=str(out), steps=args.steps, batch=args.batch, length=args.length, lr=args.lr,
                          eval_every=args.steps, eval_batches=args.eval_batches, device=args.device,
                          compile=False, precision=args.precision, overrides=ov, time_limit=args.time_per_run,
                          progress=False, replace=True, seed=args.seed)
        row = {"chunk": int(chunk), "read": read, **train_row(args.spec, cfg)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print("| chunk | read | status | steps | last loss | validation | tok/s | peak GiB | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['chunk']} | {r['read']} | FAILED: {r['error'][:160]} | | | | | | {r['seconds']} |")
            continue
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        print(f"| {r['chunk']} | {r['read']} | {r['status']} | {r['steps']} | {r['last_loss']:.3f} | {val} | "
              f"{r['tok_s']:,.0f} | {r.get('peak_gib', '-')} | {r['seconds']} |")
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps({"args": vars(args), "rows": rows}, indent=1).encode())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
