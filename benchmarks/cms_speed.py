"""In-context CMS cost (issue 9): one training step (forward + backward, AdamW) of a spec with its
CMS periods run in context, against the same spec with every CMS link at ``frequency: never`` (the
static MLP stack), eager or compiled. Prints a table of ms per step, tokens/s and peak memory.

    python benchmarks/cms_speed.py hope --d-model 512 --layers 8 --length 4096 --batch 4 --compile

Prints only what it measures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from nlgraph.lower import build
from nlgraph.spec.loader import load_spec


def cms_links(spec) -> list[str]:
    """Override keys setting every CMS chain link of the spec to ``frequency: never``."""
    out = []
    for name, entry in spec.levels.items():
        if getattr(entry, "kind", None) == "chain":
            for i, lv in enumerate(entry.levels):
                if lv.objective.kind == "outer" and lv.frequency != "never":
                    out.append(f"levels.{name}.levels.{i}.frequency=never")
    return out


def measure(name: str, overrides: list[str], args: argparse.Namespace) -> tuple[float, float]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, overrides=overrides, device=args.device)
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length + 1), device=args.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.device.startswith("cuda")):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return ms, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="hope")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    base = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={args.heads}"]
    static = base + cms_links(load_spec(args.spec, base))
    print(f"{args.spec}: d_model {args.d_model}, {args.layers} layers, B={args.batch}, T={args.length}, "
          f"{'compiled' if args.compile else 'eager'}, {args.device}")
    print(f"{'CMS':<12} {'ms/step':>10} {'tokens/s':>10} {'peak GiB':>9}")
    for label, overrides in (("in context", base), ("static", static)):
        ms, peak = measure(args.spec, overrides, args)
        print(f"{label:<12} {ms:10.1f} {args.batch * args.length / ms * 1e3:10.0f} {peak:9.2f}", flush=True)


if __name__ == "__main__":
    main()
