"""``nlgraph demo``: the README's first command. Trains a tiny HOPE and a Transformer++ of about the
same parameter count on the default corpus, prints their validation losses side by side, samples
from each and draws both loss curves."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..errors import NLGraphError
from ..io import atomic_write

__all__ = ["run_demo", "matched_overrides"]

# Small enough for a CPU in a few minutes: 2 blocks of width 64.
TINY = ["vars.d_model=64", "vars.layers=2", "vars.heads=2"]
LENGTH = 128
BATCH = 8
LR = 2e-3


def _params(spec: str, overrides: list[str]) -> int:
    from ..limits import count_parameters
    from ..spec.loader import load_spec

    return count_parameters(load_spec(spec, overrides))


def matched_overrides(spec: str, target: int, base: list[str]) -> list[str]:
    """Overrides of ``spec`` (a Transformer++-like spec with an ``mlp`` level) whose parameter count
    is closest to ``target``: the MLP's hidden width is searched in steps of 16."""
    from ..spec.loader import load_spec

    s = load_spec(spec, base)
    if "mlp" not in s.levels or getattr(s.levels["mlp"], "memory", None) is None:
        return base
    best, best_gap = base, abs(_params(spec, base) - target)
    lo, hi = 16, 16 * 256
    # parameters grow linearly in the hidden width: bisect, then check the neighbours
    while hi - lo > 16:
        mid = (lo + hi) // 32 * 16
        if _params(spec, [*base, f"levels.mlp.memory.hidden={mid}"]) < target:
            lo = mid
        else:
            hi = mid
    for h in (lo, hi):
        ov = [*base, f"levels.mlp.memory.hidden={h}"]
        gap = abs(_params(spec, ov) - target)
        if gap < best_gap:
            best, best_gap = ov, gap
    return best


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    from .loop import moving_mean

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for i, run in enumerate(runs):
        recs = [json.loads(line) for line in (Path(run["out"]) / "metrics.jsonl").read_text().splitlines() if line]
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        smooth = moving_mean(loss, max(1, len(loss) // 30))
        color = f"C{i}"
        ax.plot(steps, smooth, color=color, lw=1.2, label=f"{run['name']} train")
        v = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if v:
            ax.plot(*zip(*v), "o--", color=color, ms=4, lw=1, label=f"{run['name']} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("nlgraph demo: tiny HOPE vs Transformer++ on Shakespeare (bytes)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def run_demo(args) -> list[dict[str, Any]]:
    """Train both specs, print the comparison and samples; returns one record per model."""
    from ..data import load_corpus
    from .cli import _sample_text
    from .loop import TrainConfig, train

    load_corpus(None)  # a missing corpus fails here, with how to fetch it, before any training
    out = Path(args.out)
    a, b = args.specs
    ov_a = list(TINY)
    n_a = _params(a, ov_a)
    ov_b = matched_overrides(b, n_a, list(TINY))
    runs = []
    for name, ov in ((a, ov_a), (b, ov_b)):
        cfg = TrainConfig(out=str(out / name.replace("/", "_")), steps=args.steps, batch=BATCH, length=LENGTH,
                          lr=LR, eval_every=max(args.steps // 5, 1), eval_batches=8, device=args.device,
                          overrides=ov, seed=0, replace=True)
        print(f"==> training {name} ({' '.join(ov)}) for {args.steps} steps of {BATCH}x{LENGTH} bytes", flush=True)
        t0 = time.perf_counter()
        res = train(name, cfg)
        if res.stopped != "done":
            raise NLGraphError(f"the demo stopped while training {name} ({res.stopped} at step {res.step}); "
                               f"run `nlgraph demo` again to start over", file=str(out))
        first = json.loads((Path(res.out) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        runs.append({"name": name, "overrides": ov, "params": res.params, "val_loss": res.val_loss,
                     "first_loss": first, "loss": res.loss, "tok_s": res.tok_s, "seconds": time.perf_counter() - t0,
                     "out": str(res.out)})
    print()
    print(f"{'model':<16}{'params':>10}{'first loss':>12}{'val loss':>10}{'bits/byte':>11}{'tok/s':>9}{'time':>8}")
    for r in runs:
        print(f"{r['name']:<16}{r['params']:>10,}{r['first_loss']:>12.3f}{r['val_loss']:>10.3f}"
              f"{r['val_loss'] / math.log(2):>11.3f}{r['tok_s']:>9,.0f}{r['seconds']:>7.0f}s")
    for r in runs:
        print(f"\n--- {r['name']} samples ---")
        text = _sample_text(Path(r["out"]), "ROMEO:", 160, 0.8, 40, 0, args.device)
        print(text.rstrip())
    _plot(runs, out / "loss.png")
    atomic_write(out / "demo.json", (json.dumps(runs, indent=1) + "\n").encode())
    print(f"\nloss curves: {out / 'loss.png'}; numbers: {out / 'demo.json'}")
    fell = [r["name"] for r in runs if not (r["val_loss"] < r["first_loss"])]
    if fell:
        print(f"warning: the loss did not fall for {', '.join(fell)}")
    return runs
