"""``nlgraph eval SPEC --task continual``: train one model on a sequence of text domains
(Shakespeare, then Milton) and measure what it forgets.

Protocol (issue 9 item 5, evaluation.md §1.4). Phase ``j`` trains the model on domain ``j`` for
``steps`` optimizer steps; after every phase the validation loss on *every* domain is measured, which
fills the matrix ``L[j][i]`` (loss on domain ``i`` after phase ``j``, ``T`` phases). The model, its
AdamW moments and the outer-loop token count carry from one phase to the next, as a deployed model
that keeps training would; the learning-rate schedule restarts at every phase (linear warmup, then
cosine decay to 10 % over the phase's steps), because the cosine of phase 1 ends at 10 % of the peak
rate and the next domain would otherwise be learned at the floor rate (re-warming is the usual
recipe of continual pre-training).

Metrics, on losses (nats per token; lower is better). The accuracy definitions of Chaudhry et al.
(2018) and Lopez-Paz & Ranzato (2017) are applied to ``a = −L``:

- forgetting of an old domain ``i < T−1``: ``f_i = max_{l<T−1} a_{l,i} − a_{T−1,i}
  = L[T−1][i] − min_{l<T−1} L[l][i]`` — how much worse the final model is than the best earlier
  model on that domain (positive: forgotten);
- average forgetting: the mean of ``f_i`` over the old domains;
- backward transfer ``BWT = mean_{i<T−1} (a_{T−1,i} − a_{i,i}) = mean (L[i][i] − L[T−1][i])``
  (negative: later phases hurt the domains learned before).

``learn=False`` (``--no-learn``) freezes every in-context level during training *and* evaluation, so
"HOPE with its CMS frozen" is the same spec, initialisation and parameter count as HOPE with no
in-context commit anywhere (from a fresh state that is the static model, ``frequency: never``).

:func:`loss_by_position` is the test-time-learning probe: the next-token loss at every position of
long windows of a text, with the in-context levels learning or frozen, and no outer step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import NLGraphError
from ..io import atomic_write

__all__ = ["ContinualError", "forgetting", "backward_transfer", "continual_metrics", "accuracy_metrics",
           "mqar_phases", "run_continual",
           "loss_by_position", "evaluate_continual", "plot_phases", "DEFAULT_DOMAINS"]

DEFAULT_DOMAINS = ("shakespeare", "milton")


class ContinualError(NLGraphError):
    """The continual-learning benchmark cannot run (unknown domain, a corpus that is not an archive,
    a diverging phase)."""


# --------------------------------------------------------------------------- metrics


def _check_matrix(losses: Sequence[Sequence[float]]) -> int:
    t = len(losses)
    if t < 2 or any(len(row) != t for row in losses):
        raise ContinualError(f"the loss matrix must be T x T with T >= 2 (phase x domain), got "
                             f"{[len(r) for r in losses]}")
    return t


def forgetting(losses: Sequence[Sequence[float]]) -> list[float]:
    """Forgetting of every old domain: ``L[T−1][i] − min_{l<T−1} L[l][i]`` for ``i < T−1``, where
    ``losses[j][i]`` is the loss on domain ``i`` after phase ``j`` (positive: the final model is worse
    on domain ``i`` than the best model before the last phase)."""
    t = _check_matrix(losses)
    return [losses[t - 1][i] - min(losses[l][i] for l in range(t - 1)) for i in range(t - 1)]


def backward_transfer(losses: Sequence[Sequence[float]]) -> float:
    """``mean_{i<T−1} (L[i][i] − L[T−1][i])``: BWT on ``a = −L`` (negative: later phases raised the
    loss of the domains learned before)."""
    t = _check_matrix(losses)
    return sum(losses[i][i] - losses[t - 1][i] for i in range(t - 1)) / (t - 1)


def continual_metrics(losses: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``forgetting`` (per old domain), ``avg_forgetting``, ``bwt`` and ``final_avg_loss`` (mean
    loss over every domain after the last phase)."""
    f = forgetting(losses)
    return {"forgetting": f, "avg_forgetting": sum(f) / len(f), "bwt": backward_transfer(losses),
            "final_avg_loss": sum(losses[-1]) / len(losses[-1])}


