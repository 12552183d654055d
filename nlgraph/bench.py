"""``nlgraph bench SPEC``: the training speed of a spec's model next to Transformer++ of the same
width and depth, measured in one process (issue 10 item 5).

For every sequence length (``--lengths``, with ``--tokens`` the batch is ``tokens // T`` so B·T stays
fixed) and every mode (``eager``; ``graph``: the step replayed as CUDA graphs, as ``nlgraph train``
does with ``--no-compile``; ``compile``: per-block ``torch.compile``), one AdamW training step on
random tokens is timed: the first step alone (it holds compilation or capture), then the median of
``--steps`` more. The anchor, Transformer++ with the spec's ``d_model`` / layers / heads, runs in
the same process at the same shapes (its fastest mode measured: ``compile`` on CUDA), and each row
gives its tokens/s as a ratio to the anchor's. Peak memory on CUDA.

A GPU tool: without CUDA it says so and exits 0, unless ``--device cpu`` asks for a CPU run (a
smoke test of the command, not a speed claim). Level-level timings against fla's kernels and
titans-pytorch are in ``benchmarks/kernels.py`` and ``benchmarks/deep_speed.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .errors import NLGraphError

__all__ = ["bench", "MODES"]

MODES = ("eager", "graph", "compile")


def _time_step(spec: Any, overrides: list[str], batch: int, length: int, mode: str, steps: int,
               device: torch.device, precision: str) -> dict[str, Any]:
    from .lower import build
    from .spec.loader import load_spec
    from .train.loop import graph_step, lm_loss, param_groups

    torch.manual_seed(0)
    model = build(load_spec(spec, overrides), device=device)
    vocab = model.spec.model.vocab
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    cuda = device.type == "cuda"
    bf16 = precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    if mode == "compile":
        model.compile_blocks()
    step_fn = None

    def one() -> float:
        nonlocal step_fn
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if mode == "graph":
            if step_fn is None:
                step_fn = graph_step(model, x, y, precision)
            loss = step_fn(x, y)
        else:
            with autocast():
                loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = one()
    times = [one() for _ in range(steps)]
    med = statistics.median(times)
    row = {"params": sum(p.numel() for p in model.parameters()), "first_step_s": round(first, 3),
           "ms": round(med * 1e3, 3), "tok_s": round(batch * length / med, 1)}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row


def bench(spec: Any, overrides: list[str], *, lengths: list[int], batch: int, tokens: int | None,
          modes: list[str], steps: int, device: str | None, precision: str, anchor: str | None,
          log=print) -> dict[str, Any] | None:
    """Time ``spec`` (see the module doc); returns JSON-able results, or ``None`` without CUDA when
    no ``device`` was asked for."""
    if device is None and not torch.cuda.is_available():
        return None
    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NLGraphError(f"--device {device}: CUDA is not available on this machine; use --device cpu "
                           f"for a smoke run", path="--device")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise NLGraphError(f"--modes {bad[0]}: choose from {', '.join(MODES)}", path="--modes")
    if "graph" in modes and dev.type != "cuda":
        raise NLGraphError("--modes graph needs a CUDA device (CUDA graphs)", path="--modes")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    from .spec.loader import load_spec

    spec_obj = load_spec(spec, overrides)
    width = ["vars.d_model", "vars.layers", "vars.heads"]
    vars_ = spec_obj.vars or {}
    anchor_ov = [f"{k}={vars_[k.split('.', 1)[1]]}" for k in width if k.split(".", 1)[1] in vars_]
    rows = []
    for length in lengths:
        b = max(1, tokens // length) if tokens else batch
        # the anchor first, so every row of the spec has its ratio
        runs = [(anchor, anchor_ov, "compile" if dev.type == "cuda" else "eager")] if anchor else []
        runs += [(spec, overrides, m) for m in modes]
        anchor_tok = None
        for name, ov, mode in runs:
            row = {"spec": name if isinstance(name, str) else (spec_obj.name or "spec"), "T": length,
                   "B": b, "mode": mode, "anchor": name is anchor}
            try:
                row.update(_time_step(name, list(ov), b, length, mode, steps, dev, precision))
            except NLGraphError:
                raise
            except Exception as e:  # noqa: BLE001 - one failing mode is a row that says so
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if row["anchor"] and "tok_s" in row:
                anchor_tok = row["tok_s"]
            if anchor_tok and "tok_s" in row:
                row["vs_anchor"] = round(row["tok_s"] / anchor_tok, 4)
            rows.append(row)
            log(json.dumps(row))
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": precision, "steps": steps,
            "spec": spec_obj.name, "overrides": list(overrides), "anchor": anchor}
    return {"meta": meta, "rows": rows}


def table(res: dict[str, Any]) -> str:
    head = ["spec", "T", "B", "mode", "params", "first step s", "ms/step", "tok/s", "vs anchor", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['T']} | {r['B']} | {r['mode']} | {r['error']} |" + " |" * 5)
            continue
        ratio = f"{r['vs_anchor']:.3f}x" if "vs_anchor" in r else "-"
        lines.append(f"| {r['spec']}{' (anchor)' if r['anchor'] else ''} | {r['T']} | {r['B']} | {r['mode']} | "
                     f"{r['params']:,} | {r['first_step_s']:.2f} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {ratio} | "
                     f"{r.get('peak_gib', '-')} |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from .io import atomic_write

    res = bench(args.spec, list(args.overrides), lengths=args.lengths, batch=args.batch, tokens=args.tokens,
                modes=args.modes, steps=args.steps, device=args.device, precision=args.precision,
                anchor=None if args.anchor == "none" else args.anchor,
                log=lambda s: print(s, file=sys.stderr, flush=True))
    if res is None:
        print("nlgraph bench measures GPU speed and this machine has no CUDA device; nothing was run "
              "(pass --device cpu for a smoke run of the command)")
        return 0
    print(f"{res['meta']['device']}, torch {res['meta']['torch']}, {res['meta']['precision']}, "
          f"median of {res['meta']['steps']} steps after the first")
    print(table(res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(res, indent=1) + "\n").encode())
    return 1 if any("error" in r for r in res["rows"]) else 0


def add_parser(sub) -> None:
    from .cli import _add_spec_args

    p = sub.add_parser("bench", help="time a spec's training step on the GPU next to Transformer++",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    _add_spec_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048], help="sequence lengths (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per step instead of --batch: B = tokens // T at every length (a sweep at fixed B·T)")
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], help="eager, graph, compile (default eager graph)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (default 5)")
    p.add_argument("--device", default=None, help="cuda (default when present), cuda:1, or cpu for a smoke run")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--anchor", default="transformer_pp", help="the spec timed alongside ('none': no anchor)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
