"""``nlgraph eval``: perplexity of a trained run, and accuracy on the synthetic tasks (MQAR, S-NIAH,
formal languages), training a spec on the task first when given a spec (the way Zoology runs them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import NLGraphError

__all__ = ["run_eval", "perplexity"]


def is_run(target: str) -> bool:
    """Whether ``target`` is a run folder (or one checkpoint of it) rather than a spec."""
    p = Path(target)
    return p.is_dir() and ((p / "latest.json").exists() or (p / "state.json").exists())


@torch.no_grad()
def perplexity(model, ids, *, batch: int, length: int, max_batches: int, device) -> dict[str, float]:
    """Mean next-token loss over contiguous validation windows of ``ids`` (the run's validation
    split): ``{"val_loss", "ppl", "bits_per_token", "tokens"}``."""
    from ..data import val_batches
    from .loop import lm_loss

    model.eval()
    total, count = 0.0, 0
    for x, y in val_batches(ids, batch, length, max_batches):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        n = int((y != -100).sum())
        total += float(lm_loss(logits, y)) * n
        count += n
    if count == 0:
        raise NLGraphError(f"the validation split has fewer than {length + 1} tokens; use a shorter --length")
    loss = total / count
    return {"val_loss": loss, "ppl": math.exp(min(loss, 50)), "bits_per_token": loss / math.log(2), "tokens": count}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _train_first(args, task: str) -> str:
    """Train the spec ``args.target`` on ``task`` into a run folder; returns the folder."""
    from .cli import _config, _spec_name
    from .loop import train

    out = args.out or f"runs/eval-{_spec_name(args.target)}-{task}"
    cfg = _config(args, out)
    cfg.task = task
    # the default folder is this command's own: evaluating again retrains from scratch there
    cfg.replace = args.out is None or getattr(args, "owned_out", False)
    if not cfg.replace:
        from .checkpoint import existing_run

        found = existing_run(out)
        if found is not None:
            raise NLGraphError(f"this folder already holds a run ({found}); evaluate it as it is with "
                               f"`nlgraph eval {out} --task {task}`, or train into another --out (nothing "
                               f"was changed)", file=out)
    cfg.eval_every = max(args.steps // 4, 1)
    print(f"==> training {args.target} on {task} for {args.steps} steps ({args.batch}x{args.length}) -> {out}",
          flush=True)
    res = train(args.target, cfg)
    # --time-limit asked for a shortened training: evaluate it (the results carry the step reached)
    if res.stopped != "done" and not (res.stopped == "time limit" and getattr(args, "time_limit", None)):
        raise NLGraphError(f"training on {task} stopped at step {res.step} of {args.steps}; finish it with "
                           f"`nlgraph train {args.target} --task {task} --out {out} --steps {args.steps} --resume` "
                           f"(same options), then evaluate the run folder", file=out)
    return out


def run_eval(args) -> dict[str, Any]:
    """Run ``nlgraph eval``; returns the results with a rendered ``table``."""
    from .cli import _load_run

    task = args.task
    if task == "ppl":
        target = args.target if is_run(args.target) else _train_first(args, "corpus")
        model, ckpt, spec, dev = _load_run(target, args.device, not getattr(args, "no_learn", False))
        cfg = ckpt.state.get("config", {})
        if cfg.get("task", "corpus") != "corpus":
            raise NLGraphError(f"this run was trained on the task '{cfg.get('task')}'; perplexity needs "
                               f"a run trained on text (use --task {cfg.get('task')})", file=target)
        from ..data import get_tokenizer, load_corpus

        tok = get_tokenizer(cfg.get("tokenizer", "byte"))
        data = args.data or cfg.get("data")
        corpus = load_corpus(data, domain=args.domain if args.data else cfg.get("domain", "shakespeare"))
        import numpy as np

        ids = np.asarray(tok.encode(corpus.val_text), dtype=np.int64)
        length = args.length
        res = perplexity(model, ids, batch=args.batch, length=length, max_batches=args.eval_batches, device=dev)
        unit = "bits/byte" if tok.name == "byte" else "bits/token"
        table = _table(["run", "corpus", "step", "val loss", "ppl", unit, "tokens"],
                       [[target, corpus.name, ckpt.step, f"{res['val_loss']:.4f}", f"{res['ppl']:.3f}",
                         f"{res['bits_per_token']:.4f}", f"{res['tokens']:,}"]])
        return {"task": "ppl", "run": str(target), "step": ckpt.step, "corpus": corpus.name, **res, "table": table}
    if task == "continual":
        from .continual import evaluate_continual

        return evaluate_continual(args, _table)
    from .tasks_eval import evaluate_task

    return evaluate_task(args, _train_first, _table)