# --------------------------------------------------------------------------- data


def _domain_ids(domains: Sequence[str], data: str | None, tokenizer) -> dict[str, tuple[Any, Any]]:
    """domain -> ``(train ids, validation ids)``, int64 arrays ``[N]``; every domain is read before
    any training, so a missing corpus or domain fails first."""
    import numpy as np

    from ..data import load_corpus
    from ..data.corpus import DOMAINS
    from ..errors import did_you_mean

    for d in domains:
        if d not in DOMAINS:
            raise ContinualError(f"unknown domain '{d}'{did_you_mean(d, DOMAINS)}; use a comma-separated "
                                 f"list of {', '.join(DOMAINS)}", path="--domains")
    if len(set(domains)) != len(domains) or len(domains) < 2:
        raise ContinualError(f"give at least two different domains, one per phase (got "
                             f"{','.join(domains)})", path="--domains")
    if data is not None and not str(data).endswith((".tar.gz", ".tgz", ".tar")):
        raise ContinualError("the continual benchmark reads its domains from the default corpus or an "
                             "archive with its layout (.tar.gz); a text file or folder has one domain",
                             file=str(data), path="--data")
    out = {}
    for d in domains:
        c = load_corpus(data, domain=d)
        out[d] = (np.asarray(tokenizer.encode(c.train_text), dtype=np.int64),
                  np.asarray(tokenizer.encode(c.val_text), dtype=np.int64))
    return out


def mqar_phases(domains: Sequence[str]) -> int | None:
    """``P`` when ``domains`` are the class-incremental MQAR phases ``mqar-1, ..., mqar-P`` (in that
    order), ``None`` when none is an MQAR phase; a mixture or a gap is a :class:`ContinualError`."""
    tagged = [d for d in domains if d.startswith("mqar")]
    if not tagged:
        return None
    want = [f"mqar-{i + 1}" for i in range(len(domains))]
    if list(domains) != want or len(domains) < 2:
        raise ContinualError(f"class-incremental MQAR runs its phases in order: --domains "
                             f"{','.join(want) if len(want) > 1 else 'mqar-1,mqar-2'} (got {','.join(domains)}); "
                             f"text domains and MQAR phases do not mix", path="--domains")
    return len(domains)


def _mqar_batches(settings: dict, *, phase: int, phases: int, batch: int, length: int, seed: int):
    """Training batches of MQAR phase ``phase``: fresh draws every step, from its own seed stream."""
    from ..data import get_task, step_seed

    task = get_task("mqar")
    return lambda step: task.generate(batch, seed=step_seed(seed + 1_000 * (phase + 1), step), length=length,
                                      phase=phase, phases=phases, **settings)


