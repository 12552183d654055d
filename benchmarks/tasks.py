"""The synthetic-task tables of docs/results.md: every spec trained from scratch on every task with
``nlgraph eval SPEC --task ...`` (one process per run, each under a wall-clock limit), then the
accuracies as markdown tables.

    python benchmarks/tasks.py --out runs/tasks --device cpu --steps 200      # small, CPU
    bash benchmarks/device.sh python benchmarks/tasks.py --device cuda --out /tmp/tasks \\
        --json "$OUT/tasks.json" --md "$OUT/tasks.md" --time-per-run 90

Tasks: ``mqar`` (accuracy at the query positions, evaluated at every ``--eval-lengths``), ``niah``
(whole-answer accuracy), ``formal`` (one model per language; in distribution and on longer
strings). Results are written after every run, so a stopped sweep keeps what it measured. A run
that fails or runs out of time is a row that says so. ``--jobs N`` runs N of them at once (small
models leave most of a GPU idle; the tables then say the runs shared it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

SPECS = ["hope", "titans", "gated_deltanet", "deltanet", "linear_attention", "transformer_pp"]


def _run(spec: str, task: str, args, out: Path) -> dict:
    res_file = out / f"{spec}-{task}.json"
    length = {"mqar": args.mqar_length, "niah": args.niah_length, "formal": args.formal_length}[task]
    cmd = [sys.executable, "-P", "-m", "nlgraph", "eval", spec, "--task", task, "--steps", str(args.steps),
           "--batch", str(args.batch), "--length", str(length), "--lr", str(args.lr), "--seed", str(args.seed),
           "--eval-batches", str(args.eval_batches), "--out", str(out / f"{spec}-{task}"),
           "--json", str(res_file), "--no-compile",
           f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={args.heads}"]
    if args.device:
        cmd += ["--device", args.device]
    train_time = args.formal_train_time if task == "formal" and args.formal_train_time else args.train_time
    if train_time:
        cmd += ["--time-limit", str(train_time)]
    if task == "mqar":
        cmd += ["--eval-lengths", args.eval_lengths, "--task-setting", f"num_kv_pairs={args.kv_pairs}",
                "--task-setting", f"vocab_size={args.vocab}"]
    if task == "niah":
        cmd += ["--eval-lengths", str(length)]
    t0 = time.perf_counter()
    row = {"spec": spec, "task": task, "command": " ".join(cmd[1:])}
    res_file.unlink(missing_ok=True)
    # the run folders are this sweep's own: a re-run (or a run killed by its time limit) starts over
    shutil.rmtree(out / f"{spec}-{task}", ignore_errors=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_per_run)
        row["rc"] = p.returncode
        if p.returncode != 0:
            row["error"] = (p.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
    except subprocess.TimeoutExpired:
        row["rc"], row["error"] = None, f"time limit ({args.time_per_run:.0f} s)"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if row.get("rc") == 0 and res_file.is_file():
        row["result"] = json.loads(res_file.read_text())
    return row


def tables(rows: list[dict], eval_lengths: list[int]) -> str:
    """Markdown: MQAR (accuracy by length), NIAH, formal languages (in distribution / longer)."""
    out = []
    by = {(r["spec"], r["task"]): r for r in rows}
    specs = list(dict.fromkeys(r["spec"] for r in rows))

    def failed(r):
        if r is None or "result" in r:
            return "not run"
        err = r.get("error", "no result")
        return err if len(err) <= 60 else err[:57].rstrip() + "..."

    if any(t == "mqar" for _, t in by):
        out.append("| spec | " + " | ".join(f"MQAR, length {n}" for n in eval_lengths) + " | steps | s |")
        out.append("|---|" + "---|" * (len(eval_lengths) + 2))
        for s in specs:
            r = by.get((s, "mqar"))
            if r is None or "result" not in r:
                out.append(f"| {s} | {failed(r)} |" + " |" * (len(eval_lengths) + 1))
                continue
            acc = {x["length"]: x["accuracy"] for x in r["result"]["rows"]}
            out.append(f"| {s} | " + " | ".join(f"{acc[n]:.3f}" if n in acc else "-" for n in eval_lengths)
                       + f" | {r['result'].get('step', '-')} | {r['seconds']:.0f} |")
        out.append("")
    if any(t == "niah" for _, t in by):
        out.append("| spec | S-NIAH-1 accuracy | steps | s |")
        out.append("|---|---|---|---|")
        for s in specs:
            r = by.get((s, "niah"))
            if r is None or "result" not in r:
                out.append(f"| {s} | {failed(r)} | | |")
                continue
            out.append(f"| {s} | {r['result']['rows'][0]['accuracy']:.3f} | {r['result'].get('step', '-')} | "
                       f"{r['seconds']:.0f} |")
        out.append("")
    if any(t == "formal" for _, t in by):
        langs = []
        for r in rows:
            if r["task"] == "formal" and "result" in r:
                langs = [x["task"] for x in r["result"]["rows"]]
                break
        out.append("| spec | " + " | ".join(f"{lang} (in / longer)" for lang in langs) + " | fewest steps | s |")
        out.append("|---|" + "---|" * (len(langs) + 2))
        for s in specs:
            r = by.get((s, "formal"))
            if r is None or "result" not in r:
                out.append(f"| {s} | {failed(r)} |" + " |" * (len(langs) + 1))
                continue
            acc = {x["task"]: x for x in r["result"]["rows"]}
            steps = [x["step"] for x in r["result"]["rows"] if "step" in x]
            out.append(f"| {s} | " + " | ".join(
                f"{acc[lang]['in_distribution']:.2f} / {acc[lang]['longer']:.2f}" for lang in langs)
                + f" | {min(steps) if steps else '-'} | {r['seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--tasks", nargs="+", default=["mqar", "niah", "formal"], choices=["mqar", "niah", "formal"])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mqar-length", type=int, default=64)
    ap.add_argument("--kv-pairs", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512, help="MQAR vocabulary, above every eval length (Zoology: 8192)")
    ap.add_argument("--eval-lengths", default="64,128,256")
    ap.add_argument("--niah-length", type=int, default=256)
    ap.add_argument("--formal-length", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--time-per-run", type=float, default=600,
                    help="kill a run (training and evaluation) after this many seconds: no result")
    ap.add_argument("--train-time", type=float, default=None,
                    help="stop each training after this many seconds and evaluate what was trained "
                         "(the tables give the step reached)")
    ap.add_argument("--formal-train-time", type=float, default=None,
                    help="--train-time for each language of the formal task (default --train-time)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (each its own process; with --train-time the steps reached depend on it)")
    ap.add_argument("--out", type=Path, default=Path("runs/tasks"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print (and --md) the tables of earlier sweeps' JSON files instead of running: a "
                         "later file's row replaces an earlier one of the same spec and task unless it failed")
    args = ap.parse_args()

    from nlgraph.io import atomic_write

    if args.merge:
        merged: dict[tuple[str, str], dict] = {}
        for path in args.merge:
            for r in json.loads(path.read_text())["rows"]:
                key = (r["spec"], r["task"])
                if key not in merged or "result" in r or "result" not in merged[key]:
                    merged[key] = {**r, "sweep": str(path)}
        order = {s: i for i, s in enumerate(SPECS)}
        rows = sorted(merged.values(), key=lambda r: (order.get(r["spec"], len(order)), r["spec"]))
        md = tables(rows, sorted({int(n) for n in args.eval_lengths.split(",")}))
        if args.md:
            atomic_write(args.md, md.encode())
        print(md)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    eval_lengths = sorted({int(n) for n in args.eval_lengths.split(",")})
    header = (f"# tasks: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, {args.steps} steps of "
              f"B={args.batch}, lr {args.lr}; MQAR length {args.mqar_length}, {args.kv_pairs} pairs, vocab "
              f"{args.vocab}; S-NIAH-1 length {args.niah_length}; formal length 1-{args.formal_length}"
              + (f"; {args.jobs} runs at once" if args.jobs > 1 else ""))
    print(header, flush=True)
    runs = [(spec, task) for task in args.tasks for spec in args.specs]
    done: dict[int, dict] = {}

    def finish(i: int, row: dict) -> None:
        # called on the main thread, in completion order; the tables keep the sweep's order
        done[i] = row
        brief = {k: v for k, v in row.items() if k not in ("result", "command")}
        if "result" in row:
            brief["accuracy"] = [round(x.get("accuracy", x.get("in_distribution", float("nan"))), 3)
                                 for x in row["result"]["rows"]]
        print(json.dumps(brief), flush=True)
        rows = [done[j] for j in sorted(done)]
        md = header + "\n\n" + tables(rows, eval_lengths)
        if args.json:
            atomic_write(args.json, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "rows": rows}, indent=1).encode())
        if args.md:
            atomic_write(args.md, md.encode())

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run, spec, task, args, args.out): i for i, (spec, task) in enumerate(runs)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # a run the sweep could not even score is a row, not the end of the sweep
                spec, task = runs[i]
                row = {"spec": spec, "task": task, "rc": None, "error": f"{type(e).__name__}: {e}"[:300]}
            finish(i, row)
    rows = [done[j] for j in sorted(done)]
    print()
    print(tables(rows, eval_lengths))
    return 0 if all("result" in r for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
