"""The outer training loop: ``nlgraph train SPEC``.

AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast and per-block
``torch.compile`` on CUDA, validation every ``eval_every`` steps, ``metrics.jsonl`` and
``loss.png`` in the run folder, checkpoints (see :mod:`nlgraph.train.checkpoint`) that resume
exactly, SIGINT/SIGTERM handling, a clean stop on a non-finite loss or gradient naming the first
level whose output or state went non-finite, and data parallelism under ``torchrun`` (DDP).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import NLGraphError
from ..io import atomic_write
from .checkpoint import (
    CheckpointError,
    clear_run,
    existing_run,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    restore_optimizer,
    save_checkpoint,
    set_rng_state,
)

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "lr_at"]


class TrainError(NLGraphError):
    """Training could not start or had to stop (bad data, non-finite loss, wrong resume)."""


@dataclass
class TrainConfig:
    """Settings of one training run (the ``nlgraph train`` options)."""

    out: str = "runs/train"
    """Run folder: checkpoints, ``metrics.jsonl``, ``loss.png``, ``spec.yaml``."""
    steps: int = 1000
    """Optimizer steps in all (a resumed run continues up to this number)."""
    batch: int = 8
    """Global batch: sequences per step over all data-parallel ranks."""
    length: int = 256
    """Tokens per training sequence."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    warmup: int | None = None
    """Linear warmup steps (default: 10% of ``steps``, at most 200)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not on norms, biases, gates' biases or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    """Gradient-norm clipping threshold (0 turns clipping off)."""
    seed: int = 0
    eval_every: int = 100
    """Validate (and checkpoint) every this many steps, and at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    save_every: int | None = None
    """Checkpoint period in steps (default: ``eval_every``)."""
    keep: int = 1
    """Complete checkpoints kept in the run folder."""
    replace: bool = False
    """A fresh run into a folder that holds a previous run's checkpoints replaces them (for folders
    the calling command owns: the demo's, an evaluation's default); otherwise that is an error."""
    device: str | None = None
    """``cuda``, ``cpu``, ``cuda:1``...; default: CUDA when present."""
    compile: bool | None = None
    """Per-block ``torch.compile``; default: on for CUDA, off for CPU."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``."""
    cuda_graph: bool | None = None
    """Capture the forward and backward of a training step as CUDA graphs and replay them each
    step (no Python or launch overhead: what deep-memory levels, thousands of small kernels a step,
    are bound by). Default: on for an uncompiled model on one CUDA device, falling back to eager
    with a note when the model cannot be captured; ``True`` makes a failed capture an error."""
    recompute_blocks: bool = False
    """Keep only each block's inputs for the backward and run the block again there (activation
    checkpointing, :meth:`nlgraph.NLModel.recompute`): a step's activation memory falls to about
    one block's, for about one more forward of compute (more with in-context levels, whose commits
    run the blocks again). The same gradients. Turns the CUDA-graph default off (the recomputation
    reads and restores the RNG state, which a capture forbids)."""
    fsdp: bool = False
    """Under ``torchrun``: shard parameters, gradients and AdamW's state over the ranks with FSDP2
    (``torch.distributed.fsdp.fully_shard``, one group per block, then the root) instead of
    replicating them with DDP. Checkpoints keep the one-process layout (resumable with or without
    FSDP, on any number of ranks that divides ``batch``)."""
    task: str = "corpus"
    """``corpus`` (next-token prediction on text) or a synthetic task name (``nlgraph.data.TASKS``)."""
    data: str | None = None
    """A text file or folder instead of the default corpus."""
    domain: str = "shakespeare"
    """Domain of the default corpus (``shakespeare`` or ``milton``)."""
    tokenizer: str = "byte"
    task_settings: dict[str, Any] = field(default_factory=dict)
    """Settings of a synthetic task other than its length (``num_kv_pairs``, ``vocab_size``...)."""
    progress: bool | None = None
    """A rich progress bar (default: when standard error is a terminal); else a line per eval."""
    time_limit: float | None = None
    """Stop (with a checkpoint) after the first step that ends past this many seconds of training;
    that step is evaluated (``val_loss`` in its record) as the last step of a complete run is."""
    overrides: list[str] = field(default_factory=list)
    """The spec overrides the run was started with (recorded for ``nlgraph eval``)."""


