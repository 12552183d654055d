"""The ``train``, ``eval``, ``sample`` and ``demo`` sub-commands (registered by :mod:`nlgraph.cli`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import NLGraphError
from ..io import atomic_write

__all__ = ["add_parsers", "HANDLERS"]


def _positive(name: str, cast=int):
    """An argparse type: a positive finite ``cast`` (int: at least 1), with an error naming ``name``."""
    kind = "an integer" if cast is int else "a number"

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {text}")
        return v

    return parse


def _positive_float(name: str):
    return _positive(name, float)


def _common_run_args(p: argparse.ArgumentParser, *, steps: int, batch: int, length: int) -> None:
    p.add_argument("--steps", type=_positive("--steps"), default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch", type=_positive("--batch"), default=batch,
                   help=f"global batch in sequences (default {batch}; split over torchrun ranks)")
    p.add_argument("--length", type=_positive("--length"), default=length, help=f"tokens per sequence (default {length})")
    p.add_argument("--lr", type=_positive_float("--lr"), default=3e-4, help="peak AdamW learning rate (default 3e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (default on CUDA: per-block torch.compile)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's forward and backward as CUDA graphs (default: on for one GPU, "
                        "compiled or not; without graphs if capture fails)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="a text file or folder instead of the default corpus (also data=PATH)")
    p.add_argument("--domain", choices=("shakespeare", "milton"), default="shakespeare",
                   help="domain of the default corpus (default shakespeare)")
    p.add_argument("--tokenizer", choices=("byte", "gpt2"), default="byte", help="tokenizer (default byte)")


def add_parsers(sub) -> None:
    """Add ``train``, ``eval``, ``sample`` and ``demo`` to the CLI's sub-parsers."""
    from ..cli import _add_spec_args

    p = sub.add_parser(
        "train", help="train a spec's model on the corpus or a synthetic task",
        description="Train with AdamW (warmup + cosine), gradient clipping, bf16 autocast and per-block "
        "torch.compile on CUDA. Writes DIR/metrics.jsonl, DIR/loss.png and safetensors checkpoints; "
        "--resume continues exactly. SIGINT/SIGTERM save a checkpoint and stop. Under torchrun it "
        "trains data-parallel (DDP). data=PATH (an override-style argument) is the same as --data.")
    _add_spec_args(p)
    _common_run_args(p, steps=1000, batch=8, length=256)
    p.add_argument("--out", metavar="DIR", default=None, help="run folder (default runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue from DIR's latest checkpoint")
    p.add_argument("--recompute-blocks", action="store_true",
                   help="keep only each block's inputs for the backward and run the block again there "
                        "(activation checkpointing): less memory, about one more forward of compute (more "
                        "with in-context CMS levels)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state over the ranks "
                        "(FSDP2) instead of replicating them (DDP); eager blocks")
    p.add_argument("--time-limit", type=_positive_float("--time-limit"), default=None, metavar="SECONDS",
                   help="stop with a checkpoint (and an evaluation of that step) once this much training "
                        "time has passed")
    p.add_argument("--eval-every", type=_positive("--eval-every"), default=100,
                   help="validate and checkpoint every N steps (default 100)")
    p.add_argument("--eval-batches", type=_positive("--eval-batches"), default=8, help="validation batches (default 8)")
    p.add_argument("--save-every", type=_positive("--save-every"), default=None,
                   help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--keep", type=_positive("--keep"), default=1, help="checkpoints kept (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps, at most 200)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off; default 1.0)")
    p.add_argument("--task", default="corpus", help="corpus (default) or a synthetic task: mqar, niah, "
                   "parity, ... (see `nlgraph eval --help`)")
    p.add_argument("--task-setting", action="append", metavar="KEY=VALUE", default=[],
                   help="a setting of the synthetic task, e.g. num_kv_pairs=16 (repeatable)")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print N sampled tokens at the end")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or a spec: perplexity or a synthetic task",
        description="--task ppl: validation loss, perplexity and bits per byte of a trained run "
        "(CHECKPOINT_DIR). --task mqar|niah|formal: accuracy on the task; given a SPEC the model "
        "is first trained on the task from scratch (as Zoology does) with the options below. "
        "--task continual: train a SPEC on each of --domains in turn and report every domain's "
        "validation loss after each phase, forgetting and backward transfer.")
    p.add_argument("target", metavar="CHECKPOINT_DIR|SPEC")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="spec overrides (with a SPEC)")
    p.add_argument("--task", default="ppl", help="ppl (default), mqar, niah, formal, continual")
    p.add_argument("--domains", metavar="D1,D2,...", default="shakespeare,milton",
                   help="--task continual: the domains trained one after the other, --steps each "
                        "(default shakespeare,milton)")
    _common_run_args(p, steps=300, batch=32, length=256)
    p.add_argument("--eval-batches", type=_positive("--eval-batches"), default=16, help="evaluation batches (default 16)")
    p.add_argument("--out", metavar="DIR", default=None, help="run folder for training a SPEC (default: runs/eval-<spec>-<task>)")
    p.add_argument("--task-setting", action="append", metavar="KEY=VALUE", default=[],
                   help="a setting of the task, e.g. num_kv_pairs=16 vocab_size=512 (repeatable)")
    p.add_argument("--eval-lengths", metavar="L1,L2,...", default=None,
                   help="evaluate at these sequence lengths (default: the training length)")
    p.add_argument("--time-limit", type=_positive_float("--time-limit"), default=None, metavar="SECONDS",
                   help="training a SPEC: stop each training run after this much time and evaluate what "
                        "was trained (the JSON records the step reached)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE", default=None, help="write a PNG (accuracy vs length for mqar/niah)")
    p.add_argument("--no-learn", action="store_true", help="freeze every in-context level (a CMS with a finite period) at its trained "
                        "parameters: the static model, no test-time learning")

    p = sub.add_parser("sample", help="generate text from a trained run",
                       description="Continue a prompt with a trained model, token by token through "
                       "the model's streaming state.")
    p.add_argument("target", metavar="CHECKPOINT_DIR")
    p.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    p.add_argument("--tokens", type=_positive("--tokens"), default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-learn", action="store_true", help="freeze every in-context level (a CMS with a finite period) at its trained "
                        "parameters: the static model, no test-time learning")

    p = sub.add_parser("demo", help="train a tiny HOPE and a tiny Transformer++ and compare them",
                       description="The README's demo: train a small HOPE and a Transformer++ of about "
                       "the same size on the default corpus, print both validation losses side by side, "
                       "sample from each and draw both loss curves (runs/demo/loss.png).")
    p.add_argument("--steps", type=_positive("--steps"), default=150, help="steps per model (default 150)")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--device", default=None)
    p.add_argument("--specs", nargs=2, metavar=("A", "B"), default=("hope", "transformer_pp"),
                   help="the two specs (default hope transformer_pp)")


