"""Continual-learning comparison on the CPU (issue 9 item 5): Shakespeare, then Milton, for HOPE
(in-context CMS on), HOPE with its CMS frozen, Titans and Transformer++ at equal parameter count;
then test-time learning of the phase-1 HOPE on Milton text it never saw (no outer step).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/continual.py --steps 100 \\
        --json benchmarks/results/continual_cpu.json --plot docs/img/continual_loss.png \\
        --ttl-plot docs/img/continual_ttl.png

Every model is the tiny size of ``nlgraph demo`` (d_model 64, 2 layers, 2 heads, batches of 8x128
bytes, AdamW at 2e-3); Titans' and Transformer++'s MLP widths are searched to match HOPE's
parameter count (``nlgraph.train.demo.matched_overrides``). Each model trains ``--steps`` steps on
Shakespeare, then ``--steps`` on Milton with the same AdamW and a fresh warmup
(:mod:`nlgraph.train.continual`); both validation losses are measured after each phase on
``--eval-batches`` windows. "HOPE, CMS frozen" is the same spec and initialisation with every
in-context commit off, in training and in evaluation (``--no-learn``).

Test-time learning: the phase-1 HOPE (trained on Shakespeare only) reads ``--ttl-windows`` windows
of ``--ttl-length`` bytes of Milton's validation text, once with its CMS committing (periods 16,
256, 2048) and once frozen; the per-position loss (mean over the windows) and its mean over the
first and last quarter of the positions are reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ttl(run: Path, length: int, windows: int, device: str | None) -> dict:
    import numpy as np

    from nlgraph.data import get_tokenizer, load_corpus
    from nlgraph.train.cli import _load_run
    from nlgraph.train.continual import loss_by_position

    model, _ckpt, _spec, dev = _load_run(str(run), device)
    ids = np.asarray(get_tokenizer("byte").encode(load_corpus(None, domain="milton").val_text), dtype=np.int64)
    out = {"run": str(run), "length": length, "windows": windows}
    for learn in (True, False):
        t0 = time.perf_counter()
        curve = loss_by_position(model, ids, length=length, windows=windows, learn=learn, device=dev)
        q = length // 4
        key = "on" if learn else "off"
        out[key] = {"curve": curve, "first_quarter": sum(curve[:q]) / q, "last_quarter": sum(curve[-q:]) / q,
                    "mean": sum(curve) / len(curve), "seconds": time.perf_counter() - t0}
    return out


def _plot_ttl(ttl: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nlgraph.io import atomic_write
    from nlgraph.train.loop import moving_mean

    k = max(8, ttl["length"] // 32)  # the smoothing window: 64 positions at 2048
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.4, 5.2), dpi=110, sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
    for key, label, c in (("on", "CMS learning (in context)", "C0"), ("off", "CMS frozen (learn=False)", "C1")):
        ax.plot(range(1, ttl["length"] + 1), moving_mean(ttl[key]["curve"], k), color=c, lw=1.1, label=label)
    diff = [a - b for a, b in zip(ttl["on"]["curve"], ttl["off"]["curve"])]
    bx.plot(range(1, ttl["length"] + 1), moving_mean(diff, k), color="C2", lw=1.1)
    bx.axhline(0, color="k", lw=0.6)
    for p in (256, 512, 1024, 2048):
        if p < ttl["length"]:
            for a in (ax, bx):
                a.axvline(p, color="0.7", lw=0.6, ls=":")
    ax.set_ylabel(f"loss (nats/byte, mean of {k})")
    bx.set_ylabel("on − off")
    bx.set_xlabel("position in a Milton validation window (bytes)")
    ax.set_title(f"phase-1 HOPE (Shakespeare only) reading Milton, no outer step; {ttl['windows']} windows",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _ttl_only(args) -> int:
    from nlgraph.train.continual import write_json

    ttl = _ttl(Path(args.ttl_run), args.ttl_length, args.ttl_windows, args.device)
    for key in ("on", "off"):
        print(f"learn {key:>3}: first quarter {ttl[key]['first_quarter']:.4f}, last quarter "
              f"{ttl[key]['last_quarter']:.4f}, mean {ttl[key]['mean']:.4f} ({ttl[key]['seconds']:.0f} s)")
    if args.ttl_plot:
        _plot_ttl(ttl, Path(args.ttl_plot))
    if args.json:
        write_json(Path(args.json), {"command": " ".join(sys.argv), "ttl": ttl})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps per phase (default 100)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--domains", default="shakespeare,milton",
                    help="text domains, or the class-incremental MQAR phases mqar-1,mqar-2,...")
    ap.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the demo's)")
    ap.add_argument("--task-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="MQAR phases: a setting of every phase, e.g. num_kv_pairs=4 vocab_size=256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/continual", help="run folders: OUT/<model>/phase-<j>-<domain>")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--ttl-length", type=int, default=2048)
    ap.add_argument("--ttl-windows", type=int, default=8)
    ap.add_argument("--ttl-plot", default=None)
    ap.add_argument("--models", default="hope,hope_frozen,titans,transformer_pp")
    ap.add_argument("--ttl-run", default=None, metavar="DIR",
                    help="only the test-time-learning probe, on this run folder (no training)")
    args = ap.parse_args()
    if args.ttl_run:
        return _ttl_only(args)

    from nlgraph.train.continual import plot_phases, run_continual, write_json
    from nlgraph.train.demo import BATCH, LENGTH, LR, TINY, _params, matched_overrides

    target = _params("hope", list(TINY))
    models = {
        "hope": ("hope", list(TINY), True, "HOPE"),
        "hope_frozen": ("hope", list(TINY), False, "HOPE, CMS frozen"),
        "titans": ("titans", None, True, "Titans"),
        "transformer_pp": ("transformer_pp", None, True, "Transformer++"),
    }
    from nlgraph.train.continual import mqar_phases
    from nlgraph.train.tasks_eval import _task_settings

    domains = [d for d in args.domains.split(",") if d]
    mqar = mqar_phases(domains) is not None
    settings = _task_settings(args)
    length = args.length or LENGTH
    results = []
    t_all = time.perf_counter()
    for key in args.models.split(","):
        spec, ov, learn, label = models[key]
        ov = ov if ov is not None else matched_overrides(spec, target, list(TINY))
        res = run_continual(spec, ov, domains=domains, steps=args.steps, batch=BATCH, length=length, lr=LR,
                            eval_batches=args.eval_batches, device=args.device, learn=learn,
                            out=str(Path(args.out) / key), task_settings=settings)
        res["label"], res["key"] = label, key
        results.append(res)
        print(f"{label}: {res['params']:,} params, {res['seconds']:.0f} s", file=sys.stderr, flush=True)
    payload: dict = {"command": " ".join(sys.argv), "models": results}
    if "hope" in args.models.split(",") and args.ttl_windows > 0 and not mqar:
        run = Path(args.out) / "hope" / f"phase-1-{domains[0]}"
        print(f"==> test-time learning: {run} on {args.ttl_windows}x{args.ttl_length} bytes of "
              f"Milton validation text", file=sys.stderr, flush=True)
        ttl = _ttl(run, args.ttl_length, args.ttl_windows, args.device)
        payload["ttl"] = ttl
        if args.ttl_plot:
            _plot_ttl(ttl, Path(args.ttl_plot))
    payload["seconds"] = time.perf_counter() - t_all

    # the markdown table of docs/results.md
    d0 = domains
    head = (["model", "params"] + [f"{d} after {j + 1}" for j in range(len(d0)) for d in d0]
            + ["avg forgetting", "BWT", "final mean", "time"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        cells = [r["label"], f"{r['params']:,}"] + [f"{v:.3f}" for row in r["losses"] for v in row]
        cells += [f"{r['avg_forgetting']:+.3f}", f"{r['bwt']:+.3f}", f"{r['final_avg_loss']:.3f}",
                  f"{r['seconds']:.0f} s"]
        print("| " + " | ".join(cells) + " |")
    if mqar:
        head = (["model"] + [f"{d} after {j + 1}" for j in range(len(d0)) for d in d0]
                + ["avg forgetting", "BWT", "final mean"])
        print("\naccuracy at the query positions:\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in results:
            cells = [r["label"]] + [f"{v:.3f}" for row in r["accuracy"] for v in row]
            cells += [f"{r['avg_acc_forgetting']:+.3f}", f"{r['acc_bwt']:+.3f}", f"{r['final_avg_acc']:.3f}"]
            print("| " + " | ".join(cells) + " |")
    if "ttl" in payload:
        t = payload["ttl"]
        print(f"\ntest-time learning ({t['windows']}x{t['length']} bytes of Milton, phase-1 HOPE):")
        for key in ("on", "off"):
            print(f"  learn {key:>3}: first quarter {t[key]['first_quarter']:.4f}, last quarter "
                  f"{t[key]['last_quarter']:.4f}, mean {t[key]['mean']:.4f} ({t[key]['seconds']:.0f} s)")
    print(f"\ntotal {payload['seconds']:.0f} s", file=sys.stderr)
    if args.plot:
        title = ("class-incremental MQAR (tiny, CPU): query-position loss after each phase" if mqar else
                 "Shakespeare then Milton (tiny, CPU): validation loss after each phase")
        plot_phases(results, Path(args.plot), title)
    if args.json:
        write_json(Path(args.json), payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