@dataclass
class TrainResult:
    """What a run did: last step, losses, tokens/s, where it stopped and why."""

    out: Path
    step: int
    loss: float | None
    val_loss: float | None
    tokens: int
    tok_s: float
    stopped: str  # "done", "interrupted", "time limit"
    params: int


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warmup, then cosine decay
    from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    warm = _warmup(cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(cfg.steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _warmup(cfg: TrainConfig) -> int:
    return max(1, cfg.warmup if cfg.warmup is not None else min(200, cfg.steps // 10))


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device_hint: str | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return _Dist(rank, world, local)


def _agree(flags: list[bool], dist: _Dist, device: torch.device) -> list[bool]:
    """Each flag true on any rank, on every rank (collective): a stop that only one rank saw (a
    signal delivered between two ranks' checks, a time limit one rank passed first) must stop all
    of them after the same step, or the others would wait in the next all-reduce for ever."""
    if dist.world <= 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _row_share(rows: int, dist: _Dist) -> slice:
    """This rank's rows of a global batch of ``rows`` rows: ``rows // world`` each when it divides
    (as training splits ``--batch``), else as even as possible, earlier ranks one more."""
    base, extra = divmod(rows, dist.world)
    start = dist.rank * base + min(dist.rank, extra)
    return slice(start, start + base + (dist.rank < extra))


def _gather_rows(persistent: dict[str, dict], dist: _Dist, local: int) -> dict[str, dict]:
    """The persistent memory of all ranks' batch rows, concatenated in rank order (collective):
    what one process training the global batch would hold, ``[batch, ...]`` per tensor."""
    if dist.world <= 1:
        return persistent
    out: dict[str, dict] = {}
    for key in sorted(persistent):
        out[key] = {}
        for kind in ("values", "buffers"):
            part = {}
            for name in sorted(persistent[key][kind]):
                v = persistent[key][kind][name]
                if v.dim() and v.shape[0] == local:
                    parts = [torch.empty_like(v) for _ in range(dist.world)]
                    torch.distributed.all_gather(parts, v.contiguous())
                    v = torch.cat(parts)
                part[name] = v
            out[key][kind] = part
    return out


def _shard_rows(persistent: dict[str, dict], dist: _Dist, batch: int) -> dict[str, dict]:
    """This rank's rows of a persistent memory saved for the global ``batch`` (the inverse of
    :func:`_gather_rows`); tensors of another row count (one row, broadcast) stay as they are."""
    if dist.world <= 1:
        return persistent
    rows = _row_share(batch, dist)
    return {key: {kind: {n: (v[rows].clone() if v.dim() and v.shape[0] == batch else v)
                         for n, v in entry[kind].items()} for kind in ("values", "buffers")}
            for key, entry in persistent.items()}


# --------------------------------------------------------------------------- outer-loop levels


def _outer_state(multi: Any, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :class:`~nlgraph.cms.MultiRateOuter` holds between steps, by parameter name: the
    gradient sums not yet released (``[*param.shape]``, full tensors; sharded ones are gathered, a
    collective under FSDP) and the training tokens counted. Without it a resumed run would release
    them at other steps, and lose the held-back part of the period."""
    tensors, steps = {}, {}
    for name, p in model.named_parameters():
        acc = multi.acc.get(id(p))
        if acc is None:
            continue
        tensors[name] = (acc.full_tensor() if hasattr(acc, "full_tensor") else acc).detach().to("cpu")
        steps[name] = multi.steps[id(p)]
    return tensors, {"tokens": multi.tokens, "steps": steps}


def _load_outer(multi: Any, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                device: torch.device, file: str) -> None:
    """Restore what :func:`_outer_state` saved (on any number of ranks, with or without FSDP)."""
    params = dict(model.named_parameters())
    if set(tensors) - set(params) or set(meta["steps"]) != set(tensors):
        raise CheckpointError("the held-back outer-loop gradients name parameters this model lacks; resume "
                              "with the spec the run was trained with", file=file)
    multi.tokens = int(meta["tokens"])
    for name, t in tensors.items():
        p = params[name]
        t = t.to(device)
        if hasattr(p, "device_mesh"):  # an FSDP shard: keep this rank's part, sliced locally
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
        multi.acc[id(p)] = t
        multi.steps[id(p)] = int(meta["steps"][name])


# --------------------------------------------------------------------------- FSDP2


def _fsdp_shard(model: torch.nn.Module, device: torch.device, dist: _Dist) -> None:
    """Shard the parameters (and so the gradients and AdamW's moments) over the ranks with FSDP2:
    one group per block, gathered just before the block runs and freed after it, then the root's
    group (embedding, final norm, head). ``model`` stays the same object."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fsdp_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, aliases: dict[str, str]) -> tuple | None:
    """The sharded model's and optimizer's full state, gathered on rank 0's CPU in the layout of a
    one-process checkpoint (``(model_state, optimizer_state)`` for :func:`save_checkpoint`, AdamW
    state keyed by parameter index); ``None`` on the other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if torch.distributed.get_rank() != 0:
        return None
    tensors = {k: v.detach().contiguous() for k, v in msd.items() if k not in aliases}
    # the parameter order of the optimizer's groups is what Optimizer.state_dict numbers
    index = {fqn: i for i, fqn in enumerate(f for g in osd["param_groups"] for f in g["params"])}
    opt_tensors, scalars = flatten_optimizer_state({index[fqn]: st for fqn, st in osd["state"].items()})
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in osd["param_groups"]]
    return (tensors, aliases), (opt_tensors, {"param_groups": groups, "scalars": scalars})


def _fsdp_load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    """Load a one-process checkpoint's AdamW state (keyed by parameter index) into the optimizer of
    the sharded ``model``: every rank passes the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    state: dict[str, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        idx, key = name.split(".", 1)
        if not 0 <= int(idx) < len(fqns):
            raise CheckpointError(f"the optimizer state names parameter {idx} but the model has {len(fqns)}; "
                                  f"resume with the spec the run was trained with")
        state.setdefault(fqns[int(idx)], {})[key] = value
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in meta["param_groups"]]
    # broadcast from rank 0, then each rank keeps its shard: with every rank distributing its own
    # full copy instead (broadcast_from_rank0=False), torch 2.13 on CPU/gloo loaded wrong moments
    # for some parameters, differently from run to run (tests/train/test_distributed.py caught it)
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    # a parameter AdamW never stepped (an outer-loop level before its first period ends) has no
    # state in the checkpoint, as in one process; the loader's warm-up step gave it step 1 and
    # zero moments, which would change its first update's bias correction: drop them again
    for g in opt.param_groups:
        for p in g["params"]:
            if names[id(p)] not in state:
                opt.state.pop(p, None)


# --------------------------------------------------------------------------- data


class _Data:
    """Training batches and validation batches for the configured task, resumable."""

    def __init__(self, cfg: TrainConfig, vocab: int, device: torch.device, dist: _Dist, spec_file: str | None):
        self.cfg, self.device, self.dist = cfg, device, dist
        if cfg.batch % dist.world:
            raise TrainError(f"--batch {cfg.batch} is not divisible by the {dist.world} data-parallel "
                             f"ranks; use a multiple of {dist.world}")
        self.local_batch = cfg.batch // dist.world
        if cfg.task == "corpus":
            from ..data import TokenBatcher, check_vocab, get_tokenizer, load_corpus

            self.tokenizer = get_tokenizer(cfg.tokenizer)
            check_vocab(vocab, self.tokenizer, file=spec_file)
            corpus = load_corpus(cfg.data, domain=cfg.domain)
            self.corpus_name = corpus.name
            import numpy as np

            train_ids = np.asarray(self.tokenizer.encode(corpus.train_text), dtype=np.int64)
            self.val_ids = np.asarray(self.tokenizer.encode(corpus.val_text), dtype=np.int64)
            if len(train_ids) <= cfg.length + 1 or len(self.val_ids) <= cfg.length + 1:
                raise TrainError(f"the corpus '{corpus.name}' is too short for --length {cfg.length} "
                                 f"({len(train_ids):,} training and {len(self.val_ids):,} validation "
                                 f"tokens); use a shorter --length or more text")
            self.batcher = TokenBatcher(train_ids, self.local_batch, cfg.length, seed=cfg.seed,
                                        rank=dist.rank, world=dist.world)
            self.task = None
        else:
            from ..data import TaskBatcher, get_task

            task = get_task(cfg.task)
            settings = {"length": cfg.length, **cfg.task_settings}
            need = task.vocab_needed(**settings)
            if need > vocab:
                raise TrainError(f"task '{cfg.task}' uses {need} token ids but the spec's model.vocab is "
                                 f"{vocab}; add the override model.vocab={need}"
                                 + (f", or shrink the task's vocab with --task-setting vocab_size={vocab}"
                                    if "vocab_size" in task.defaults else ""), file=spec_file,
                                 path="model.vocab")
            self.task = task
            self.tokenizer = None
            self.corpus_name = cfg.task
            self.batcher = TaskBatcher(task, self.local_batch, seed=cfg.seed, rank=dist.rank,
                                       world=dist.world, **settings)
            self.settings = settings

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batcher.next()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"batcher": self.batcher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state["batcher"])

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows of each validation batch of ``--batch`` rows (the same batches on any
        number of ranks): ``x [b, T]``, ``y [b, T]``. A rank whose share of a short last batch is
        empty gets one placeholder row with every target ignored (``-100``): under FSDP every rank
        must take part in every forward."""
        if self.task is None:
            from ..data import val_batches

            batches = val_batches(self.val_ids, self.cfg.batch, self.cfg.length, self.cfg.eval_batches)
        else:
            from ..data import step_seed

            # held-out draws: seeds no training step uses
            batches = (self.task.generate(self.cfg.batch, seed=step_seed(self.cfg.seed + 7_777_777, i),
                                          **self.settings) for i in range(self.cfg.eval_batches))
        for x, y in batches:
            rows = _row_share(x.shape[0], self.dist)
            if rows.start == rows.stop:
                x, y = x[:1], torch.full_like(y[:1], -100)
            else:
                x, y = x[rows], y[rows]
            yield x.to(self.device), y.to(self.device)


# --------------------------------------------------------------------------- helpers


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (and higher), none on vectors/scalars and embeddings."""
    decay, no_decay = [], []
    embed_ids = {id(p) for n, p in model.named_parameters() if n.startswith("embed.")}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_compile(device: torch.device, cfg: TrainConfig) -> bool:
    """Whether training compiles the blocks when ``cfg.compile`` is not given: on CUDA, one process
    or DDP (FSDP2-sharded blocks run eagerly)."""
    return device.type == "cuda" and not cfg.fsdp


def is_compile_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from torch.compile (dynamo, AOT autograd, inductor) rather than the model."""
    return any(getattr(t, "__module__", "").startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))
               for t in type(e).__mro__[:-1])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over scored positions (targets ``-100`` are ignored).
    ``logits [B, T, V]``, ``targets [B, T]``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _finite_tree(obj: Any) -> bool:
    if torch.is_tensor(obj):
        return obj.is_floating_point() is False or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite_tree(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite_tree(v) for v in obj)
    return True


class _LossStep(torch.nn.Module):
    """The loss of one training batch, the unit a CUDA graph captures."""

    def __init__(self, model: torch.nn.Module, autocast: Any) -> None:
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        return lm_loss(logits, y)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``auto`` resolved as training runs it: ``bf16`` (autocast) on CUDA,
    ``fp32`` elsewhere; any other value as given."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def graph_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.nn.Module:
    """``step(x, y) -> loss`` whose forward and backward replay CUDA graphs captured on ``x [B, T]``,
    ``y [B, T]``: each call copies its batch into the captured inputs, and ``loss.backward()``
    accumulates every parameter's gradient into ``.grad`` as eager autograd does. Autocast runs
    with its cast cache off, which capture requires. Raises whatever capture raises (an operation
    that synchronises with the host, a shape that changes)."""
    def autocast():
        if precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return nullcontext()

    # one warm-up pass (the default three would triple the start of a slow model's run)
    return torch.cuda.make_graphed_callables(_LossStep(model, autocast), (x, y), num_warmup_iters=1)


def locate_nonfinite(model: torch.nn.Module, tokens: torch.Tensor, autocast: Any) -> str | None:
    """Run ``model`` eagerly on ``tokens`` and name the first module (in execution order, innermost
    first) whose output or returned state holds a non-finite value; ``None`` if all is finite."""
    found: list[str] = []
    hooks = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, _inp, out):
        if not found and not _finite_tree(out):
            found.append(names.get(mod, type(mod).__name__))

    for m in model.modules():
        hooks.append(m.register_forward_hook(hook))
    compiled = getattr(model, "_compiled", None)
    try:
        if compiled is not None:
            model._compiled = None
        with torch.no_grad(), autocast():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
        if compiled is not None:
            model._compiled = compiled
    if not found:
        return None
    return _describe_module(found[0])


def _describe_module(qualname: str) -> str:
    parts = qualname.split(".")
    if len(parts) >= 4 and parts[0] == "blocks" and parts[2] == "entries":
        rest = ".".join(parts[4:])
        return f"block {parts[1]}, level '{parts[3]}'" + (f" (module {rest})" if rest else "")
    return f"module '{qualname}'"


def moving_mean(values: list[float], k: int) -> list[float]:
    """Trailing mean over up to ``k`` values at each position (the loss curves' smoothing)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def _plot(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [m["step"] for m in metrics if "loss" in m]
    loss = [m["loss"] for m in metrics if "loss" in m]
    vsteps = [m["step"] for m in metrics if "val_loss" in m]
    vloss = [m["val_loss"] for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if loss:
        ax.plot(steps, loss, lw=0.8, alpha=0.45, label="train (per step)")
        k = max(1, len(loss) // 50)
        if k > 1:
            ax.plot(steps, moving_mean(loss, k), lw=1.4, label=f"train ({k}-step mean)")
    if vloss:
        ax.plot(vsteps, vloss, "o-", lw=1.4, ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png")

    atomic_write(path, write)
    plt.close(fig)


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Progress:
    """A rich progress bar on a terminal; plain lines otherwise (CI logs, pipes)."""

    def __init__(self, enabled: bool | None, total: int, start: int, main: bool) -> None:
        self.main = main
        self.total = total
        self.rich = main and (sys.stderr.isatty() if enabled is None else enabled)
        self.bar = None
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def line(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- the loop


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= upto:
            out.append(rec)
    return out


def train(spec: Any, cfg: TrainConfig, *, resume: bool = False,
          on_step: Callable[[int, float, torch.nn.Module], None] | None = None) -> TrainResult:
    """Train ``spec`` (a :class:`~nlgraph.Spec`, file, library name or YAML text, with
    ``cfg.overrides`` applied) with the outer optimizer; see :class:`TrainConfig`.

    With ``resume``, continue from the run folder's latest checkpoint: the spec must hash to the
    checkpoint's (pass ``spec=None`` to take the checkpoint's own), and the losses of every later
    step equal those of an uninterrupted run (on CPU, bit for bit).

    ``on_step(step, loss, model)`` is called after every optimizer step (tests use it to interrupt).
    Raises :class:`TrainError` / :class:`~nlgraph.train.checkpoint.CheckpointError` for bad input
    and non-finite losses; the last good checkpoint is never touched by a failing run.
    """
    from ..graph import build_graph
    from ..lower import build
    from ..spec.loader import dump_spec, load_spec, spec_hash

    dist = _init_dist(cfg.device)
    out = Path(cfg.out)
    ckpt = None
    if resume:
        if latest_checkpoint(out) is None:
            raise TrainError(f"--resume: no checkpoint in {out} (no latest.json); start without --resume",
                             file=str(out))
        ckpt = load_checkpoint(out)
    else:
        found = existing_run(out)
        if found is not None and not cfg.replace:
            raise TrainError(f"this folder already holds a run ({found}); continue it with --resume, or "
                             f"train into another --out (nothing was changed)", file=str(out))
    if cfg.fsdp and dist.world <= 1:
        raise TrainError("--fsdp shards the model over torchrun's processes; start the run with "
                         "`torchrun --nproc_per_node N -m nlgraph train ... --fsdp` (N >= 2), or drop --fsdp")
    if ckpt is not None:
        _check_resume_batch(cfg, ckpt, dist, out)
    if spec is None:
        if ckpt is None:
            raise TrainError("no spec given and nothing to resume")
        spec_obj = load_spec(ckpt.spec_yaml)
        spec_file = str(ckpt.path / "spec.yaml")
    else:
        spec_obj = load_spec(spec, cfg.overrides)
        spec_file = str(spec) if isinstance(spec, (str, os.PathLike)) and "\n" not in str(spec) else None
    build_graph(spec_obj)
    shash = spec_hash(spec_obj)
    if ckpt is not None and ckpt.state["spec_hash"] != shash:
        raise CheckpointError(f"the checkpoint was trained with another spec (hash "
                              f"{ckpt.state['spec_hash']}, this spec {shash}); resume with the same spec "
                              f"and overrides (the run's own is {out / 'spec.yaml'})",
                              file=str(ckpt.path / "state.json"))

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    precision = resolve_precision(cfg.precision, device)
    if precision not in ("bf16", "fp32"):
        raise TrainError(f"--precision {cfg.precision}: choose auto, bf16 or fp32")

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    from ..limits import check_model_size
    from ..spec.loader import current_options

    # weights, gradients, AdamW's two moments and an activation estimate, before anything is allocated
    check_model_size(spec_obj, device=device, dtype_bytes=4, batch=max(cfg.batch // dist.world, 1),
                     length=cfg.length, training=True, optimizer_states=2, limits=current_options().limits)
    if cfg.fsdp and cfg.cuda_graph:
        raise TrainError("--cuda-graph needs one CUDA device; --fsdp runs over several ranks: drop one of them")
    if cfg.recompute_blocks and cfg.cuda_graph:
        raise TrainError("--recompute-blocks reads and restores the RNG state in the backward, which a CUDA graph "
                         "capture forbids; drop --cuda-graph (or --recompute-blocks)")
    if cfg.recompute_blocks and cfg.fsdp:
        raise TrainError("--recompute-blocks with --fsdp is untested: keep one of them (DDP, without --fsdp, "
                         "takes --recompute-blocks)")
    if cfg.fsdp and cfg.compile:
        # per-block torch.compile of FSDP2-sharded blocks is untested here: refused, not guessed
        raise TrainError("--fsdp runs the blocks eagerly; train it with --no-compile")
    torch.manual_seed(cfg.seed)
    model = build(spec_obj, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    data = _Data(cfg, spec_obj.model.vocab, device, dist, spec_file)
    start = 0
    tokens_seen = 0
    if ckpt is not None:
        # into the whole model, before any sharding: the checkpoint holds full tensors
        load_model_state(model, ckpt)
    aliases = {}
    if cfg.fsdp:
        from .checkpoint import tensor_aliases

        aliases = tensor_aliases(model)
        _fsdp_shard(model, device, dist)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=device.type == "cuda")
    if ckpt is not None:
        if ckpt.optimizer:
            if cfg.fsdp:
                _fsdp_load_optimizer(model, opt, ckpt.optimizer, ckpt.state["optimizer"])
            else:
                restore_optimizer(opt, ckpt.optimizer, ckpt.state["optimizer"])
        # the position is a step counter of global batches: the same on any number of ranks
        data.load_state_dict(ckpt.state["data"])
        start = ckpt.step
        tokens_seen = int(ckpt.state.get("tokens", 0))
        if (out / "memory.safetensors").is_file():
            model.load_memory(out / "memory.safetensors")
            # saved for the global batch (all ranks' rows): this rank takes its own
            model._persistent = _shard_rows(model._persistent, dist, cfg.batch)
        # rank 0's states, on every rank: the ranks drew the same numbers, as one process does
        set_rng_state(ckpt.state["rng"])
    if start >= cfg.steps and dist.main:
        print(f"nothing to do: the checkpoint is at step {start} and --steps is {cfg.steps}", file=sys.stderr)

    use_compile = cfg.compile if cfg.compile is not None else default_compile(device, cfg)
    if use_compile:
        model.compile_blocks()
    model.recompute(cfg.recompute_blocks)
    # CUDA graphs by default on one GPU, around compiled blocks too: a compiled Gated DeltaNet step
    # was bound by launching its kernels (44.4 ms a step, 10.6 ms replayed; docs/benchmarks.md)
    # A `lifetime: persistent` level carries its state from one batch into the next in Python
    # (model._persistent); a replayed graph would read the state it captured at every step
    carries = bool(model._carried) or any(s.module.persistent for s in model._slots)
    use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else (
        device.type == "cuda" and dist.world == 1 and not carries and not cfg.recompute_blocks)
    if use_graph and carries:
        raise TrainError("--cuda-graph: this spec has `lifetime: persistent` levels, whose memory carries "
                         "from batch to batch outside the graph; train without --cuda-graph", file=spec_file)
    if use_graph and (device.type != "cuda" or dist.world > 1):
        raise TrainError("--cuda-graph needs one CUDA device (not under torchrun); train without it")
    runner: torch.nn.Module = model
    if dist.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    spec_yaml = dump_spec(spec_obj)
    metrics_path = out / "metrics.jsonl"
    if ckpt is None and cfg.replace and dist.main:
        # only now, with the spec, data and model built: a run that fails before this point leaves
        # the previous one as it was (a failure after it, in the first steps, does not)
        clear_run(out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "spec.yaml", spec_yaml.encode())
        metrics = _read_metrics(metrics_path, start) if ckpt is not None else []
        # a resumed run drops what was logged after its checkpoint: the steps are redone
        atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics).encode())
    else:
        metrics = []
    title = f"{spec_obj.name or 'spec'} on {data.corpus_name} ({n_params / 1e6:.2f}M params)"

    def evaluate() -> float:
        """Validation loss over ``--batch``-row batches, each rank scoring its rows (collective)."""
        model.eval()
        # validation reads the persistent memory but does not replace training's: its rows are
        # the training batch's (per rank), which the next step and the checkpoint continue
        kept = dict(getattr(model, "_persistent", {}))
        total, count = 0.0, 0
        try:
            with torch.no_grad(), autocast():
                for x, y in data.val_batches():
                    logits = model(x)
                    n = int((y != -100).sum())
                    if n:  # a placeholder row (nothing scored) would add 0 * nan
                        total += float(lm_loss(logits, y)) * n
                        count += n
        finally:
            if hasattr(model, "_persistent"):
                model._persistent = kept
        model.train()
        if dist.world > 1:
            t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        return total / max(count, 1)

    def checkpoint(step: int) -> None:
        if getattr(model, "_persistent", None):
            # `lifetime: persistent` levels: what they carry into the next sequence, every rank's
            # rows, so that any number of ranks can resume it
            memory = _gather_rows(model._persistent, dist, data.local_batch)
            if dist.main:
                local, model._persistent = model._persistent, memory
                try:
                    model.save_memory(out / "memory.safetensors")
                finally:
                    model._persistent = local
        full = _fsdp_full_state(model, opt, aliases) if cfg.fsdp else None
        # under FSDP every rank gathers its shards; under DDP the sums are alike, rank 0's suffice
        outer = _outer_state(multi, model) if multi.groups and (cfg.fsdp or dist.main) else None
        if dist.main:
            save_checkpoint(out, step=step, model=model, optimizer=opt, spec_yaml=spec_yaml, spec_hash=shash,
                            state={"tokens": tokens_seen, "data": data.state_dict(), "config": _config_json(cfg),
                                   "world": dist.world, "fsdp": cfg.fsdp,
                                   **({"outer": outer[1]} if outer else {})}, keep=cfg.keep,
                            model_state=full[0] if full else None, optimizer_state=full[1] if full else None,
                            extra={"outer.safetensors": outer[0]} if outer else None)
        if dist.world > 1:
            torch.distributed.barrier()

    save_every = cfg.save_every or cfg.eval_every
    progress = _Progress(cfg.progress, cfg.steps, start, dist.main)
    if device.type == "cuda":  # a faster form a level does not get here, and why (a kernel switched off ...)
        for key, form, why in model.plan.declined():
            progress.line(f"note: level '{key}' does not run in form '{form}': {why}")
    last_loss = val_loss = None
    tok_s = 0.0
    stopped = "done"
    step = start
    log = open(metrics_path, "a") if dist.main else None
    t_run = time.perf_counter()
    tokens_run = 0
    model.train()
    graphed = None
    from ..cms import MultiRateOuter

    # `updates: outer_loop` levels: the optimizer moves them once every C training tokens
    multi = MultiRateOuter(model)
    if ckpt is not None and multi.groups:
        if "outer" in ckpt.state:
            _load_outer(multi, model, ckpt.extra.get("outer.safetensors", {}), ckpt.state["outer"], device,
                        str(ckpt.path / "state.json"))
        else:  # a checkpoint from before the held-back gradients were saved: the count at least
            multi.tokens = tokens_seen

    compile_checked = not use_compile  # the first compiled step has run (or nothing is compiled)

    def compiled_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The first compiled forward and backward; a compiler failure falls back to eager with a
        note when compiling was the default, and is one error when it was asked for."""
        nonlocal compile_checked
        try:
            loss = step_loss(x, y)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - only torch.compile's own failures are caught below
            if not is_compile_failure(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            if cfg.compile:
                raise TrainError(f"torch.compile failed on this model ({type(e).__name__}: {first}); train "
                                 f"it eagerly (--no-compile)", file=spec_file) from e
            model.eager()
            opt.zero_grad(set_to_none=True)
            progress.line(f"note: torch.compile failed on this model ({type(e).__name__}: {first}); "
                          f"training eagerly")
            loss = step_loss(x, y)
            loss.backward()
        compile_checked = True
        return loss

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal graphed, use_graph
        if use_graph and graphed is None:
            try:
                graphed = graph_step(model, x, y, precision)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager (or is reported)
                if cfg.cuda_graph:
                    raise TrainError(f"--cuda-graph: this model cannot be captured as a CUDA graph "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                     f"train without --cuda-graph", file=spec_file) from e
                use_graph = False
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                progress.line(f"note: CUDA graph capture failed ({type(e).__name__}: {first}); training without "
                              "CUDA graphs")
                torch.cuda.synchronize(device)
        if graphed is not None:
            return graphed(x, y)
        with autocast():
            logits = runner(x)
        return lm_loss(logits, y)

    try:
        with _Stop() as stop:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = data.next()
                t0 = time.perf_counter()
                if compile_checked:
                    loss = step_loss(x, y)
                    loss.backward()
                else:
                    loss = compiled_step(x, y)
                if multi.groups:
                    multi.before_step(cfg.batch * cfg.length)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
                loss_v = float(loss.detach())
                if dist.world > 1:
                    t = torch.tensor([loss_v], device=device)
                    torch.distributed.all_reduce(t)
                    loss_v = float(t) / dist.world
                if not math.isfinite(loss_v) or not math.isfinite(float(gnorm)):
                    what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                    where = locate_nonfinite(model, x, autocast)
                    last = latest_checkpoint(out)
                    keep_note = (f"the last good checkpoint ({last.name}) is kept" if last is not None
                                 else "no checkpoint was written yet")
                    raise TrainError(f"step {step + 1}: the {what} is {loss_v if what == 'loss' else float(gnorm)}"
                                     + (f"; first non-finite output: {where}" if where else "")
                                     + f"; {keep_note}. Lower --lr, or check the spec's inner rates "
                                       f"and initial states", file=spec_file)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step += 1
                n_tok = cfg.batch * cfg.length
                tokens_seen += n_tok
                tokens_run += n_tok
                tok_s = n_tok / max(dt, 1e-9)
                last_loss = loss_v
                rec: dict[str, Any] = {"step": step, "loss": round(loss_v, 6), "tokens": tokens_seen,
                                       "tok_s": round(tok_s, 1), "lr": lr, "grad_norm": round(float(gnorm), 4)}
                # decided before the step is logged (every rank agrees), so that a run the time limit
                # stops is evaluated where it stopped, in its last record, like a run that completes
                over_time = False
                if cfg.time_limit is not None and step < cfg.steps:
                    (over_time,) = _agree([time.perf_counter() - t_run > cfg.time_limit], dist, device)
                if step % cfg.eval_every == 0 or step == cfg.steps or over_time:
                    val_loss = evaluate()
                    rec["val_loss"] = round(val_loss, 6)
                if dist.main:
                    metrics.append(rec)
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    info = f"loss {loss_v:.4f} · {tok_s:,.0f} tok/s"
                    progress.update(step, info)
                    if "val_loss" in rec:
                        progress.line(f"step {step}/{cfg.steps}  loss {loss_v:.4f}  val_loss {val_loss:.4f}  "
                                      f"{tok_s:,.0f} tok/s  lr {lr:.2e}")
                        _plot(metrics, out / "loss.png", title)
                if step % save_every == 0 or step == cfg.steps:
                    checkpoint(step)
                if on_step is not None:
                    on_step(step, loss_v, model)
                (signalled,) = _agree([stop.signal is not None], dist, device)
                if over_time:
                    if step % save_every:
                        checkpoint(step)
                    stopped = "time limit"
                    progress.line(f"time limit of {cfg.time_limit:.0f} s reached at step {step}; checkpoint "
                                  f"saved in {out}; continue with --resume")
                    break
                if signalled:
                    if step % save_every and step != cfg.steps:
                        checkpoint(step)
                    stopped = "interrupted"
                    by = signal.Signals(stop.signal).name if stop.signal is not None else "a signal to another rank"
                    progress.line(f"stopped by {by} at step {step}; "
                                  f"checkpoint saved in {out}; continue with --resume")
                    break
    finally:
        progress.close()
        if log is not None:
            log.close()
    elapsed = time.perf_counter() - t_run
    result = TrainResult(out, step, last_loss, val_loss, tokens_seen,
                         tokens_run / elapsed if elapsed > 0 and tokens_run else tok_s, stopped, n_params)
    return result


def _check_resume_batch(cfg: TrainConfig, ckpt: Any, dist: _Dist, out: Path) -> None:
    """A checkpoint resumes on any number of ranks that splits its global batch: the data position
    counts global batches, and weights, AdamW's state and the RNG states are the same on every
    rank. Another ``--batch`` would draw other batches; refuse both with the flag to change."""
    saved = ckpt.state.get("config", {}).get("batch")
    ranks = ckpt.state.get("world", 1)
    if isinstance(saved, int) and saved != cfg.batch:
        raise TrainError(f"--batch {cfg.batch}: the checkpoint was trained with a global batch of {saved} "
                         f"(on {ranks} process{'es' if ranks != 1 else ''}); resume with --batch {saved}, "
                         f"on any number of processes that divides it", file=str(out))
    if cfg.batch % dist.world:
        raise TrainError(f"--batch {cfg.batch} (the checkpoint's global batch) does not split over "
                         f"{dist.world} processes; resume with a torchrun --nproc_per_node that divides "
                         f"{cfg.batch}", file=str(out))


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["betas"] = list(cfg.betas)
    return d
