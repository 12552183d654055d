"""Draw the training loss of several runs on one figure, from their ``metrics.jsonl`` files.

    python benchmarks/plot_runs.py hope=runs/hope/metrics.jsonl titans=runs/titans/metrics.jsonl \\
        --png docs/img/runs.png --title "d_model 512, T=2048"

Each run: the per-step loss (faint) and a 10-step moving mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=METRICS_JSONL")
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nlgraph.io import atomic_write
    from nlgraph.train.loop import moving_mean

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for i, run in enumerate(args.runs):
        name, _, path = run.partition("=")
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        color = f"C{i}"
        ax.plot(steps, loss, lw=0.7, alpha=0.35, color=color)
        ax.plot(steps, moving_mean(loss, 10), lw=1.5, color=color, label=f"{name} (10-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(args.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(args.png, lambda f: fig.savefig(f, format="png"))


if __name__ == "__main__":
    main()
