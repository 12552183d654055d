"""Level speed against fla and SDPA, in one process, on the same inputs (BRIEF §4).

    python benchmarks/speed.py                     # B=4, T=4096, H=16, D=128, bf16 (the anchors' shape)
    python benchmarks/speed.py --length 1024 --skip-compile

Rows: SDPA causal attention; fla's ``chunk_simple_gla`` (linear attention), ``chunk_delta_rule`` and
``chunk_gated_delta_rule`` when fla is importable; nlgraph's closed-form kinds (``linear_attention``,
``delta_rule`` with and without decay) and the derived level (linear memory, L2 objective, GD with lr
β: what ``specs/deltanet.yaml`` lowers to), each eager and compiled with ``fullgraph=True``; and a
Titans-style deep memory level (2-layer GELU MLP 128 → 512 → 128 per head, momentum, weight decay,
gradients at the chunk start, chunk 64).

nlgraph's closed-form rows run the form the registry chooses for the device (``triton`` for the delta
rules on CUDA; ``nlgraph bench SPEC --level KEY`` times one spec's level the same way). Every
nlgraph row is checked against its fla counterpart in the same run (relative L2 error of the
outputs) and every timing is the median of ``triton.testing.do_bench``. Peak memory is the extra
device memory of one forward + backward. Ratios are nlgraph time over fla time (lower is better).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from nlgraph.bench import rel_err
from nlgraph.model import compile_options
from nlgraph.runtime import run_level
from nlgraph.spec.loader import load_level

try:  # fla is optional: the anchors' kernels
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla

    HAVE_FLA = True
except Exception:  # noqa: BLE001  (any import failure just drops the fla rows)
    HAVE_FLA = False


def bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of ``fn``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def run():
        nonlocal grad
        for x in inputs:
            x.grad = None
        y = fn(*inputs)
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)

    return run


def peak_mib(run: Callable[[], None], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-deep", action="store_true", help="skip the deep-memory rows")
    p.add_argument("--deep-length", type=int, default=None, help="T for the deep-memory rows")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    b, t, h, d = args.batch, args.length, args.heads, args.dim
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    q = F.normalize(rnd(b, t, h, d).float(), dim=-1).to(dtype)
    k = F.normalize(rnd(b, t, h, d).float(), dim=-1).to(dtype)
    v = rnd(b, t, h, d)
    beta = torch.rand(b, t, h, device=device, generator=g).to(dtype)
    alpha = (0.9 + 0.1 * torch.rand(b, t, h, device=device, generator=g)).to(dtype)
    leaves = lambda *xs: [x.clone().requires_grad_() for x in xs]  # noqa: E731

    la = load_level({"kind": "linear_attention", "heads": h})
    dr = load_level({"kind": "delta_rule", "heads": h})
    gdr = load_level({"kind": "delta_rule", "heads": h, "decay": {"act": "logsigmoid"}})
    derived = load_level({"memory": {"kind": "linear", "heads": h}, "objective": {"kind": "l2"},
                          "optimizer": {"kind": "gd", "lr": {"from": "input"}}})

    impls: dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor], str | None]] = {}
    impls["SDPA causal (FlashAttention)"] = (
        lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=True),
        [q, k, v], None)
    if HAVE_FLA:
        impls["fla chunk_simple_gla (linear attention)"] = (
            lambda q_, k_, v_: chunk_simple_gla(q_, k_, v_, scale=1.0)[0], [q, k, v], None)
        impls["fla chunk_delta_rule"] = (
            lambda q_, k_, v_, b_: chunk_delta_rule(q_, k_, v_, b_, scale=1.0)[0], [q, k, v, beta], None)
        impls["fla chunk_gated_delta_rule"] = (
            lambda q_, k_, v_, b_, a_: chunk_gated_delta_rule(q_, k_, v_, a_.float().log(), b_, scale=1.0)[0],
            [q, k, v, beta, alpha], None)

    def ours(spec, with_beta: bool, with_alpha: bool):
        def fn(q_, k_, v_, *rates):
            kw = {}
            if with_beta:
                kw["lr"] = rates[0]
            if with_alpha:
                kw["retention"] = rates[1]
            # the registry's form for the device, as a model's plan chooses it (triton on CUDA)
            return run_level(spec, keys=k_, values=v_, queries=q_, form="auto", **kw)[0]
        return fn

    ours_rows = {
        "nlgraph linear_attention": (ours(la, False, False), [q, k, v], "fla chunk_simple_gla (linear attention)"),
        "nlgraph delta_rule": (ours(dr, True, False), [q, k, v, beta], "fla chunk_delta_rule"),
        "nlgraph delta_rule + decay": (ours(gdr, True, True), [q, k, v, beta, alpha], "fla chunk_gated_delta_rule"),
        "nlgraph level: linear, l2, gd(β)": (ours(derived, True, False), [q, k, v, beta], "fla chunk_delta_rule"),
    }
    for name, (fn, inputs, ref) in ours_rows.items():
        impls[name + ", eager"] = (fn, inputs, ref)
        if not args.skip_compile:
            impls[name + ", compiled"] = (torch.compile(fn, **compile_options(device)), inputs, ref)

    rows = []
    outputs: dict[str, torch.Tensor] = {}
    for name, (fn, inputs, ref) in impls.items():
        row = {"name": name}
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                y = fn(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            outputs[name] = y.transpose(1, 2) if name.startswith("SDPA") else y
            if ref is not None and ref in outputs:
                row["rel_err_vs_fla"] = rel_err(outputs[name], outputs[ref])
            with torch.no_grad():
                row["fwd_ms"] = bench(lambda: fn(*inputs), device)
            run = fwd_bwd(fn, leaves(*inputs))
            try:
                t0 = time.perf_counter()
                run()
                row["first_bwd_s"] = time.perf_counter() - t0
                row["fwd_bwd_ms"] = bench(run, device)
                row["peak_mib"] = peak_mib(run, device)
            except Exception as e:  # noqa: BLE001  (a refused backward is a result too)
                row["bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_deep:
        rows += deep_rows(args, device)

    fla_time = {r["name"]: r for r in rows if r["name"].startswith("fla")}
    print()
    print(f"B={b} T={t} H={h} D={d} {args.dtype} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, fla {'yes' if HAVE_FLA else 'not installed'}")
    print(f"{'implementation':<48} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x fla fwd':>9} {'x fla f+b':>9} "
          f"{'peak MiB':>9} {'rel err':>9}")
    for r in rows:
        ref = next((fla_time[n] for n in fla_time if n == ours_rows.get(r["name"].rsplit(",", 1)[0], (0, 0, ""))[2]), None)
        ratio = lambda key: (f"{r[key] / ref[key]:.2f}" if ref and key in r and key in ref else "-")  # noqa: E731
        fmt = lambda key, f: (format(r[key], f) if r.get(key) is not None else "-".rjust(int(f.split(".")[0])))  # noqa: E731
        print(f"{r['name']:<48} {fmt('fwd_ms', '9.3f')} {fmt('fwd_bwd_ms', '11.3f')} {ratio('fwd_ms'):>9} "
              f"{ratio('fwd_bwd_ms'):>9} {fmt('peak_mib', '9.0f')} {fmt('rel_err_vs_fla', '9.1e')}"
              + (f"  [{r.get('error') or r.get('bwd_error')}]" if r.get("error") or r.get("bwd_error") else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def deep_rows(args, device: str) -> list[dict]:
    """A Titans-style deep memory level, eager and compiled (mini-batch form)."""
    b, h, d = args.batch, args.heads, args.dim
    t = args.deep_length or args.length
    spec = load_level({
        "memory": {"kind": "mlp", "heads": h, "depth": 2, "hidden": "4x", "activation": "gelu"},
        "objective": {"kind": "l2"},
        "optimizer": {"kind": "momentum", "lr": {"from": "input"}, "momentum": {"from": "input"}},
        "retention": {"kind": "weight_decay", "gate": {"from": "input"}},
        "gradient_point": {"chunk": 64},
    })
    g = torch.Generator(device=device).manual_seed(1)
    dt = torch.float32  # the mini-batch form's inner gradients in bf16 drift; measured in fp32
    k = F.normalize(torch.randn(b, t, h, d, device=device, generator=g), dim=-1)
    q = F.normalize(torch.randn(b, t, h, d, device=device, generator=g), dim=-1)
    v = torch.randn(b, t, h, d, device=device, generator=g)
    lr = 0.01 * torch.rand(b, t, h, device=device, generator=g)
    mu = torch.rand(b, t, h, device=device, generator=g)
    keep = 0.98 + 0.02 * torch.rand(b, t, h, device=device, generator=g)
    from nlgraph.levels.run import init_state

    state = init_state(spec, batch=b, d_key=d, d_value=d, dtype=dt, device=device)

    def fn(q_, k_, v_):
        return run_level(spec, keys=k_, values=v_, queries=q_, lr=lr, momentum=mu, retention=keep,
                         state=dict(state), form="chunked")[0]

    rows = []
    variants = {f"nlgraph deep memory (T={t}, fp32), eager": fn}
    if not args.skip_compile:
        variants[f"nlgraph deep memory (T={t}, fp32), compiled"] = torch.compile(fn, **compile_options(device))
    for name, f in variants.items():
        row = {"name": name}
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                y = f(q, k, v)
            if device == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["finite"] = bool(torch.isfinite(y).all())
            with torch.no_grad():
                row["fwd_ms"] = bench(lambda: f(q, k, v), device)
            run = fwd_bwd(f, [q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()])
            t0 = time.perf_counter()
            run()
            row["first_bwd_s"] = time.perf_counter() - t0
            row["fwd_bwd_ms"] = bench(run, device)
            row["peak_mib"] = peak_mib(run, device)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
