"""Train with ``nlgraph train`` and, if a step goes non-finite, trace the failing batch through the
mini-batch levels chunk by chunk: where a deep memory's state blew up, and what fed it.

    bash benchmarks/device.sh python benchmarks/nan_trace.py --json "$OUT/nan_trace.json" -- \\
        hope vars.d_model=256 vars.layers=4 --length 512 --batch 8 --steps 300 --lr 3e-4 --out /tmp/h

Everything after ``--`` is ``nlgraph train``'s command line, run in this process. When the trainer
finds a non-finite loss or gradient it calls :func:`nlgraph.train.loop.locate_nonfinite` with the
failing batch and the parameters that produced it; this script wraps that call, re-runs the batch
eagerly (in the trainer's autocast) with every chunk of every mini-batch level recorded, and writes:
per block and chunk, the largest weight and momentum of every memory slot after the chunk, the
ranges of η and α, the largest ‖k‖, ‖v‖ and read, and how aligned the chunk's keys are (the top
eigenvalue of the mean Gram matrix of its unit keys: 1/D for random, 1 for one direction); the
batch rows and text where the first non-finite value appeared.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _max(ts) -> float:
    vals = [float(t.detach().float().abs().max()) for t in ts if torch.is_tensor(t) and t.numel()]
    return max(vals) if vals else 0.0


def trace_batch(model: torch.nn.Module, tokens: torch.Tensor, autocast) -> dict:
    """Run ``tokens [B, T]`` eagerly and record every mini-batch chunk (see the module docstring)."""
    import nlgraph.compilers.chunked as chunked

    rows: list[dict] = []
    # a block is called once per segment when in-context levels cut the sequence: count its chunks
    current = {"block": -1, "chunks": {}}
    hooks = [blk.register_forward_pre_hook(lambda mod, inp, i=i: current.update(block=i))
             for i, blk in enumerate(model.blocks)]
    original = chunked._minibatch_chunk

    def traced(run, chunk, lin, committed, working, buffers, commits, origin=None):
        out, new, buf = original(run, chunk, lin, committed, working, buffers, commits, origin)
        k = chunked._stream(run, "keys", chunk, lin).detach().float()
        v = chunked._stream(run, "values", chunk, lin).detach().float()
        lr, alpha = chunked._rate(run, "lr", chunk, lin), chunked._rate(run, "alpha", chunk, lin)
        u = torch.nn.functional.normalize(k, dim=-1)
        gram = u.transpose(-1, -2) @ u / u.shape[-2]  # [B, H, D, D]
        blk = current["block"]
        index = current["chunks"][blk] = current["chunks"].get(blk, -1) + 1
        row = {"block": blk, "chunk": index, "tokens": int(k.shape[-2]),
               "w_max": {s.split(".")[-1]: _max(ps.values()) for s, ps in new.items()},
               "momentum_max": {s.split(".")[-1]: _max(b.values()) for s, b in buf.items()} if buf else {},
               "k_norm_max": float(k.norm(dim=-1).max()), "v_norm_max": float(v.norm(dim=-1).max()),
               "key_alignment_max": (float(torch.linalg.eigvalsh(gram.double()).max())
                                     if torch.isfinite(gram).all() else float("nan")),
               "read_max": float(out.detach().float().abs().max()),
               "read_finite": bool(torch.isfinite(out).all())}
        for name, r in (("eta", lr), ("alpha", alpha)):
            if torch.is_tensor(r):
                row[name] = [float(r.detach().min()), float(r.detach().max())]
        if not row["read_finite"]:
            bad = ~torch.isfinite(out.detach()).flatten(1).all(-1)
            row["nonfinite_rows"] = [int(i) for i in bad.nonzero().flatten()]
        rows.append(row)
        return out, new, buf

    chunked._minibatch_chunk = traced
    compiled = getattr(model, "_compiled", None)
    try:
        model._compiled = None
        with torch.no_grad(), autocast():
            logits = model(tokens)
    finally:
        chunked._minibatch_chunk = original
        model._compiled = compiled
        for h in hooks:
            h.remove()
    bad_rows = (~torch.isfinite(logits.float()).flatten(1).all(-1)).nonzero().flatten().tolist()
    first = next((r for r in rows if not r["read_finite"]), None)
    text = {}
    for i in bad_rows[:2] or [0]:
        text[str(i)] = bytes(int(t) % 256 for t in tokens[i].tolist()).decode("latin-1")
    return {"logits_finite": not bad_rows, "nonfinite_batch_rows": bad_rows, "first_nonfinite_chunk": first,
            "chunks": rows, "text": text}


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: nan_trace.py [--json FILE] -- SPEC [nlgraph train args]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="nan_trace.json")
    args = ap.parse_args(argv[:cut])
    import nlgraph.train.loop as loop
    from nlgraph.cli import main as cli_main
    from nlgraph.io import atomic_write

    original = loop.locate_nonfinite

    def write(report: dict) -> None:
        atomic_write(args.json, json.dumps(report, indent=1).encode())
        first = report.get("first_nonfinite_chunk")
        print(f"nan_trace: wrote {args.json}; logits finite: {report['logits_finite']}; first non-finite chunk: "
              f"{json.dumps(first) if first else None}", flush=True)

    def locate(model, tokens, autocast):
        where = original(model, tokens, autocast)
        report = trace_batch(model, tokens, autocast)
        report["where"] = where
        write(report)
        return where

    loop.locate_nonfinite = locate
    return cli_main(["train", *argv[cut + 1:]])


if __name__ == "__main__":
    sys.exit(main())
