"""Data-parallel training against one process (issue 12): the equal-loss check and the scaling table.

For every spec, ``nlgraph train`` runs twice on the same data, seed and global batch: once in one
process, then under ``torchrun`` with ``--procs`` processes (one GPU each on CUDA, NCCL; gloo on
CPU), each rank taking ``batch / procs`` rows. The losses of every step are compared (the
data-parallel loss is the ranks' mean, logged by rank 0), and tokens/s (the global batch over the
step's wall time, median after ``--skip`` steps) gives the scaling efficiency
``tok_s(N) / (N · tok_s(1))``.

    # two H200s (the nvidia-h200-x2 device kind)
    bash benchmarks/device.sh python benchmarks/ddp_check.py --procs 2 --d-model 512 --layers 4 \\
        --length 4096 --batch 8 --steps 20 --json "$OUT/ddp.json"
    # CPU, gloo, tiny: checks the script and the equal-loss property, not a speed
    python benchmarks/ddp_check.py --device cpu --procs 2 --d-model 32 --layers 1 --heads 2 \\
        --length 64 --batch 4 --steps 4 transformer_pp

Both runs train in the same mode: under torchrun a step is not replayed as a CUDA graph, so the
one-process run is given ``--no-cuda-graph`` too (``--graph-single`` keeps its graph, to show what
one GPU does at its best). NVLink multicast stays off in every child (``NCCL_NVLS_ENABLE=0`` and
the device's other two variables), as the GPU machines require. Exit status 1 if a run failed or
a loss differed by more than ``--tol`` (default: 2e-2 in bf16, 1e-4 in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the GPU machines forbid NVLink multicast (it can take the host's shared GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _train_args(spec: str, args, out: Path) -> list[str]:
    heads = args.heads or max(1, args.d_model // 64)
    cmd = ["train", spec, f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={heads}",
           *args.set, "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length),
           "--lr", str(args.lr), "--seed", "0", "--eval-every", str(10 ** 9), "--eval-batches", "1",
           "--save-every", str(10 ** 9), "--no-progress", "--out", str(out), "--precision", args.precision]
    if args.device:
        cmd += ["--device", args.device]
    if not args.compile:
        cmd.append("--no-compile")
    return cmd


def _run(cmd: list[str], env: dict, timeout: float, cwd: Path) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        # run outside the checkout: torchrun's `-m nlgraph` puts the working folder first on the
        # path, where a source tree's nlgraph/ (without compilers/ laid out) would shadow the package
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        rc, tail = r.returncode, (r.stdout + r.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = 124, f"timed out after {timeout:.0f} s: {(e.stderr or b'')[-1000:]!r}"
    return rc, time.perf_counter() - t0, tail


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def check_spec(spec: str, args, work: Path) -> dict:
    env = {**os.environ, **NO_MULTICAST}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    single, multi = work / f"{spec}_1", work / f"{spec}_{args.procs}"
    one = [sys.executable, "-m", "nlgraph", *_train_args(spec, args, single)]
    if not args.graph_single:
        one.append("--no-cuda-graph")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    many = [torchrun, "--standalone", "--nproc_per_node", str(args.procs), "-m", "nlgraph",
            *_train_args(spec, args, multi)]
    row: dict = {"spec": spec, "procs": args.procs}
    for tag, cmd, out in (("1", one, single), (str(args.procs), many, multi)):
        rc, wall, tail = _run(cmd, env, args.timeout, work)
        recs = _metrics(out)
        row[f"rc_{tag}"], row[f"wall_s_{tag}"] = rc, round(wall, 1)
        if rc != 0 or not recs:
            row["error"] = f"{'one process' if tag == '1' else 'torchrun'} failed (rc {rc}): {tail.strip()[-600:]}"
            return row
        tok = [r["tok_s"] for r in recs[args.skip:]] or [r["tok_s"] for r in recs]
        row[f"tok_s_{tag}"] = round(statistics.median(tok), 1)
        row[f"loss_{tag}"] = [r["loss"] for r in recs]
    a, b = row["loss_1"], row[f"loss_{args.procs}"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    row["steps_compared"] = len(diffs)
    row["max_abs_loss_diff"] = max(diffs) if diffs else None
    row["efficiency"] = round(row[f"tok_s_{args.procs}"] / (args.procs * row["tok_s_1"]), 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*", default=["transformer_pp", "gated_deltanet", "hope"])
    ap.add_argument("--procs", type=int, default=2, help="processes (GPUs) of the data-parallel run")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default: d_model / 64")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="global batch (a multiple of --procs)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the tokens/s median")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--compile", action="store_true", help="per-block torch.compile in both runs (default eager)")
    ap.add_argument("--graph-single", action="store_true", help="let the one-process run replay CUDA graphs")
    ap.add_argument("--tol", type=float, default=None, help="largest allowed |loss difference| at any step")
    ap.add_argument("--timeout", type=float, default=900, help="seconds each run may take")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every spec")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.batch % args.procs:
        ap.error(f"--batch {args.batch} is not a multiple of --procs {args.procs}")

    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.procs:
        print(f"ddp_check: {args.procs} processes need {args.procs} GPUs; this machine has "
              f"{torch.cuda.device_count()} (exit 0, nothing run)")
        return 0
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    tol = args.tol if args.tol is not None else (2e-2 if bf16 else 1e-4)
    print(f"# ddp_check: {args.procs} processes vs 1, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"d_model {args.d_model}, {args.layers} layers, global B={args.batch}, T={args.length}, "
          f"{args.steps} steps, {'bf16' if bf16 else 'fp32'}, {'compiled' if args.compile else 'eager'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp_check_") as tmp:
        for spec in args.specs:
            row = check_spec(spec, args, Path(tmp))
            row["tol"] = tol
            row["ok"] = "error" not in row and row["max_abs_loss_diff"] is not None and row["max_abs_loss_diff"] <= tol
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("loss_")}), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    n = args.procs
    print(f"\n| spec | tok/s, 1 | tok/s, {n} | efficiency | max abs loss diff ({'steps'}) | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['spec']} | {r['error'][:200]} | | | | no |")
            continue
        print(f"| {r['spec']} | {r['tok_s_1']:,.0f} | {r[f'tok_s_{n}']:,.0f} | {r['efficiency']:.3f} | "
              f"{r['max_abs_loss_diff']:.2e} ({r['steps_compared']}) | {'yes' if r['ok'] else 'NO'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
