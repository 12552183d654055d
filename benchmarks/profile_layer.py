"""Where a whole layer's GPU time goes, next to fla's layer of the same kind: the calls `nlgraph bench
SPEC --layer KEY` times (``nlgraph.bench.layer_impls``: fla's layer first, then nlgraph's in each
mode), each run under ``torch.profiler`` forward alone and forward + backward, kernel by kernel
(``benchmarks/_launch.kernel_profile``).

    bash benchmarks/device.sh python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 \\
        vars.heads=8 --layer mixer --modes eager compile --json "$OUT/layer_profile_gdn.json"

A phase whose call fails (fla refuses its gated backward on triton < 3.7.1 on Hopper) is a row that
says so and the others run (a failing forward: one row for the implementation). CUDA only: the
kernel times come from the profiler's CUDA activity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--layer", default="mixer", help="the entry of the first block (default mixer)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--reps", type=int, default=5, help="profiled calls a phase, after a warm call")
    ap.add_argument("--top", type=int, default=20, help="kernels kept a row, the longest first")
    ap.add_argument("--no-fla", action="store_true", help="leave fla's layer out")
    ap.add_argument("--tuned", action="store_true",
                    help="also record the config each autotuned delta-rule kernel ran with (its last call's: "
                         "with NLGRAPH_TRITON_AUTOTUNE=1, what the autotuner chose at this shape)")
    ap.add_argument("--separate-gates", action="store_true",
                    help="build the layer with a matmul a gate (nlgraph.memory.FUSE_GATES off), as before "
                         "gates projecting the same input shared one")
    ap.add_argument("--separate-casts", action="store_true",
                    help="let each autocast matmul cast the layer's input itself (nlgraph.layers.SHARE_CASTS off), "
                         "as before its projections shared one 16-bit copy")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("profile_layer.py needs CUDA (the kernel times are the profiler's CUDA activity)", file=sys.stderr)
        return 2
    from _launch import kernel_profile

    import nlgraph.layers
    import nlgraph.memory
    from nlgraph.bench import layer_impls

    nlgraph.memory.FUSE_GATES = not args.separate_gates
    nlgraph.layers.SHARE_CASTS = not args.separate_casts

    impls, x, meta = layer_impls(args.spec, list(args.overrides), args.layer, batch=args.batch, length=args.length,
                                 modes=tuple(args.modes), fla=not args.no_fla)
    print(json.dumps(meta), flush=True)
    rows = kernel_profile(impls, [x], x.device, reps=args.reps, top=args.top)
    out = {"meta": {**meta, "fused_gates": nlgraph.memory.FUSE_GATES,
                    "shared_casts": nlgraph.layers.SHARE_CASTS}, "command": sys.argv, "profile": rows}
    if args.tuned:
        from nlgraph.compilers.kernels._delta_rule_triton import kernels

        out["configs"] = {name: str(fn.best_config) for name, fn in vars(kernels()).items()
                          if getattr(fn, "best_config", None) is not None}
        print(json.dumps({"configs": out["configs"]}), flush=True)
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
