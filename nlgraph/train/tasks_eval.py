"""``nlgraph eval --task mqar|niah|formal|<language>``: accuracy of a model on a synthetic task.

Given a SPEC, the model is first trained on the task from scratch (``--steps``, ``--batch``,
``--length``, task settings with ``--task-setting KEY=VALUE``), the way Zoology and the formal
language benchmarks run; given a run folder trained on the task, it is evaluated as it is.
Accuracy is measured on held-out draws (seeds no training step uses) at every length of
``--eval-lengths`` (default: the training length), and for ``formal`` on every language, in
distribution (lengths 1–L) and beyond it (L+1–2L).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import NLGraphError
from ..io import atomic_write
from .evaluate import is_run

__all__ = ["evaluate_task", "accuracy_on"]

EVAL_SEED = 99_991  # held-out: the training batches use step_seed(seed, step) with small seeds


@torch.no_grad()
def accuracy_on(model, task, batches: int, batch: int, device, **settings) -> float:
    """Mean accuracy of ``model`` on ``batches`` held-out batches of ``task`` (the task's own
    metric: token accuracy for MQAR, whole-answer accuracy for NIAH and formal languages)."""
    from ..data import sequence_accuracy, step_seed, token_accuracy

    metric = sequence_accuracy if task.metric == "sequence" else token_accuracy
    model.eval()
    scores = []
    for i in range(batches):
        x, y = task.generate(batch, seed=step_seed(EVAL_SEED, i), **settings)
        x, y = x.to(device), y.to(device)
        acc = metric(model(x).float(), y)
        acc = acc[~torch.isnan(acc)]
        scores.append(acc)
    allv = torch.cat(scores)
    return float(allv.mean()) if allv.numel() else float("nan")


def _parse_lengths(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise NLGraphError(f"--eval-lengths {text!r}: give comma-separated integers, e.g. 64,128,256") from None
    if not out or out[0] < 2:
        raise NLGraphError(f"--eval-lengths {text!r}: lengths must be at least 2")
    return out


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _task_settings(args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in getattr(args, "task_setting", None) or []:
        if "=" not in item:
            raise NLGraphError(f"--task-setting {item!r}: write KEY=VALUE, e.g. num_kv_pairs=16")
        k, v = item.split("=", 1)
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"true": True, "false": False, "none": None}.get(v.lower(), v)
    return out


def _ensure_vocab(args, need: int) -> None:
    """A spec evaluated on a task whose tokens outnumber its vocab gets ``model.vocab`` raised."""
    from ..spec.loader import load_spec

    spec = load_spec(args.target, args.overrides)
    if spec.model.vocab < need:
        args.overrides = [*args.overrides, f"model.vocab={need}"]


def _one_task(args, name: str, train_first, lengths: list[int], extra: dict[str, Any]):
    """Train (given a spec) or load the run, score it at ``lengths``: ``(results, model, device)``."""
    from ..data import get_task
    from .cli import _load_run

    task = get_task(name)
    settings = {**extra}
    if is_run(args.target):
        run = args.target
    else:
        _ensure_vocab(args, task.vocab_needed(**{"length": args.length, **settings}))
        args.task_setting = [f"{k}={v}" for k, v in settings.items()]
        run = train_first(args, name)
    model, ckpt, spec, dev = _load_run(run, args.device, not getattr(args, "no_learn", False))
    cfg = ckpt.state.get("config", {})
    if cfg.get("task") != name:
        raise NLGraphError(f"this run was trained on '{cfg.get('task')}', not '{name}'; evaluate it with "
                           f"--task {cfg.get('task')} or train one on {name}", file=run)
    trained = {**cfg.get("task_settings", {}), "length": cfg.get("length")}
    rows = []
    for length in lengths:
        s = {**trained, "length": length}
        acc = accuracy_on(model, task, args.eval_batches, min(args.batch, 64), dev, **s)
        rows.append({"task": name, "length": length, "accuracy": acc, "trained_length": trained["length"],
                     **{k: v for k, v in s.items() if k != "length"}})
    return {"run": str(run), "step": ckpt.step, "spec": spec.name, "rows": rows}, model, dev


def evaluate_task(args, train_first, table) -> dict[str, Any]:
    """Run the task evaluation of ``nlgraph eval``; returns JSON-able results and a ``table``."""
    from ..data import FORMAL_LANGUAGES

    extra = _task_settings(args)
    name = args.task
    if name == "formal":
        if is_run(args.target):
            raise NLGraphError("--task formal trains one model per language; give a SPEC, or evaluate a "
                               "run with its own language (--task parity, ...)", file=args.target)
        base_out = args.out
        rows = []
        runs = []
        # the default folders are this command's own (evaluating again starts them over)
        args.owned_out = base_out is None
        for lang in FORMAL_LANGUAGES:
            args.out = f"{base_out or 'runs/eval-formal'}/{lang}"
            saved = list(args.overrides)
            res, model, dev = _one_task(args, lang, train_first, [args.length], extra)
            args.overrides = saved
            # beyond the training lengths: strings of length L+1..2L only
            from ..data import get_task

            far = accuracy_on(model, get_task(lang), args.eval_batches, min(args.batch, 64), dev,
                              length=2 * args.length, min_length=args.length + 1)
            rows.append({"task": lang, "in_distribution": res["rows"][0]["accuracy"], "longer": far, "step": res["step"],
                         "length": args.length})
            runs.append(res["run"])
        tbl = table(["language", f"accuracy, length 1-{args.length}", f"accuracy, length {args.length + 1}-{2 * args.length}"],
                    [[r["task"], f"{r['in_distribution']:.3f}", f"{r['longer']:.3f}"] for r in rows])
        return {"task": "formal", "runs": runs, "rows": rows, "table": tbl}

    lengths = _parse_lengths(getattr(args, "eval_lengths", None), args.length)
    res, _, _ = _one_task(args, name, train_first, lengths, extra)
    tbl = table(["task", "length", "accuracy", "trained at"],
                [[r["task"], r["length"], f"{r['accuracy']:.3f}", r["trained_length"]] for r in res["rows"]])
    if args.plot:
        _plot(res["rows"], Path(args.plot), f"{res['spec']} on {name}: accuracy vs length")
    return {"task": name, **res, "table": tbl}
