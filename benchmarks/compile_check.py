"""Compile check on the GPU: every named spec compiles block by block with fullgraph=True and trains
for N steps with no recompiles; eager and compiled logits agree. Prints a table.

    python benchmarks/compile_check.py hope titans gated_deltanet --steps 20 --length 512

Results and the command that made them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nlgraph.lower import build


def check(name: str, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    counters.clear()
    device = args.device
    torch.manual_seed(0)
    overrides = [f"vars.d_model={args.d_model}", f"vars.layers={args.layers}", f"vars.heads={args.heads}"]
    model = build(name, overrides=overrides, device=device)
    tokens = torch.randint(0, model.spec.model.vocab, (args.batch, args.length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        eager = model(x)
    model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    with torch.no_grad():
        compiled = model(x)
    err = (compiled - eager).abs().max().item() / eager.abs().max().item()
    loss0 = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    graphs_after_first = counters["stats"]["unique_graphs"]
    times = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(args.steps - 1):
            t = time.perf_counter()
            loss = step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {
        "spec": name,
        "params": sum(p.numel() for p in model.parameters()),
        "graphs": graphs_after_first,
        "recompiles": counters["stats"]["unique_graphs"] - graphs_after_first,
        "compile_s": compile_s,
        "step_ms": 1000 * sorted(times)[len(times) // 2] if times else float("nan"),
        "rel_err": err,
        "loss": f"{loss0:.3f} -> {loss:.3f}",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="print the whole error of a failed spec")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"B={args.batch} T={args.length} d_model={args.d_model} heads={args.heads} layers={args.layers} "
          f"steps={args.steps}, fullgraph=True, fail_on_recompile after step 1")
    header = f"{'spec':<16} {'params':>10} {'graphs':>6} {'recompiles':>10} {'compile+step1 s':>15} {'step ms':>9} {'rel err':>9}  loss"
    print(header)
    ok = True
    for name in args.specs:
        try:
            r = check(name, args)
            print(f"{r['spec']:<16} {r['params']:>10,} {r['graphs']:>6} {r['recompiles']:>10} "
                  f"{r['compile_s']:>15.1f} {r['step_ms']:>9.1f} {r['rel_err']:>9.1e}  {r['loss']}")
            ok &= r["recompiles"] == 0
        except Exception as e:  # report and continue with the next spec
            ok = False
            print(f"{name:<16} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if args.verbose:
                print(str(e)[:4000])
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