@torch.no_grad()
def _mqar_eval(model, settings: dict, *, phase: int, phases: int, batch: int, length: int, eval_batches: int,
               device) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on held-out draws of MQAR phase ``phase``: the cross-entropy
    and the token accuracy at the query positions."""
    from ..data import get_task, step_seed, token_accuracy
    from .loop import lm_loss
    from .tasks_eval import EVAL_SEED

    task = get_task("mqar")
    model.eval()
    losses, accs = [], []
    for i in range(eval_batches):
        x, y = task.generate(batch, seed=step_seed(EVAL_SEED + phase, i), length=length, phase=phase,
                             phases=phases, **settings)
        logits = model(x.to(device)).float()
        y = y.to(device)
        losses.append(float(lm_loss(logits, y)))
        acc = token_accuracy(logits, y)
        accs.append(float(acc[~torch.isnan(acc)].mean()))
    model.train()
    return sum(losses) / len(losses), sum(accs) / len(accs)


def accuracy_metrics(acc: Sequence[Sequence[float]]) -> dict[str, Any]:
    """On an accuracy matrix ``acc[j][i]`` (phase x domain, higher is better): ``acc_forgetting``
    per old domain (``max_{l<T−1} acc[l][i] − acc[T−1][i]``, positive: forgotten), its mean, the
    backward transfer ``acc_bwt`` (``mean (acc[T−1][i] − acc[i][i])``) and ``final_avg_acc``."""
    neg = [[-a for a in row] for row in acc]
    f = forgetting(neg)
    return {"acc_forgetting": f, "avg_acc_forgetting": sum(f) / len(f), "acc_bwt": backward_transfer(neg),
            "final_avg_acc": sum(acc[-1]) / len(acc[-1])}


# --------------------------------------------------------------------------- the phases


def _text_batches(ids, *, domain: str, phase: int, batch: int, length: int, seed: int):
    """Training batches of a text domain (a different order per phase: seed + phase)."""
    from ..data import TokenBatcher

    if len(ids) <= length + 1:
        raise ContinualError(f"the '{domain}' training text has {len(ids):,} tokens, too few for "
                             f"--length {length}; use a shorter --length", path="--length")
    batcher = TokenBatcher(ids, batch, length, seed=seed + phase)
    return lambda step: batcher.next()


def _train_phase(model, opt, multi, next_batch, *, phase: int, domain: str, steps: int, batch: int, length: int,
                 lr: float, warmup: int | None, clip: float, seed: int, device) -> list[float]:
    """``steps`` AdamW steps on ``next_batch(step) -> (x, y)`` with a fresh warmup + cosine; returns
    the losses."""
    from .loop import TrainConfig, lm_loss, lr_at

    sched = TrainConfig(steps=steps, lr=lr, warmup=warmup)
    losses = []
    model.train()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, sched)
        x, y = next_batch(s)
        x, y = x.to(device), y.to(device)
        loss = lm_loss(model(x), y)
        loss.backward()
        if multi.groups:
            multi.before_step(batch * length)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        v = float(loss.detach())
        if not (math.isfinite(v) and math.isfinite(float(gnorm))):
            raise ContinualError(f"phase {phase + 1} ({domain}), step {s + 1}: the loss is {v} and the "
                                 f"gradient norm {float(gnorm)}; lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(v)
    return losses


def _val_loss(model, ids, *, batch: int, length: int, eval_batches: int, device) -> float:
    from .evaluate import perplexity

    if len(ids) <= length + 1:
        raise ContinualError(f"a validation text has {len(ids):,} tokens, too few for --length {length}; "
                             f"use a shorter --length", path="--length")
    res = perplexity(model, ids, batch=batch, length=length, max_batches=eval_batches, device=device)
    model.train()
    return res["val_loss"]


def run_continual(spec: str, overrides: Sequence[str] = (), *, domains: Sequence[str] = DEFAULT_DOMAINS,
                  steps: int = 100, batch: int = 8, length: int = 128, lr: float = 3e-4,
                  warmup: int | None = None, weight_decay: float = 0.1, clip: float = 1.0,
                  eval_batches: int = 8, seed: int = 0, device: str | None = None, data: str | None = None,
                  tokenizer: str = "byte", learn: bool = True, out: str | None = None,
                  task_settings: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``spec`` (with ``overrides``) on ``domains`` one after the other, ``steps`` steps each,
    and evaluate every domain after every phase (see the module doc). With ``out``, each phase's
    model is saved as a run folder ``out/phase-<j>-<domain>`` (``nlgraph eval/sample`` read it).

    ``domains`` may instead be the class-incremental MQAR phases ``mqar-1, ..., mqar-P``: phase ``p``
    trains on MQAR whose keys and values come from its own slice of the vocabulary
    (:func:`nlgraph.data.mqar`'s ``phase``; ``task_settings`` such as ``num_kv_pairs`` and
    ``vocab_size`` apply to every phase), and every phase is re-tested on held-out draws after
    every phase: the loss at the query positions fills ``losses``, the token accuracy ``accuracy``
    (with :func:`accuracy_metrics`).

    Returns JSON-able results: ``losses`` (``[T][T]``, phase x domain), the metrics of
    :func:`continual_metrics`, per-phase ``train_loss`` (first and last step), ``params``,
    ``seconds``, and the settings.
    """
    from ..cms import MultiRateOuter
    from ..data import check_vocab, get_tokenizer
    from ..lower import build
    from ..spec.loader import dump_spec, load_spec, spec_hash
    from .checkpoint import save_checkpoint
    from .loop import TrainConfig, _config_json, param_groups

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    domains = list(domains)
    phases = mqar_phases(domains)
    settings = dict(task_settings or {})
    overrides = list(overrides)
    if phases is not None:
        from ..data import get_task

        get_task("mqar").settings(**settings)  # an unknown setting fails here, naming the choices
        if {"phase", "phases", "length"} & set(settings):
            raise ContinualError("the MQAR phases set phase, phases and length themselves (--length)",
                                 path="--task-setting")
        need = get_task("mqar").vocab_needed(**settings)
        if load_spec(spec, overrides).model.vocab < need:
            overrides.append(f"model.vocab={need}")
    spec_obj = load_spec(spec, overrides)
    spec_file = str(spec) if str(spec).endswith((".yaml", ".yml")) else None
    if phases is None:
        tok = get_tokenizer(tokenizer)
        check_vocab(spec_obj.model.vocab, tok, file=spec_file)
        ids = _domain_ids(domains, data, tok)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = build(spec_obj, device=dev)
    model.learn = learn
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    # `updates: outer_loop` levels: stepped once every C training tokens, across phases
    multi = MultiRateOuter(model)
    losses: list[list[float]] = []
    accuracy: list[list[float]] = []
    train_loss = []
    t0 = time.perf_counter()
    for j, dom in enumerate(domains):
        log(f"==> {spec_obj.name or spec}: phase {j + 1}/{len(domains)}, {steps} steps on {dom} "
            f"({batch}x{length}{'' if learn else ', in-context levels frozen'})")
        if phases is None:
            batches = _text_batches(ids[dom][0], domain=dom, phase=j, batch=batch, length=length, seed=seed)
        else:
            batches = _mqar_batches(settings, phase=j, phases=phases, batch=batch, length=length, seed=seed)
        tl = _train_phase(model, opt, multi, batches, phase=j, domain=dom, steps=steps, batch=batch,
                          length=length, lr=lr, warmup=warmup, clip=clip, seed=seed, device=dev)
        if phases is None:
            row = [_val_loss(model, ids[d][1], batch=batch, length=length, eval_batches=eval_batches,
                             device=dev) for d in domains]
        else:
            pairs = [_mqar_eval(model, settings, phase=i, phases=phases, batch=batch, length=length,
                                eval_batches=eval_batches, device=dev) for i in range(phases)]
            row = [p[0] for p in pairs]
            accuracy.append([p[1] for p in pairs])
            log("    accuracy " + ", ".join(f"{d} {a:.3f}" for d, a in zip(domains, accuracy[-1])))
        losses.append(row)
        train_loss.append({"first": tl[0], "last": tl[-1]})
        log("    val loss " + ", ".join(f"{d} {v:.4f}" for d, v in zip(domains, row)))
        if out is not None:
            where = ({"data": data, "domain": dom, "tokenizer": tokenizer} if phases is None else
                     {"task": "mqar", "task_settings": {**settings, "phase": j, "phases": phases}})
            cfg = TrainConfig(out=str(Path(out) / f"phase-{j + 1}-{dom}"), steps=steps * (j + 1), batch=batch,
                              length=length, lr=lr, warmup=warmup, weight_decay=weight_decay, clip=clip,
                              seed=seed, eval_batches=eval_batches, device=device, overrides=list(overrides),
                              **where)
            yaml = dump_spec(spec_obj)
            save_checkpoint(cfg.out, step=steps * (j + 1), model=model, optimizer=opt, spec_yaml=yaml,
                            spec_hash=spec_hash(spec_obj),
                            state={"tokens": steps * (j + 1) * batch * length, "config": _config_json(cfg),
                                   "continual": {"phase": j + 1, "domains": domains[: j + 1]}})
            atomic_write(Path(cfg.out) / "spec.yaml", yaml.encode())
    return {"spec": spec_obj.name or str(spec), "overrides": list(overrides), "params": params,
            "learn": learn, "domains": domains, "steps_per_phase": steps, "batch": batch, "length": length,
            "lr": lr, "seed": seed, "eval_batches": eval_batches, "losses": losses,
            **continual_metrics(losses), "train_loss": train_loss,
            **({"accuracy": accuracy, **accuracy_metrics(accuracy), "task_settings": settings} if phases else {}),
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- test-time learning


@torch.no_grad()
def loss_by_position(model, ids, *, length: int, windows: int, learn: bool, device) -> list[float]:
    """Next-token loss at every position of ``windows`` contiguous, non-overlapping windows of
    ``ids`` (the first ``windows * (length + 1)`` tokens), averaged over the windows: a list of
    ``length`` floats. Each window is a fresh sequence; no outer step is taken; ``learn`` switches
    the in-context levels' commits on or off (``model.stream(..., learn=...)``)."""
    import torch.nn.functional as F

    need = windows * (length + 1)
    if len(ids) < need:
        raise ContinualError(f"the text has {len(ids):,} tokens; {windows} windows of {length} need {need:,}; "
                             f"use fewer or shorter windows", path="--length")
    w = torch.as_tensor(ids[:need], dtype=torch.long).view(windows, length + 1).to(device)
    model.eval()
    logits, _ = model.stream(w[:, :-1], learn=learn)
    loss = F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")  # [W, T]
    return loss.mean(0).tolist()


# --------------------------------------------------------------------------- plot and CLI


def plot_phases(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss of every domain after every phase: one line per model and domain (colour:
    model, line style: domain)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    styles = ["o-", "s--", "^:", "d-."]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for m, res in enumerate(results):
        doms = res["domains"]
        xs = list(range(1, len(doms) + 1))
        for i, d in enumerate(doms):
            ax.plot(xs, [row[i] for row in res["losses"]], styles[i % len(styles)], color=f"C{m}", ms=5,
                    lw=1.2, label=f"{res.get('label', res['spec'])} · {d}")
    doms = results[0]["domains"]
    ax.set_xticks(range(1, len(doms) + 1), [f"after {j + 1}: {d}" for j, d in enumerate(doms)])
    ax.set_xlabel("training phase")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _parse_domains(text: str | None) -> list[str]:
    items = [t.strip() for t in (text or ",".join(DEFAULT_DOMAINS)).split(",") if t.strip()]
    return items


def evaluate_continual(args, table) -> dict[str, Any]:
    """``nlgraph eval SPEC --task continual``: the results of :func:`run_continual` with a table."""
    from .evaluate import is_run

    if is_run(args.target):
        raise ContinualError("--task continual trains a model through every phase; give a SPEC (library "
                             "name or YAML file), not a run folder", file=args.target)
    from .tasks_eval import _task_settings

    domains = _parse_domains(getattr(args, "domains", None))
    learn = not getattr(args, "no_learn", False)
    res = run_continual(args.target, args.overrides, domains=domains, steps=args.steps, batch=args.batch,
                        length=args.length, lr=args.lr, eval_batches=args.eval_batches, seed=args.seed,
                        device=args.device, data=args.data, tokenizer=args.tokenizer, learn=learn,
                        out=args.out, task_settings=_task_settings(args))
    header = ["after phase", *[f"{d} val loss" for d in domains]]
    rows = [[f"{j + 1} ({d})", *[f"{v:.4f}" for v in res["losses"][j]]] for j, d in enumerate(domains)]
    if "accuracy" in res:
        header += [f"{d} accuracy" for d in domains]
        rows = [r + [f"{a:.3f}" for a in res["accuracy"][j]] for j, r in enumerate(rows)]
    tbl = table(header, rows) + (
        f"\n\naverage forgetting {res['avg_forgetting']:+.4f} nats (final minus best earlier loss on the old "
        f"domains), BWT {res['bwt']:+.4f}, final mean loss {res['final_avg_loss']:.4f}; {res['params']:,} params")
    if "accuracy" in res:
        tbl += (f"\naccuracy: average forgetting {res['avg_acc_forgetting']:+.3f} (best earlier minus final on "
                f"the old phases), BWT {res['acc_bwt']:+.3f}, final mean accuracy {res['final_avg_acc']:.3f}")
    if args.plot:
        plot_phases([res], Path(args.plot), f"{res['spec']}: validation loss after each phase")
    return {"task": "continual", **res, "table": tbl}


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(payload, indent=1) + "\n").encode())