def _split_data_override(args) -> None:
    """``data=PATH`` among the overrides is the same as ``--data PATH``."""
    rest = []
    for ov in getattr(args, "overrides", []) or []:
        if ov.startswith("data="):
            args.data = ov.split("=", 1)[1]
        else:
            rest.append(ov)
    args.overrides = rest


def _config(args, out: str):
    from .loop import TrainConfig
    from .tasks_eval import _task_settings

    return TrainConfig(task_settings=_task_settings(args),
        out=out, steps=args.steps, batch=args.batch, length=args.length, lr=args.lr, seed=args.seed,
        device=args.device, compile=False if args.no_compile else None, precision=args.precision,
        cuda_graph=getattr(args, "cuda_graph", None),
        data=args.data, domain=args.domain, tokenizer=args.tokenizer, overrides=list(args.overrides),
        **{k: getattr(args, k) for k in ("eval_every", "eval_batches", "save_every", "keep", "warmup",
                                          "weight_decay", "clip", "task", "progress", "time_limit", "fsdp", "recompute_blocks")
                                          if hasattr(args, k)})


def _spec_name(spec: str) -> str:
    return Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec.replace("/", "_")


def cmd_train(args) -> int:
    from .loop import train

    _split_data_override(args)
    out = args.out or f"runs/{_spec_name(args.spec)}"
    cfg = _config(args, out)
    res = train(args.spec, cfg, resume=args.resume)
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return 0
    val = f"val_loss {res.val_loss:.4f} (ppl {math.exp(min(res.val_loss, 50)):.2f})" if res.val_loss is not None else "no validation"
    loss = f"loss {res.loss:.4f}" if res.loss is not None else "no step run"
    print(f"{res.stopped}: {_spec_name(args.spec)}, step {res.step}/{cfg.steps}, {loss}, {val}, "
          f"{res.tok_s:,.0f} tok/s, {res.params:,} params -> {res.out}")
    if args.sample and res.step > 0:
        print(_sample_text(Path(res.out), "\n", args.sample, 0.8, 50, 0, args.device))
    return 0


def _load_run(target: str, device: str | None, learn: bool = True):
    """The trained model of a run folder; ``learn=False`` freezes its in-context levels."""
    import torch

    from ..lower import build
    from ..spec.loader import load_spec
    from .checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(target)
    spec = load_spec(ckpt.spec_yaml)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build(spec, device=dev)
    load_model_state(model, ckpt)
    model.learn = learn
    return model, ckpt, spec, dev


def _sample_text(target: Path, prompt: str, tokens: int, temperature: float, top_k: int, seed: int,
                 device: str | None, learn: bool = True) -> str:
    import torch

    from ..data import get_tokenizer
    from .sample import generate

    model, ckpt, spec, dev = _load_run(str(target), device, learn)
    cfg = ckpt.state.get("config", {})
    if cfg.get("task", "corpus") != "corpus":
        raise NLGraphError(f"this run was trained on the synthetic task '{cfg.get('task')}', not text; "
                           f"nothing to sample", file=str(target))
    tok = get_tokenizer(cfg.get("tokenizer", "byte"))
    ids = [int(i) for i in tok.encode(prompt)] or [0]
    x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
    out = generate(model, x, tokens, temperature=temperature, top_k=top_k, seed=seed)
    return prompt + tok.decode(out[0].tolist())


def cmd_sample(args) -> int:
    print(_sample_text(Path(args.target), args.prompt, args.tokens, args.temperature, args.top_k, args.seed,
                       args.device, not args.no_learn))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    _split_data_override(args)
    result = run_eval(args)
    print(result["table"])
    if args.json:
        payload = {k: v for k, v in result.items() if k != "table"}
        atomic_write(Path(args.json), (json.dumps(payload, indent=1) + "\n").encode())
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


HANDLERS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "demo": cmd_demo}
