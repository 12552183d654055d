"""Where a model's training memory goes: the bytes a forward leaves alive for the backward, per
token, and the code that allocated them (CPU, float32, no GPU needed; ``--bf16``: under CPU bf16
autocast, an approximation of a GPU's training run: CPU's autocast casts another list of operators).

    OMP_NUM_THREADS=1 python benchmarks/live_bytes.py transformer_pp titans hope --length 128 --json out.json

A ``TorchDispatchMode`` sees every tensor an operator returns; each new storage is counted until its
last tensor is freed, and charged to the innermost nlgraph frames that made it. What is still alive
when the forward returns is what autograd keeps for the backward (plus the logits): on the GPU that
is the bulk of a training step's peak. Storages are keyed by address, so a freed address reused
before its finaliser ran is charged to its first site: the per-site split is approximate, the total
is not.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _site() -> str:
    frames = [f for f in traceback.extract_stack(limit=40)
              if ("/nlgraph/" in f.filename or "/compilers/" in f.filename) and "live_bytes" not in f.filename]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in reversed(frames[-3:]))


class _Track(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # address -> [bytes, tensors alive, site]
        self.now = self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            except RuntimeError:
                # a tensor without a storage of its own (the gain's forward-mode pass makes them;
                # torch._C._functorch.is_functorch_wrapped_tensor does not flag them): the tensors
                # behind it are returned by the operators that made them and counted there
                continue
            if ptr == 0:
                continue
            if ptr in self.live:
                self.live[ptr][1] += 1
            else:
                self.live[ptr] = [size, 1, _site()]
                self.now += size
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._drop, ptr)
        return out


def measure(spec: str, overrides: list[str], length: int, top: int, bf16: bool = False) -> dict:
    from nlgraph import load_spec
    from nlgraph.lower import build

    torch.manual_seed(0)
    model = build(load_spec(spec, overrides))
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    track = _Track()
    with track, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens)
    alive = track.now  # while the logits (and through them the graph) are alive
    by_site: collections.Counter = collections.Counter()
    for size, _, site in track.live.values():
        by_site[site] += size
    del logits
    return {"spec": spec, "overrides": overrides, "length": length, "bf16": bf16, "live_mib": alive / 2**20,
            "kib_per_token": alive / length / 1024, "peak_mib": track.peak / 2**20,
            "sites": [{"site": s, "mib": b / 2**20} for s, b in by_site.most_common(top)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--set", action="append", default=None,
                    help="a spec override, repeatable (default: vars.d_model=512 vars.heads=8 vars.layers=1)")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast (what a GPU run trains in)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.set = args.set or ["vars.d_model=512", "vars.heads=8", "vars.layers=1"]
    rows = []
    for spec in args.specs:
        row = measure(spec, args.set, args.length, args.top, args.bf16)
        rows.append(row)
        print(f"{spec}: {row['live_mib']:.1f} MiB alive after the forward = {row['kib_per_token']:.0f} KiB/token "
              f"(peak during it {row['peak_mib']:.1f} MiB)", flush=True)
        for s in row["sites"]:
            print(f"  {s['mib']:8.1f} MiB  {s['site']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"length": args.length, "overrides": args.set, "bf16": args.bf16, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
