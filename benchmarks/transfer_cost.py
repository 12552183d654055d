"""What the chunked forms' transfer products cost, against the doubling scan they replaced.

``compilers.chunked.transfer`` builds ``G[r, j] = Π_{l=j+1..r} f_l`` for a chunk (the retention and
momentum products). It is one cumulative product forward and one batched matmul backward
(``_Transfer``); before, it was ⌈log₂(n+1)⌉ doubling steps of multiplications, each kept for the
backward. This script times both in one process and, for whole specs, measures a training step's
time and the bytes autograd keeps for the backward (every saved tensor's storage, counted once)
with each form, on CPU by default::

    OMP_NUM_THREADS=2 python benchmarks/transfer_cost.py --sizes 16 64 256 \\
        --specs hope_large_chunk:1024:2 titans:2048:1:levels.memory.gradient_point.chunk=256 hope:256:2 \\
        --json benchmarks/results/transfer_cost_cpu.json

A spec is ``NAME:T:B[:OVERRIDE...]`` at d_model 128, 2 heads, 2 layers. ``--check`` first compares,
on the device, both forms eager and the new one compiled (``torch.compile(fullgraph=True)``, inductor)
with the float64 products on the CPU: values and gradients, factors of exactly 0 included (what a
GPU run checks before its timings count)::

    python benchmarks/transfer_cost.py --device cuda --check --sizes 16 64 256 --batch 640 \
        --specs hope_large_chunk:2048:4 titans:2048:8 --json "$OUT/transfer_cost.json"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import nlgraph.compilers.chunked as chunked


def doubling(f: torch.Tensor, channel: bool) -> torch.Tensor:
    """The replaced form: ⌈log₂(n+1)⌉ doubling steps (``chunked._cumprod``) over the masked matrix."""
    n = f.shape[-2] if channel else f.shape[-1]
    strictly, lower = chunked._lower_masks(n, f)
    lower = lower.to(f.dtype)
    one = torch.ones((), dtype=f.dtype, device=f.device)
    if channel:
        pad = torch.cat([torch.ones_like(f[..., :1, :]), f], dim=-2)
        return chunked._cumprod(torch.where(strictly[..., None], pad.unsqueeze(-2), one), -3) * lower[..., None]
    pad = torch.cat([torch.ones_like(f[..., :1]), f], dim=-1)
    return chunked._cumprod(torch.where(strictly, pad.unsqueeze(-1), one), -2) * lower


FORMS = {"cumprod_matmul": chunked._transfer, "doubling": doubling}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_sizes(sizes: list[int], batch: int, dev: torch.device, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        for name, fn in FORMS.items():
            f = torch.rand(batch, n, device=dev).requires_grad_()
            fwd, both = [], []
            for _ in range(repeats + 1):
                _sync(dev)
                t0 = time.perf_counter()
                g = fn(f, False)
                _sync(dev)
                t1 = time.perf_counter()
                g.sum().backward()
                _sync(dev)
                fwd.append(t1 - t0)
                both.append(time.perf_counter() - t0)
            rows.append({"n": n, "batch": batch, "form": name, "fwd_ms": round(1e3 * statistics.median(fwd[1:]), 2),
                         "fwd_bwd_ms": round(1e3 * statistics.median(both[1:]), 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def check(sizes: list[int], dev: torch.device) -> list[dict]:
    """Each form on ``dev`` (and the new one compiled) against the float64 products on the CPU, taken
    by the doubling scan (the form independent of the one under test)."""
    rows = []
    compiled = torch.compile(chunked._transfer, fullgraph=True, dynamic=False)
    for n in sizes:
        for channel in (False, True):
            g = torch.Generator().manual_seed(n)
            f64 = torch.rand((4, 3, n, 8) if channel else (4, 3, n), generator=g, dtype=torch.float64)
            f64.view(-1)[::7] = 0.0
            w64 = torch.randn((4, 3, n + 1, n + 1, 8) if channel else (4, 3, n + 1, n + 1), generator=g,
                              dtype=torch.float64)
            x = f64.clone().requires_grad_()
            ref = doubling(x, channel)
            (ref_grad,) = torch.autograd.grad((ref * w64).sum(), x)
            for name, fn in (*FORMS.items(), ("cumprod_matmul compiled", compiled)):
                x = f64.to(dev, torch.float32).requires_grad_()
                out = fn(x, channel)
                (grad,) = torch.autograd.grad((out * w64.to(dev, torch.float32)).sum(), x)
                errs = {k: float((a.detach().double().cpu() - r).norm() / r.norm())
                        for k, a, r in (("G", out, ref.detach()), ("dG/df", grad, ref_grad))}
                rows.append({"n": n, "channel": channel, "form": name, "rel_err": errs, "limit": 1e-5,
                             "ok": max(errs.values()) < 1e-5})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def saved_bytes(root) -> int:
    """Bytes of every tensor storage autograd keeps for the backward of the graph at ``root``."""
    nodes, storages, total, stack = set(), set(), 0, [root]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except Exception:  # noqa: BLE001  (a freed or inaccessible buffer)
                    continue
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif isinstance(value, (tuple, list)):
                    tensors += [v for v in value if isinstance(v, torch.Tensor)]
        try:
            tensors += list(node.saved_tensors)
        except Exception:  # noqa: BLE001  (not a custom Function's node)
            pass
        for t in tensors:
            try:
                key = t.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001  (functorch's wrappers have no storage to read)
                continue
            if key not in storages:
                storages.add(key)
                total += t.untyped_storage().nbytes()
        stack += [f for f, _ in node.next_functions]
    return total


def measure_spec(text: str, dev: torch.device, repeats: int, forms: list[str]) -> list[dict]:
    """A training step of spec ``NAME:T:B[:OVERRIDE...]`` with each form: its median time and the
    bytes autograd keeps for its backward."""
    name, t, b, *overrides = text.split(":")
    rows = []
    try:
        for form in forms:
            chunked._transfer = FORMS[form]
            ms, kept = _step_cost(name, int(t), int(b), overrides, dev, repeats)
            rows.append({"spec": text, "form": form, "step_ms": ms, "saved_mib": round(kept / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        chunked._transfer = FORMS["cumprod_matmul"]
    return rows


def _step_cost(name: str, t: int, b: int, overrides: list[str], dev: torch.device, repeats: int):
    from nlgraph.lower import build
    from nlgraph.spec.loader import load_spec

    torch.manual_seed(0)
    model = build(load_spec(name, ["vars.d_model=128", "vars.heads=2", "vars.layers=2", *overrides])).to(dev)
    tokens = torch.randint(0, model.spec.model.vocab, (b, t), device=dev)
    loss = model(tokens).float().logsumexp(-1).mean()
    kept = saved_bytes(loss.grad_fn)
    loss.backward()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model(tokens).float().logsumexp(-1).mean().backward()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 1), kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256], help="chunk lengths n")
    ap.add_argument("--batch", type=int, default=160, help="products per size (slots × batch × heads)")
    ap.add_argument("--specs", nargs="*", default=[], metavar="NAME:T:B[:OVERRIDE...]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS),
                    help="the order the specs' steps run the forms in")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check", action="store_true", help="check the forms on the device first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    res = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "checks": check(args.sizes, dev) if args.check else [],
           "sizes": time_sizes(args.sizes, args.batch, dev, args.repeats),
           "specs": [r for s in args.specs for r in measure_spec(s, dev, args.repeats, args.forms)]}
    if args.json:
        from nlgraph.io import atomic_write

        atomic_write(Path(args.json), json.dumps(res, indent=1).encode())
    return 0 if all(r["ok"] for r in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
