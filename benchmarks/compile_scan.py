"""Compile every library spec (or the named ones) in a fresh process on an empty inductor cache and
report, per spec: whether AOT autograd's and inductor's caches took its graphs (and why not), and
how far the compiled logits and gradients are from eager (CPU, float32, tiny shapes).

    OMP_NUM_THREADS=1 python benchmarks/compile_scan.py --length 40 --batch 1 --json out.jsonl

A cache bypass means every later process compiles that graph again (docs/benchmarks.md, "Compile
time"); a failure or a large difference is a compiled model that does not do what eager does. Each
spec runs in its own subprocess (``--child-timeout``), so one failure does not stop the scan.
``--emulate-precision-casts`` sets inductor's option that rounds every low-precision intermediate
as eager does (to tell a precision effect from a change of semantics).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, logging, sys, time
import torch
from torch._dynamo.utils import counters
from nlgraph.lower import build
from nlgraph.spec.loader import load_spec

spec, t, b, d, h, layers, emulate = sys.argv[1:8]
if emulate == "1":
    torch._inductor.config.emulate_precision_casts = True
reasons = []


class Catch(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "due to:" in msg:
            reasons.append(msg.split("due to:", 1)[1].strip().splitlines()[0][:200])


log = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
log.setLevel(logging.INFO)
log.addHandler(Catch())
torch.manual_seed(0)
model = build(load_spec(spec, [f"vars.d_model={d}", f"vars.heads={h}", f"vars.layers={layers}"]))
tokens = torch.randint(0, model.spec.model.vocab, (int(b), int(t)))


def step():
    out = model(tokens)
    out.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


row = {"spec": spec}
start = time.perf_counter()
try:
    eager, eager_grads = step()
    model.compile_blocks()
    compiled, compiled_grads = step()
    row["logits_rel"] = ((compiled - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item()
    row["grads_rel"] = max(((compiled_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                           for n, g in eager_grads.items())
    row["same_grads"] = compiled_grads.keys() == eager_grads.keys()
except Exception as e:  # noqa: BLE001 - reported per spec
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
row["seconds"] = round(time.perf_counter() - start, 1)
row["aot_autograd"] = {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}
row["fx_graph"] = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
row["bypass_reasons"] = sorted(set(reasons))
print(json.dumps(row))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="*", help="library spec names (default: every spec in specs/)")
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--emulate-precision-casts", action="store_true")
    p.add_argument("--child-timeout", type=float, default=900)
    p.add_argument("--json", help="write the rows, one JSON object a line")
    args = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    specs = args.specs or sorted(f.stem for f in (root / "specs").glob("*.yaml"))
    rows = []
    print(f"T={args.length} B={args.batch} d_model={args.d_model} heads={args.heads} layers={args.layers}, "
          "each spec in a fresh process on an empty inductor cache", flush=True)
    for name in specs:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            # -P: the installed nlgraph, not a source tree in the working directory (whose specs
            # are packaged as nlgraph.specs only when installed)
            cmd = [sys.executable, "-P", "-c", CHILD, name, str(args.length), str(args.batch), str(args.d_model),
                   str(args.heads), str(args.layers), "1" if args.emulate_precision_casts else "0"]
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"spec": name, "error": done.stderr.strip()[-300:]}
            except subprocess.TimeoutExpired:
                row = {"spec": name, "error": f"no result within {args.child_timeout:.0f} s"}
        rows.append(row)
        aot = row.get("aot_autograd", {})
        state = "bypass" if aot.get("autograd_cache_bypass") else ("saved" if aot.get("autograd_cache_saved") else "-")
        diff = (f"logits {row['logits_rel']:.1e}  grads {row['grads_rel']:.1e}" if "logits_rel" in row
                else f"ERROR {row.get('error', '')}")
        print(f"{name:20s} AOT cache {state:7s} {diff}  ({row.get('seconds', '-')} s)", flush=True)
        for reason in row.get("bypass_reasons", []):
            print(f"    bypass: {reason}", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
